"""What each speed lever of minisd/fast.py buys: a CFG UNet step (and a VAE decode) of small-sd's
full architecture, with each lever alone, all of them, and none, alternated in one process.

    python tools/bench_levers.py                          # 256x256, fp32 and bf16, 1 thread
    python tools/bench_levers.py --size 512 --dtypes bf16 --repeats 9 --threads 2

The weights are random (seeded, N(0, 0.02): no denormals), built from `config.small_sd()`;
no diffusers is needed. Every variant shares the same weight tensors where it can, each
repetition times every variant once (in a rotating order) and the table shows medians and the
ratio to the textbook path ("none"). Each variant's output is compared with the textbook
path's before timing ("rel err": max |diff| / max |ref|). tools/bench.py compares whole images with
diffusers; this tool explains where the difference comes from.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from minisd.config import small_sd
from minisd.fast import SpeedLevers, apply_levers, channels_last_for, text_kv_cached
from minisd.unet import UNet2DConditionModel
from minisd.vae import AutoencoderKL

from bench_model import DTYPES  # the dtype names bench.py uses

NONE = SpeedLevers.none()
UNET_VARIANTS = {
    "none": NONE,
    "fused_qkv": dataclasses.replace(NONE, fused_qkv=True),
    "cached_cross_kv": dataclasses.replace(NONE, cached_cross_kv=True),
    "inplace_residuals": dataclasses.replace(NONE, inplace_residuals=True),
    "channels_last": dataclasses.replace(NONE, channels_last=True),
    "all (minisd's default)": SpeedLevers(),
}
VAE_VARIANTS = {name: UNET_VARIANTS[name] for name in ("none", "inplace_residuals", "channels_last",
                                                        "all (minisd's default)")}


def random_weights(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in module.state_dict().items()}


def build(cls, config, weights: dict, dtype: torch.dtype, channels_last: bool) -> torch.nn.Module:
    with torch.device("meta"):
        module = cls(config)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    module.load_state_dict({k: v.to(dtype=dtype, memory_format=layout if v.dim() == 4 else torch.contiguous_format)
                            for k, v in weights.items()}, assign=True)
    return module.eval().requires_grad_(False)


def variants(cls, config, table: dict[str, SpeedLevers], part: str, dtype: torch.dtype, seed: int):
    """One model per row of `table`, sharing weight tensors where the layout allows."""
    with torch.device("meta"):
        shapes = cls(config)
    weights, by_layout, models = random_weights(shapes, seed), {}, {}
    for name, levers in table.items():
        last = levers.layouts(torch.device("cpu"), dtype)[part]
        if last not in by_layout:  # channels-last weights are copies: make each layout once
            by_layout[last] = build(cls, config, weights, dtype, last).state_dict()
        models[name] = build(cls, config, by_layout[last], dtype, last)
        apply_levers(levers, models[name])
    return models


def unet_step(unet, x, context) -> torch.Tensor:
    with text_kv_cached(unet, context):  # once per generation, as in the pipeline
        return unet(x, 500, context)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def measure(dtype_name: str, size: int, repeats: int) -> list[tuple[str, float, float, float]]:
    dtype, config = DTYPES[dtype_name], small_sd()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    z = torch.randn(1, 4, size // 8, size // 8, generator=g).to(dtype)
    calls = {}  # row -> (the call, the row it is compared with)
    for name, unet in variants(UNet2DConditionModel, config["unet"], UNET_VARIANTS, "unet", dtype, 0).items():
        calls[f"UNet step, {name}"] = (lambda u=unet: unet_step(u, x, context)), "UNet step, none"
    for name, vae in variants(AutoencoderKL, config["vae"], VAE_VARIANTS, "vae", dtype, 2).items():
        calls[f"VAE decode, {name}"] = (lambda v=vae: v.decode(z)), "VAE decode, none"
    outputs = {name: call() for name, (call, _) in calls.items()}  # also the warm-up
    times = {name: [] for name in calls}
    for r in range(repeats):  # each repetition times every row once, in a rotating order
        names = list(calls)
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name][0]()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, (_, base) in calls.items():
        median = statistics.median(times[name])
        rows.append((name, median, median / statistics.median(times[base]), rel_err(outputs[name], outputs[base])))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier numbers)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"small-sd, {args.size}x{args.size}, CFG batch 2, {args.threads} thread(s), medians of {args.repeats}; "
          f"layout table: {channels_last_for(torch.device('cpu'), torch.float32)} (fp32), "
          f"{channels_last_for(torch.device('cpu'), torch.bfloat16)} (bf16)")
    for dtype_name in args.dtypes.split(","):
        print(f"\n{dtype_name:<38} {'ms':>8} {'vs none':>8} {'rel err':>9}")
        for name, seconds, ratio, err in measure(dtype_name, args.size, args.repeats):
            print(f"{name:<38} {seconds * 1000:8.0f} {ratio:8.3f} {err:9.1e}")


if __name__ == "__main__":
    main()
