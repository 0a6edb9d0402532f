"""What compiling costs a user: load + first image, then a second image, in two fresh processes
one after the other with the same on-disk compile caches (the first process starts them empty):
minisd's package cache of compiled UNets and VAE decoders (minisd/compile_cache.py) and
Inductor's own.

    python tools/first_image.py --compile                    # small-sd's shapes, bf16, 256x256
    python tools/first_image.py --compile --int8
    python tools/first_image.py --tiny --size 64 --steps 2   # a smoke test of the tool

The first process pays the whole compile (and, for --int8, the calibration); the second loads
the compiled UNet and VAE decoder from the package cache (with --int8 after running the
calibration generations again, which the package's key holds). The model is
tools/bench_model.py's random small-sd folder (or the tiny one).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_model import add_model_options, model_folder


def one_process(args) -> dict:
    """Runs in the child: load, first image, second image, timed."""
    import torch

    from minisd import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.folder, dtype=getattr(torch, args.dtype), safety_checker=None,
                                    compile=args.compile, quantize="int8" if args.int8 else None)
    times = {"load_s": time.perf_counter() - start}
    for key, seed in (("first_image_s", 0), ("second_image_s", 1)):
        start = time.perf_counter()
        pipe("a photograph of an astronaut riding a horse", height=args.size, width=args.size,
             num_inference_steps=args.steps, generator=torch.Generator().manual_seed(seed), output_type="np")
        times[key] = time.perf_counter() - start
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--int8", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    add_model_options(p)
    p.add_argument("--compile-cache", type=Path, help="a folder for both caches (default: a new, empty one)")
    p.add_argument("--processes", type=int, default=2, help="fresh processes, one after the other (default 2)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.folder = args.child
        print(json.dumps(one_process(args)))
        return 0

    folder = model_folder(args.cache_dir, args.tiny, args.seed)
    cache = Path(args.compile_cache or tempfile.mkdtemp(prefix="first-image-cache-"))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), MINISD_COMPILE_CACHE=str(cache / "minisd"))
    flags = [f for f, on in (("--compile", args.compile), ("--int8", args.int8)) if on]
    command = [sys.executable, __file__, "--child", str(folder), "--dtype", args.dtype, "--size", str(args.size),
               "--steps", str(args.steps), *flags]
    print(f"{' '.join(flags) or 'eager'}, {args.dtype}, {args.size}x{args.size}, {args.steps} steps; "
          f"compile caches in {cache}")
    names = ["given cache" if args.compile_cache else "cold cache"] + ["warm cache"] * (args.processes - 1)
    for name in names:
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        t = json.loads(out.stdout.strip().splitlines()[-1])
        packaged = sum(f.stat().st_size for f in (cache / "minisd").glob("*.pt2"))
        print(f"{name}: load {t['load_s']:.1f} s, first image {t['first_image_s']:.1f} s, "
              f"second image {t['second_image_s']:.1f} s; packages {packaged / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
