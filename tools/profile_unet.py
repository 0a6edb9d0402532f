"""Where a UNet step's time goes, per kind of operation: minisd's fastest CPU paths against
OpenVINO's, at tools/bench.py's shapes (random small-sd weights, CFG batch 2, 77 text tokens).

    python tools/profile_unet.py --mode minisd-int8                  # 256x256, 5 UNet calls
    python tools/profile_unet.py --mode openvino-int8 --json ov.json
    python tools/profile_unet.py --mode minisd-bf16-compiled --tiny --size 64   # a smoke test

One mode per process:
- minisd-bf16-compiled, minisd-int8: `Pipeline.from_pretrained(..., dtype=bfloat16, compile=True,
  quantize=None or "int8")`. A first generation (10 steps, latents out) calibrates and compiles,
  a second one records the UNet's real inputs, then `--steps-profiled` of those calls (spread
  over the steps) run under torch.profiler (CPU). Inductor is told to record its own generated
  C++ kernels (config.cpp.enable_kernel_profile, a small overhead), so fused elementwise and
  normalisation kernels show under their names (cpp_fused_native_group_norm_silu_3) instead of
  inside the compiled graph's call. Printed: torch's key_averages table (self CPU time: each
  op's own time, its children's excluded, so the rows add up to the profiled time).
- openvino-bf16, openvino-int8: the bench's pipeline (tools/bench_openvino.py: converted, nncf
  int8 for -int8, compiled with the bf16 hint) with profiling on (PERF_COUNT); one generation
  records the inputs, then the same number of UNet inferences run and
  `request.get_profiling_info()` is summed per node type and kernel (exec_type, e.g.
  jit_avx512_amx_I8 or brgconv_avx512_amx_bf16). Printed: the top (node type, kernel) rows.

Both then print the same grouped summary: ms per UNet call (one denoising step: CFG is one
batch of 2) in each kind:
- convolution, linear/matmul (OpenVINO's FullyConnected), attention (SDPA: torch's fused
  kernel, OpenVINO's attention Subgraph; an unfused q k^T product would count as matmul);
- normalisation: group/layer norm kernels, including what Inductor or OpenVINO fused into them
  (cpp_fused_native_group_norm_silu, OpenVINO's MVN and its norm Subgraph);
- elementwise/other: everything else: activations, adds, layout reorders, (de)quantize steps,
  and for torch the Python, guard and wrapper time of the call itself.
Fused code is counted by its name, so a fused group norm + SiLU is all normalisation on both
sides. Per-op timing costs a little: the profiled total is above the wall time of the same
calls (also printed; torch's without the profiler, OpenVINO's with its counters, compiled in);
compare kinds and shares more than absolute totals, and run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_model import GUIDANCE, PROMPT, SEED, add_model_options, model_folder

MODES = ("minisd-bf16-compiled", "minisd-int8", "openvino-bf16", "openvino-int8")
KINDS = ("convolution", "linear/matmul", "attention", "normalisation", "elementwise/other")
WARMUP_STEPS = 10  # the generations that compile (and calibrate) and then record the inputs


def kind_of(name: str) -> str:
    """A torch profiler event name (aten op, oneDNN op, Inductor kernel) or an OpenVINO node
    label (node_type, "Subgraph:aten_op" for a fused one; node_label), as one of KINDS."""
    n = name.lower()
    if "cpp_fused" in n or n.startswith("subgraph"):  # generated fused code, named after its ops:
        # attention where it holds one (OpenVINO's SDPA is a Subgraph), else never a
        # convolution or product (a bias add from a convolution's origin stays elementwise)
        return ("attention" if re.search(r"attention|softmax", n) else "normalisation" if "norm" in n
                else "elementwise/other")
    if "conv" in n:  # aten::convolution, mkldnn::_convolution_pointwise, onednn::qconv2d_pointwise, Convolution
        return "convolution"
    if re.search(r"attention|sdpa|softmax", n):
        return "attention"
    if re.search(r"linear|matmul|\bmm\b|addmm|bmm|_int_mm|fullyconnected|gemm", n):
        return "linear/matmul"
    if re.search(r"norm|mvn", n):
        return "normalisation"
    return "elementwise/other"


def node_label(node_type: str, node_name: str) -> str:
    """An OpenVINO node's type; for a Subgraph (the CPU plugin's fused code: attention, SiLU,
    a norm's scale and shift, adds), with the torch op its name comes from, e.g.
    "Subgraph:scaled_dot_product_attention" for ".../attn1/aten::scaled_dot_product_attention/...".
    """
    ops = re.findall(r"aten::(\w+)", node_name)
    return f"Subgraph:{ops[-1]}" if node_type == "Subgraph" and ops else node_type


def pick(records: list, n: int) -> list:
    """n of the recorded calls, spread evenly over the generation's steps (repeated past its steps)."""
    return [records[i * len(records) // n] for i in range(n)]


def record_inductor_kernels() -> None:
    """Each of Inductor's generated C++ kernels as a profiler event (read while it generates the
    code). Its C++ wrapper (minisd's cpp_wrapper=True) then writes each kernel's Python stack
    trace into a raw string R"(...)" which, in torch 2.13, a trace holding `)"` ends early (einops'
    "b n (h d)"): the C++ does not compile. The traces are debugging text: they are left out."""
    import torch._inductor.config as inductor_config
    import torch._inductor.ir as inductor_ir
    from torch.utils._ordered_set import OrderedSet

    inductor_config.cpp.enable_kernel_profile = True
    inductor_ir.IRNode.get_stack_traces = lambda self: OrderedSet()


def profile_minisd(args, folder: Path) -> tuple[dict, float, float]:
    from torch.profiler import ProfilerActivity, profile, record_function

    from minisd import Pipeline

    record_inductor_kernels()
    # In process (compile_cache=False): the package cache's code is the same, but Inductor's
    # kernel profiling (record_inductor_kernels) must be on while it compiles.
    pipe = Pipeline.from_pretrained(folder, dtype=torch.bfloat16, safety_checker=None, compile=True,
                                    compile_cache=False, quantize="int8" if args.mode == "minisd-int8" else None)
    run = {"height": args.size, "width": args.size, "num_inference_steps": WARMUP_STEPS, "guidance_scale": GUIDANCE,
           "output_type": "latent", "generator": torch.Generator().manual_seed(SEED)}
    start = time.perf_counter()
    pipe(PROMPT, **run)  # calibrates (int8) and compiles
    print(f"first generation (calibrate/compile): {time.perf_counter() - start:.1f} s", file=sys.stderr)

    unet, records = pipe.unet, []

    class Recorder:  # stands in for the UNet: records each call's inputs, answers as the UNet
        def __call__(self, x, t, context):
            records.append((x.clone(), torch.as_tensor(t).clone(), context.clone()))
            return unet(x, t, context)

        def __getattr__(self, name):
            return getattr(unet, name)

    pipe.unet = Recorder()
    try:
        pipe(PROMPT, **run)
    finally:
        pipe.unet = unet
    calls = pick(records, args.steps_profiled)
    with torch.no_grad():
        start = time.perf_counter()
        for x, t, context in calls:
            unet(x, t, context)
        wall_ms = (time.perf_counter() - start) * 1e3 / len(calls)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x, t, context in calls:
                with record_function("unet call (Python, guards)"):
                    unet(x, t, context)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    per_op = defaultdict(float)
    for event in events:
        per_op[event.key] += event.self_cpu_time_total / 1e3 / len(calls)  # us -> ms per call
    return per_op, wall_ms, sum(per_op.values())


def profile_openvino(args, folder: Path) -> tuple[dict, float, float]:
    import bench_openvino
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    bench_openvino.import_openvino(int8=args.mode == "openvino-int8")  # or says how to install them
    bench_config = bench_openvino.compile_config
    # The bench's compile settings plus per-node timing: load_openvino_pipeline compiles the
    # UNet (and VAE) with whatever bench_openvino.compile_config returns.
    bench_openvino.compile_config = lambda ov: {**bench_config(ov), ov.properties.enable_profiling: True}
    notes = []
    try:
        pipe = bench_openvino.load_openvino_pipeline(StableDiffusionPipeline, folder, args.size, WARMUP_STEPS,
                                                     GUIDANCE, int8=args.mode == "openvino-int8", notes=notes)
    finally:
        bench_openvino.compile_config = bench_config
    print("; ".join(notes), file=sys.stderr)
    recorder = bench_openvino._Recorder(pipe.unet)  # runs the OpenVINO UNet, keeps its inputs
    object.__setattr__(pipe, "unet", recorder)  # as bench_openvino does: no re-registration
    pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=WARMUP_STEPS, guidance_scale=GUIDANCE,
         generator=torch.Generator().manual_seed(SEED), output_type="latent")
    ov_unet = recorder.unet
    calls = pick(recorder.inputs, args.steps_profiled)
    request = ov_unet._request
    start = time.perf_counter()
    for inputs in calls:
        ov_unet.run(*inputs)
    wall_ms = (time.perf_counter() - start) * 1e3 / len(calls)
    per_node, per_kernel, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    for inputs in calls:
        ov_unet.run(*inputs)
        for node in request.get_profiling_info():
            ms = node.real_time.total_seconds() * 1e3 / len(calls)
            label = node_label(node.node_type, node.node_name)
            per_node[label] += ms
            per_kernel[(label, node.exec_type)] += ms
            counts[(label, node.exec_type)] += 1
    print(f"{'node type':<40}{'kernel (exec_type)':<32}{'nodes':>7}{'ms/step':>10}{'%':>7}")
    total = sum(per_kernel.values())
    for (label, exec_type), ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{label:<40}{exec_type:<32}{counts[(label, exec_type)] // len(calls):>7}"
              f"{ms:>10.2f}{100 * ms / total:>7.1f}")
    return per_node, wall_ms, total


def summarize(per_op: dict, wall_ms: float, profiled_ms: float, args) -> dict:
    kinds = dict.fromkeys(KINDS, 0.0)
    for name, ms in per_op.items():
        kinds[kind_of(name)] += ms
    print(f"\n{args.mode}, {args.size}x{args.size}, {args.steps_profiled} UNet calls profiled "
          f"({torch.get_num_threads()} threads)")
    print(f"{'kind':<20}{'ms/step':>10}{'%':>7}")
    for kind, ms in kinds.items():
        print(f"{kind:<20}{ms:>10.2f}{100 * ms / profiled_ms:>7.1f}")
    print(f"{'total (profiled)':<20}{profiled_ms:>10.2f}\n{'wall per call':<20}{wall_ms:>10.2f}")
    return {"mode": args.mode, "size": args.size, "steps_profiled": args.steps_profiled, "tiny": args.tiny,
            "threads": torch.get_num_threads(), "ms_per_step": kinds, "total_ms_per_step": profiled_ms,
            "wall_ms_per_step": wall_ms, "by_op_ms_per_step": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--size", type=int, default=256, help="image height and width (default 256)")
    p.add_argument("--steps-profiled", type=int, default=5, help="UNet calls profiled (default 5)")
    add_model_options(p)
    p.add_argument("--json", type=Path, help="write the grouped summary here")
    args = p.parse_args(argv)
    if args.size % 8 or args.size <= 0:
        p.error("--size must be a positive multiple of 8")
    if args.steps_profiled < 1:
        p.error("--steps-profiled must be at least 1")
    folder = model_folder(args.cache_dir, args.tiny, args.seed, lambda m: print(m, file=sys.stderr))
    profiler = profile_openvino if args.mode.startswith("openvino") else profile_minisd
    summary = summarize(*profiler(args, folder), args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
