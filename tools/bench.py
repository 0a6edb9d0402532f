"""Speed of minisd against diffusers on small-sd's full architecture, side by side.

    python tools/bench.py                                   # CPU: 256x256, 10 steps, 3 repeats
    python tools/bench.py --modes diffusers-fp32,minisd-fp32 --repeats 5 --json /tmp/bench.json
    python tools/bench.py --device cuda --size 512 --steps 25 --diffusers-compiled
    python tools/bench.py --tiny --size 64 --steps 2        # a smoke test of the tool itself
    python tools/bench.py --openvino                        # the defaults and OpenVINO bf16 and int8
    python tools/bench.py --modes diffusers-bf16,minisd-int8,openvino-int8 --repeats 2
    git worktree add /tmp/minisd-base HEAD~1 && python tools/bench.py --baseline /tmp/minisd-base
                                                            # a change's speed, before and after

Both libraries load the same folder of seeded random weights in small-sd's architecture
(tools/bench_model.py), run the same prompt, seed, size, steps and CFG scale, and each mode's
image is kept for a PSNR parity check at the end.

Modes are `LIB-DTYPE[-compiled]`: LIB is diffusers, minisd, baseline or openvino; DTYPE fp32,
bf16, fp16 or int8. int8 is the UNet in int8 (weights and activations, static scales) and
everything else in bf16, the text encoder as each library runs it: minisd-int8 (and
baseline-int8) is minisd's `quantize="int8"`, always compiled (`--minisd-compile`; no
`-compiled` suffix), and fails where that minisd has no `quantize=`.
  minisd    this checkout's minisd (the one Python imports here). `-compiled` passes
            `compile=` to `Pipeline.from_pretrained` (True: minisd picks the mode it measured
            best; `--minisd-compile MODE` names one).
  baseline  the same as minisd, but with the minisd package of another checkout, `--baseline
            PATH` (for example a `git worktree` of the commit before a change): the change's
            speed is measured before and after in one alternated run, against the same
            diffusers. Without --modes, --baseline adds `baseline-X` beside every default
            `minisd-X`; with --modes, name the baseline modes you want.
  diffusers `-compiled` is diffusers' strongest published recipe: fused QKV
            (`pipe.fuse_qkv_projections()`), channels_last UNet and VAE, the UNet under
            torch.compile (mode `reduce-overhead`, i.e. CUDA graphs, on a GPU; `default` on a CPU).
            Behind `--diffusers-compiled`, or name the mode in `--modes`.
  openvino  a peer, CPU only: diffusers' pipeline (torch fp32 text encoder, the same scheduler
            loop) with its UNet and VAE decoder converted to OpenVINO at the run's static shapes
            and compiled with the bf16 hint; openvino-bf16 and openvino-int8 (the UNet through
            nncf.quantize, calibrated on other prompts first). Conversion, calibration and
            compiling are its load time (tools/bench_openvino.py). An optional tool dependency:
            `pip install -c requirements-pins.txt openvino nncf`. Behind `--openvino`, or `--modes`.
No global inductor setting is changed, so no mode tunes the compiler for another.

How it measures: every mode runs in its own worker process, which times its load, its first
image (compiling, for a compiled mode) and then one image a repetition, each UNet step and
VAE decode inside it (tools/bench_worker.py). Alternation: the workers of a group are loaded
together and, for each repetition, each generates one image in turn (the order rotates every
repetition); the table shows medians over the repetitions. Groups (`--group-by`): `dtype`
(default on a CPU) holds at most three fp32 pipelines at once (about 12 GB at full size; five,
about 20 GB, with --baseline) and then the half-precision ones, the int8 modes with bf16 (their
ratios are against diffusers bf16; an openvino-int8 worker peaks near 8 GB while it loads);
each group has its own diffusers eager baseline, so the ratios that matter are alternated;
`none` (default on CUDA) alternates every mode; `mode` runs one mode at a time (least memory,
no alternation).
Achieved GFLOP/s compare with FLOPs counted on the model and a matrix-product peak measured
in the same run (tools/bench_model.py; int8 modes against both the int8 peak, torch._int_mm's,
and the bf16 one); the ratios and the parity thresholds are in
tools/bench_report.py. Exit status 1 when a parity check fails or a mode errors.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench_model import (DTYPES, GUIDANCE, PROMPT, SEED, add_model_options, count_flops, device_name,
                         int8_matmul_peak, matmul_peak, model_folder)
from bench_report import LIBS, print_table, summarize
from bench_worker import Worker, WorkerError

MODE_RE = re.compile(r"^(diffusers|minisd|baseline|openvino)-(fp32|bf16|fp16|int8)(-compiled)?$")
# What each library can run: openvino is the bf16 hint on a CPU; only minisd quantizes to int8
# in torch (diffusers' int8 would be a recipe of bench's, not the library's own way).
LIB_DTYPES = {"diffusers": ("fp32", "bf16", "fp16"), "minisd": ("fp32", "bf16", "fp16", "int8"),
              "baseline": ("fp32", "bf16", "fp16", "int8"), "openvino": ("bf16", "int8")}
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Mode:
    lib: str  # "diffusers", "minisd", "baseline" (minisd from --baseline) or "openvino"
    dtype: str  # "fp32", "bf16", "fp16", "int8"
    compiled: bool  # torch.compile: minisd-int8 always (implied, no suffix), openvino never

    @classmethod
    def parse(cls, name: str) -> "Mode":
        m = MODE_RE.match(name.strip())
        if not m:
            raise ValueError(f"bad mode {name!r}: expected LIB-DTYPE[-compiled], LIB diffusers|minisd|baseline|"
                             f"openvino, DTYPE fp32|bf16|fp16|int8")
        lib, dtype, compiled = m[1], m[2], bool(m[3])
        if dtype not in LIB_DTYPES[lib]:
            raise ValueError(f"bad mode {name!r}: {lib} runs {', '.join(LIB_DTYPES[lib])}")
        if compiled and (lib == "openvino" or dtype == "int8"):
            raise ValueError(f"bad mode {name!r}: openvino and int8 modes take no -compiled "
                             f"(OpenVINO compiles at load; minisd-int8 always compiles)")
        return cls(lib, dtype, compiled or (dtype == "int8" and lib != "openvino"))

    @property
    def name(self) -> str:
        return f"{self.lib}-{self.dtype}" + ("-compiled" if self.compiled and self.dtype != "int8" else "")

    @property
    def group(self) -> str:
        """The dtype group it alternates in: int8 modes run everything but the UNet in bf16 and
        are compared with diffusers bf16, so they go with bf16."""
        return "bf16" if self.dtype == "int8" else self.dtype

    def sort_key(self):  # running order: eager before compiled, fp32 first, int8 last, then LIBS' order
        return self.compiled, self.dtype != "fp32", self.dtype == "int8", LIBS.index(self.lib)


def default_modes(device: str, diffusers_compiled: bool, baseline: bool, openvino: bool = False) -> list[Mode]:
    half = "fp16" if device == "cuda" else "bf16"
    names = ["diffusers-fp32", "minisd-fp32", "minisd-fp32-compiled",
             f"diffusers-{half}", f"minisd-{half}", f"minisd-{half}-compiled"]
    if diffusers_compiled:
        names.append(f"diffusers-{half}-compiled")
    if baseline:
        names += [n.replace("minisd-", "baseline-") for n in names if n.startswith("minisd-")]
    if openvino:
        names += ["openvino-bf16", "openvino-int8"]
    return [Mode.parse(n) for n in names]


def worker_spec(mode: Mode, args, folder: Path) -> dict:
    """What a worker needs to know, as plain data (bench_worker's docstring says what each is)."""
    return {"mode": mode.name, "lib": "minisd" if mode.lib == "baseline" else mode.lib,
            "dtype": mode.dtype, "compiled": mode.compiled,
            "minisd_from": str(args.baseline) if mode.lib == "baseline" else None,
            "folder": str(folder), "device": args.device, "size": args.size, "steps": args.steps,
            "minisd_compile": args.minisd_compile, "minisd_in_process": args.minisd_in_process,
            "diffusers_compile_mode": args.diffusers_compile_mode,
            "compile_cache": None if args.warm_compile_cache else tempfile.mkdtemp(prefix="bench-inductor-")}


def run_group(modes: list[Mode], args, folder: Path, results: dict, deadline: float, save) -> None:
    """Load each mode and make its first image, then alternate repetitions across the group."""
    workers: dict[Mode, Worker] = {}
    try:
        for mode in modes:
            r = results[mode.name]
            if time.perf_counter() > deadline:
                r["error"] = "skipped: --time-limit reached"
                log(f"{mode.name}: {r['error']}")
                continue
            worker = Worker(worker_spec(mode, args, folder))
            try:
                log(f"{mode.name}: loading")
                worker.call("load")
                log(f"{mode.name}: first image")
                first = worker.call("first")
            except WorkerError as e:
                r["error"] = str(e)
                log(f"{mode.name}: FAILED\n{e}")
                worker.close()
                continue
            r["image"] = first.pop("image")
            r.update(first)
            log(f"{mode.name}: load {first['load_s']:.1f}s, first image {first['first_image_s']:.1f}s")
            workers[mode] = worker
            save()

        live = list(workers)
        last_rep_s = 0.0
        for rep in range(args.repeats):
            now = time.perf_counter()
            if rep > 0 and now + last_rep_s > deadline:
                log(f"--time-limit: stopping this group after {rep} repetition(s)")
                break
            order = live[rep % len(live):] + live[:rep % len(live)] if live else []
            for mode in order:
                time.sleep(0.2)  # let the last worker's threads go idle
                try:
                    out = workers[mode].call("rep")
                except WorkerError as e:
                    results[mode.name]["error"] = str(e)
                    log(f"{mode.name}: FAILED\n{e}")
                    live.remove(mode)
                    continue
                for key, value in out.items():
                    results[mode.name].setdefault(key + "_all", []).append(value)
                log(f"rep {rep + 1}/{args.repeats} {mode.name}: {out['e2e_s']:.2f} s/image, "
                    f"UNet {out['unet_s'] * 1e3:.0f} ms, VAE {out['vae_s'] * 1e3:.0f} ms")
            last_rep_s = time.perf_counter() - now
            save()
    finally:
        for mode, worker in workers.items():
            results[mode.name].update(worker.close())


def group_modes(modes: list[Mode], group_by: str) -> list[list[Mode]]:
    if group_by == "none":
        return [sorted(modes, key=Mode.sort_key)]
    if group_by == "mode":
        return [[m] for m in sorted(modes, key=Mode.sort_key)]
    groups = sorted({m.group for m in modes}, key=list(DTYPES).index)  # fp32 first
    return [sorted((m for m in modes if m.group == g), key=Mode.sort_key) for g in groups]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", type=int, default=256, help="image height and width (default 256)")
    p.add_argument("--steps", type=int, default=10, help="DPM-Solver++ steps (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per mode (default 3)")
    p.add_argument("--modes", help="comma-separated LIB-DTYPE[-compiled]: LIB diffusers, minisd, baseline, "
                   "openvino; DTYPE fp32, bf16, fp16, int8 (default: see the docstring)")
    p.add_argument("--baseline", type=Path, metavar="PATH",
                   help="another minisd checkout, run as the baseline-* modes (before/after a change)")
    p.add_argument("--diffusers-compiled", action="store_true",
                   help="add diffusers' compiled half-precision mode to the default modes")
    p.add_argument("--openvino", action="store_true",
                   help="add openvino-bf16 and openvino-int8 to the default modes (needs openvino and nncf)")
    p.add_argument("--minisd-compile", default="auto",
                   help="compile= for minisd's compiled modes and minisd-int8: auto (True) or a torch.compile mode")
    p.add_argument("--minisd-in-process", action="store_true",
                   help="minisd's compiled and int8 modes compile in their worker (compile_cache=False) instead "
                        "of through the compiled-UNet package cache: what a process that compiles once and runs "
                        "on gets (the package, loaded with its weights aligned, should run as fast: "
                        "docs/cpu-floor.md)")
    p.add_argument("--diffusers-compile-mode", help="torch.compile mode of diffusers' compiled modes "
                   "(default: reduce-overhead on cuda, default on cpu)")
    p.add_argument("--group-by", choices=["dtype", "none", "mode"],
                   help="which modes are loaded and alternated together (default: dtype on cpu, none on cuda)")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="use inductor's usual on-disk cache and minisd's compiled-UNet packages (default: empty "
                        "ones per mode: cold compile times)")
    p.add_argument("--time-limit", type=float, help="seconds: stop repeating (and skip modes not yet "
                   "started) past this; at least one repetition of each started mode runs")
    add_model_options(p)
    p.add_argument("--json", type=Path, help="write every number here (updated as the run goes)")
    args = p.parse_args(argv)

    if args.size % 8 or args.size <= 0:
        p.error("--size must be a positive multiple of 8")
    try:
        modes = ([Mode.parse(m) for m in args.modes.split(",") if m.strip()] if args.modes
                 else default_modes(args.device, args.diffusers_compiled, args.baseline is not None, args.openvino))
    except ValueError as e:
        p.error(str(e))
    modes = list(dict.fromkeys(modes))
    if args.device != "cpu" and any(m.lib == "openvino" for m in modes):
        p.error("openvino modes run on the CPU only (--device cpu)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.baseline is not None:
        args.baseline = args.baseline.expanduser().resolve()
        if not (args.baseline / "minisd" / "__init__.py").is_file():
            p.error(f"--baseline: {args.baseline} is not a minisd checkout (no minisd/__init__.py)")
        if not any(m.lib == "baseline" for m in modes):
            p.error("--baseline: --modes names no baseline-* mode (baseline-fp32, ...)")
    elif any(m.lib == "baseline" for m in modes):
        p.error("baseline modes need --baseline PATH")
    args.minisd_compile = True if args.minisd_compile == "auto" else args.minisd_compile
    args.diffusers_compile_mode = args.diffusers_compile_mode or (
        "reduce-overhead" if args.device == "cuda" else "default")
    args.group_by = args.group_by or ("none" if args.device == "cuda" else "dtype")
    for key, value in {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)  # the workers inherit these

    import minisd  # here, not at the top: every worker re-imports this file, and a baseline worker imports its own

    folder = model_folder(args.cache_dir, args.tiny, args.seed, log)
    device = torch.device(args.device)
    flops = count_flops(folder, args.size)
    peaks, peak_samples = {}, {}

    # int8 modes are shown against the int8 peak and the bf16 one (the rest of them is bf16).
    peak_dtypes = {m.dtype for m in modes} | {m.group for m in modes}

    def measure_peaks():  # before and after each group; the best counts (a shared CPU varies)
        for dtype in sorted(peak_dtypes, key=[*DTYPES, "int8"].index):
            gflops = int8_matmul_peak(device) if dtype == "int8" else matmul_peak(device, DTYPES[dtype])
            if gflops is None:
                log(f"matmul peak {dtype}: torch._int_mm does not run here; int8 modes' %peak is against bf16")
                continue
            peak_samples.setdefault(dtype, []).append(gflops)
            peaks[dtype] = max(peak_samples[dtype])
            log(f"matmul peak {dtype}: {gflops:.0f} G{'OP' if dtype == 'int8' else 'FLOP'}/s")

    measure_peaks()
    meta = {"device": args.device, "device_name": device_name(device), "size": args.size, "steps": args.steps,
            "guidance_scale": GUIDANCE, "repeats": args.repeats, "prompt": PROMPT, "seed": SEED,
            "model": str(folder), "tiny": args.tiny, "group_by": args.group_by,
            "torch": torch.__version__, "diffusers": _version("diffusers"),
            "transformers": _version("transformers"), "minisd": minisd.__version__,
            "minisd_path": str(Path(minisd.__file__).parent), "baseline": _describe(args.baseline),
            "python": platform.python_version(), "flops": flops, "matmul_peak_gflops": peaks,
            "matmul_peak_samples": peak_samples}
    results = {m.name: {"lib": m.lib, "dtype": m.dtype, "compiled": m.compiled}
               for m in sorted(modes, key=Mode.sort_key)}

    def save(summary=None):
        if args.json:
            summary = summary or summarize(results, flops, peaks, args.steps)
            payload = {"meta": meta, "summary": summary,
                       "modes": {n: {k: v for k, v in r.items() if k != "image"} for n, r in results.items()}}
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(_finite(payload), indent=2, allow_nan=False, default=str) + "\n")
            tmp.replace(args.json)

    deadline = START + args.time_limit if args.time_limit else math.inf
    groups = group_modes(modes, args.group_by)
    for i, group in enumerate(groups):
        now = time.perf_counter()
        share = now + (deadline - now) / (len(groups) - i)  # the time left, split over the groups left
        log(f"group {i + 1}/{len(groups)}: {', '.join(m.name for m in group)}")
        run_group(group, args, folder, results, share, save)
        measure_peaks()

    summary = summarize(results, flops, peaks, args.steps)
    save(summary)
    print_table(results, summary, meta)
    failed = any("error" in r for r in results.values()) or not all(c["ok"] for c in summary["parity"])
    return 1 if failed else 0


def _finite(obj):
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _describe(checkout: Path | None) -> str | None:
    """A checkout as 'PATH (commit abc1234)', the commit as git says (plus '-dirty' if changed)."""
    if checkout is None:
        return None
    try:
        commit = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(checkout)
    return f"{checkout} (commit {commit})"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
