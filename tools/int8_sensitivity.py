"""Where int8's error comes from: the UNet quantized with one group of its layers left in
float at a time, each variant's error measured against the float32 pipeline.

    python tools/int8_sensitivity.py                      # small-sd's shapes, 256x256
    python tools/int8_sensitivity.py --tiny --size 64     # a smoke test
    python tools/int8_sensitivity.py --groups "none,up blocks" --images --json out.json

The model is tools/bench.py's (random small-sd weights, bench_model.py) in float32. The
pipeline's own int8 calibration runs once (minisd/int8.py: its four generations, 16 observed
UNet calls); then, per group, PT2E's steps 1-4 (export, prepare, calibrate, convert) with the
x86 quantizer told to leave that group in float: its convolutions and linears by module name
(`set_module_name_qconfig(name, None)`, what nncf calls an ignored scope), or for "GEGLU
products" the tensor products the quantizer gives int8 inputs by default
(`set_function_type_qconfig(torch.mul, None)`). Measured per variant:
- UNet SQNR: 10 log10(|ref|^2 / |int8 - ref|^2) of the noise prediction against the float32
  UNet, on --sqnr-calls of the UNet inputs of the bench's own generation (prompt, seed, CFG
  7.5), spread from its first step to its last;
- image PSNR (with --images, a generation per variant): the bench's 10-step generation with
  that int8 UNet against the float32 pipeline's, as tools/bench.py measures int8;
- the share of the UNet's FLOPs left in float (what the group would cost in speed);
- with --float-first K,...: the image PSNR again with the generation's first K steps run by
  the float UNet (the high-noise steps, where the UNet's int8 error is largest), per K.
By default: everything int8, the GEGLU products, and one group per part of a partition of
the UNet's convolutions and linears (so that their errors add up roughly).
The int8 graphs run as PT2E's reference (eager quantize/dequantize around float kernels, float32
activations): the same int8 grid as the compiled oneDNN kernels, without bfloat16's own error
(44 dB in the bench), so these isolate the quantization. About 2 minutes per group at
small-sd's shapes on 2 cores, plus 4 for the reference and calibration generations.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_model import GUIDANCE, PROMPT, SEED, add_model_options, model_folder
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Groups of the UNet's layers by the module names minisd's UNet shares with diffusers'.
GROUPS = {
    "none": None,  # everything int8: what quantize="int8" does
    "conv_in/out": r"^conv_(in|out)$",
    "time embeddings": r"time_embedding|time_emb_proj",
    "resnet convolutions": r"resnets\.\d+\.(conv1|conv2|conv_shortcut)$",
    "down/upsamplers": r"(down|up)samplers",
    "transformer linears": r"attn[12]\.|\.ff\.|proj_(in|out)$",
    "attention projections": r"attn[12]\.",
    "feed-forward": r"\.ff\.",
    "transformer proj_in/out": r"proj_(in|out)$",
    "GEGLU products": "mul",  # not a layer: the feed-forward's gate product, int8 inputs by default
    "down blocks": r"^down_blocks\.",
    "mid block": r"^mid_block\.",
    "up blocks": r"^up_blocks\.",
}
DEFAULT_GROUPS = ("none", "GEGLU products", "conv_in/out", "time embeddings", "resnet convolutions",
                  "down/upsamplers", "transformer linears")
QUANTIZED = (nn.Conv2d, nn.Linear)


def layers_in(unet: nn.Module, pattern: str | None) -> list[str]:
    """Names of the UNet's convolutions and linears that `pattern` matches."""
    if pattern in (None, "mul"):
        return []
    return [name for name, m in unet.named_modules() if isinstance(m, QUANTIZED) and re.search(pattern, name)]


def flop_shares(unet: nn.Module, example: tuple) -> dict[str, float]:
    """Each convolution's and linear's share of the UNet's FLOPs, by module name."""
    flops: dict[str, float] = {}
    hooks = []
    for name, m in unet.named_modules():
        if isinstance(m, QUANTIZED):
            def count(module, inputs, output, name=name):
                with FlopCounterMode(display=False) as c:
                    type(module).forward(module, *inputs)
                flops[name] = flops.get(name, 0) + c.get_total_flops()
            hooks.append(m.register_forward_hook(count))
    with torch.no_grad():
        unet(*example)
    for h in hooks:
        h.remove()
    with torch.no_grad(), FlopCounterMode(display=False) as total:  # apart: it would count the hooks' runs too
        unet(*example)
    return {name: f / total.get_total_flops() for name, f in flops.items()}


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (out.double() - ref.double()).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.double().pow(2).sum().item() / noise)


def image_of(pipe, size: int, steps: int) -> np.ndarray:
    return pipe(PROMPT, size, size, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np",
                generator=torch.Generator().manual_seed(SEED)).images[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--groups", default=",".join(DEFAULT_GROUPS),
                   help=f"comma-separated names of groups (default: a partition); known: {', '.join(GROUPS)}")
    p.add_argument("--sqnr-calls", type=int, default=3, help="recorded UNet calls the SQNR is taken over, "
                   "spread over the steps (default 3)")
    p.add_argument("--images", action="store_true", help="also the image PSNR of each variant (a generation each)")
    p.add_argument("--float-first", default="0", help="with --images: comma-separated step counts K, an "
                   "image each with the first K steps in float (default 0)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",")]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        p.error(f"unknown group(s) {unknown}; known: {list(GROUPS)}")
    try:
        float_first = [int(k) for k in args.float_first.split(",")]
    except ValueError:
        p.error(f"--float-first: comma-separated whole numbers of steps, got {args.float_first!r}")
    if not all(0 <= k <= args.steps for k in float_first):
        p.error(f"--float-first: step counts from 0 to --steps ({args.steps}), got {args.float_first!r}")

    from bench_report import psnr
    from minisd import Pipeline
    from minisd.int8 import Int8UNet, calibrate_int8, default_quantizer, fit_record, quantized_graph

    torch.manual_seed(0)
    folder = model_folder(args.cache_dir, args.tiny, args.seed)
    pipe = Pipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None)
    float_unet = pipe.unet
    records: list[tuple] = []
    hook = float_unet.register_forward_pre_hook(lambda _, inputs: records.append(tuple(a.detach() for a in inputs)))
    reference_image = image_of(pipe, args.size, args.steps)
    hook.remove()
    records = [records[i] for i in np.linspace(0, len(records) - 1, args.sqnr_calls).round().astype(int)]
    with torch.no_grad():
        reference_out = [float_unet(*r) for r in records]

    int8 = Int8UNet(float_unet, cache=False)
    pipe.unet = int8
    start = time.perf_counter()
    calibrate_int8(pipe, args.size, args.size)
    print(f"calibrated in {time.perf_counter() - start:.0f} s", flush=True)
    pipe.unet = float_unet
    x, t, context = records[0]
    example = (x.float().contiguous(), torch.as_tensor(t).contiguous(), context.float().contiguous())
    calibration = [fit_record(r, i, x.shape[0], example[1], context.shape[1])
                   for i, r in enumerate(int8.records_for(x.shape[-2:]))]
    source = int8.float32_source()
    shares = flop_shares(source, example)

    prepare, convert, _ = int8._pt2e
    rows = []
    for group in groups:
        kept = layers_in(source, GROUPS[group])
        quantizer = default_quantizer()
        for name in kept:
            quantizer.set_module_name_qconfig(name, None)
        if GROUPS[group] == "mul":  # the x86 quantizer gives tensor products int8 inputs by default
            quantizer.set_function_type_qconfig(torch.mul, None)
        start = time.perf_counter()
        graph = quantized_graph((prepare, convert, quantizer), source, example, calibration)
        with torch.no_grad():
            sqnr = [sqnr_db(ref, graph(*r)) for r, ref in zip(records, reference_out)]
        row = {"group": group, "layers_in_float": len(kept), "flops_in_float": sum(shares.get(n, 0) for n in kept),
               "unet_sqnr_db": float(np.mean(sqnr)), "unet_sqnr_db_last_call": sqnr[-1]}
        if args.images:
            pipe.scheduler.set_timesteps(args.steps)
            schedule = [float(t) for t in pipe.scheduler.timesteps]
            for k in float_first:
                pipe.unet = GraphAsUNet(graph, float_unet, float_from=schedule[k - 1] if k else math.inf)
                label = "image_psnr_db" if k == 0 else f"image_psnr_db_first_{k}_float"
                row[label] = psnr(image_of(pipe, args.size, args.steps), reference_image)
                pipe.unet = float_unet
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"{group:32s} float layers {row['layers_in_float']:3d} ({100 * row['flops_in_float']:5.1f}% of FLOPs)  "
              f"UNet SQNR {row['unet_sqnr_db']:5.1f} dB (last call {sqnr[-1]:5.1f})"
              + "".join(f"  {k.replace('image_psnr_db', 'image PSNR')} {v:5.1f} dB"
                        for k, v in row.items() if k.startswith("image_psnr"))
              + f"  [{row['seconds']:.0f} s]", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "tiny": args.tiny, "rows": rows}, indent=2) + "\n")
    return 0


class GraphAsUNet:
    """A PT2E graph called as the pipeline calls its UNet; every other attribute the float UNet's.
    Timesteps at or above `float_from` go to the float UNet instead."""

    def __init__(self, graph, unet, float_from: float = math.inf):
        self.graph, self.unet, self.float_from = graph, unet, float_from

    def __getattr__(self, name):
        return getattr(self.__dict__["unet"], name)

    def __call__(self, x, t, context):
        with torch.no_grad():
            if float(torch.as_tensor(t).max()) >= self.float_from:
                return self.unet(x, t, context)
            return self.graph(x.contiguous(), torch.as_tensor(t).contiguous(), context.contiguous())


if __name__ == "__main__":
    sys.exit(main())
