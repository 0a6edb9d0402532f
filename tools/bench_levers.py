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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NONE = SpeedLevers.none()
UNET_VARIANTS = {
    "none": NONE,
    "fused_qkv": dataclasses.replace(NONE, fused_qkv=True),
    "cached_cross_kv": dataclasses.replace(NONE, cached_cross_kv=True),
    "channels_last": dataclasses.replace(NONE, channels_last=True),
    "all (minisd's default)": SpeedLevers(),
}


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


def unet_variants(dtype: torch.dtype, device: torch.device) -> dict[str, torch.nn.Module]:
    config = small_sd()["unet"]
    with torch.device("meta"):
        shapes = UNet2DConditionModel(config)
    weights = random_weights(shapes, 0)
    same_layout = {}  # channels-last weights are copies: make each layout once, share it
    variants = {}
    for name, levers in UNET_VARIANTS.items():
        last = levers.layouts(device, dtype)["unet"]
        if last not in same_layout:
            same_layout[last] = build(UNet2DConditionModel, config, weights, dtype, last).state_dict()
        unet = build(UNet2DConditionModel, config, same_layout[last], dtype, last)
        apply_levers(unet, levers)
        variants[name] = unet
    return variants


def time_unet(unet, x, context) -> float:
    with text_kv_cached(unet, context):  # once per generation, as in the pipeline: not timed
        start = time.perf_counter()
        unet(x, 500, context)
        return time.perf_counter() - start


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def measure(dtype_name: str, size: int, repeats: int) -> list[tuple[str, float, float, float]]:
    dtype, device = DTYPES[dtype_name], torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    unets = unet_variants(dtype, device)
    errors = {}
    reference = unets["none"](x, 500, context)
    for name, unet in unets.items():
        with text_kv_cached(unet, context):
            errors[name] = rel_err(unet(x, 500, context), reference)

    vae_config = small_sd()["vae"]
    with torch.device("meta"):
        vae_shapes = AutoencoderKL(vae_config)
    vae_weights = random_weights(vae_shapes, 2)
    vaes = {f"VAE decode, {layout}": build(AutoencoderKL, vae_config, vae_weights, dtype, layout == "channels_last")
            for layout in ("NCHW", "channels_last")}
    z = torch.randn(1, 4, size // 8, size // 8, generator=g).to(dtype)
    decoded = {name: vae.decode(z) for name, vae in vaes.items()}
    errors.update({name: rel_err(image, decoded["VAE decode, NCHW"]) for name, image in decoded.items()})
    calls = {**{f"UNet step, {n}": (lambda u=u: time_unet(u, x, context)) for n, u in unets.items()},
             **{n: (lambda v=v: _timed(v.decode, z)) for n, v in vaes.items()}}
    times = {name: [] for name in calls}
    for call in calls.values():  # warm-up: first calls allocate and pick kernels
        call()
    for r in range(repeats):
        names = list(calls)
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(calls[name]())
    rows = []
    for name, ts in times.items():
        base = times["UNet step, none"] if name.startswith("UNet") else times["VAE decode, NCHW"]
        err = errors[name.removeprefix("UNet step, ")]
        rows.append((name, statistics.median(ts), statistics.median(ts) / statistics.median(base), err))
    return rows


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
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
