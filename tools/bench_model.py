"""What tools/bench.py runs, and what it measures the runs against: the random small-sd
pipeline folder, the workload every mode runs, the FLOPs of that workload, the machine's
matrix-product peak.

The model is small-sd's exact architecture with seeded random weights
(make_tiny_checkpoint.randomize_), built once and saved in the current diffusers format under
`.cache/bench-small-sd/` (about 3.4 GB; reused while its `bench-model.json` matches), or
make_tiny_checkpoint's tiny model under `.cache/bench-tiny/`. Every mode loads that same
folder and runs the same prompt, seed, size, steps and CFG scale.

FLOPs: torch.utils.flop_counter on minisd's fp32 UNet and VAE decoder built on the meta device
(shapes only, attention included; counting a real CPU run misses the attention inside SDPA's
fused CPU kernel). The text encoder (~1% of an image) is not counted. The count is the
reference's work: cross-attention K/V projected at every step (minisd projects them once per
image, 3.8 GFLOP a step less: 1.6% at 256x256).

The matrix-product peak is the best of a few 4096^3 products on a CPU (8192^3 on CUDA) in each
dtype; bench.py measures it before and after every group and keeps the best. On CUDA, fp32
convolutions use TF32 by PyTorch's default while the fp32 peak is a true fp32 product, so fp32
modes can show over 100% of it. The int8 peak (for the int8 modes) is torch._int_mm's, int8 x
int8 -> int32, counted as 2*M*N*K operations like a float product; None where torch has no
int8 product for the device.
"""
from __future__ import annotations

import json
import multiprocessing
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import make_tiny_checkpoint as mtc

PROMPT = "a photograph of an astronaut riding a horse"
SEED = 0
GUIDANCE = 7.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_folder(cache_dir: Path, tiny: bool, seed: int, log=print) -> Path:
    """The random pipeline folder, built (in a subprocess, so its memory goes back) if missing."""
    folder = cache_dir / ("bench-tiny" if tiny else "bench-small-sd")
    # small-sd's full shapes; the safety checker stays tiny (never run here).
    full = {k: v for k, v in mtc.SMALL_SD.items() if k != "safety_checker"}
    want = {"configs": {} if tiny else full, "seed": seed, "format": "current"}
    marker = folder / "bench-model.json"
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(want)):
        return folder
    log(f"building {'tiny' if tiny else 'full-size small-sd'} random pipeline in {folder} (once)")
    proc = multiprocessing.get_context("spawn").Process(target=_build_model, args=(folder, want))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        sys.exit(f"bench: building the model failed (exit code {proc.exitcode})")
    return folder


def _build_model(folder: Path, want: dict) -> None:
    # Imported here, in the builder's own process: every worker re-imports this module (through
    # bench.py), and a minisd worker must not carry diffusers.
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
    components = mtc.build_components(want["seed"], **want["configs"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    mtc.write_current(components, tmp)
    (tmp / "bench-model.json").write_text(json.dumps(want, indent=2) + "\n")
    tmp.rename(folder)


def count_flops(folder: Path, size: int) -> dict[str, float]:
    """FLOPs of one CFG UNet step (batch 2) and one VAE decode (batch 1), minisd fp32 on meta."""
    # minisd is imported here, not at the top: every worker re-imports this module (through
    # bench.py), and a baseline worker must find minisd in --baseline, not in this checkout.
    from minisd.checkpoint import read_config
    from minisd.config import UNetConfig, VAEConfig
    from minisd.unet import UNet2DConditionModel
    from minisd.vae import AutoencoderKL

    uc = UNetConfig.from_dict(read_config(folder, "unet"))
    vc = VAEConfig.from_dict(read_config(folder, "vae"))
    h = size // vc.downscale_factor
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(uc), AutoencoderKL(vc)
        latents = torch.empty(2, uc.in_channels, h, h)
        context = torch.empty(2, 77, uc.cross_attention_dim)
        with FlopCounterMode(display=False) as unet_count:
            unet(latents, torch.tensor(500.0), context)
        with FlopCounterMode(display=False) as vae_count:
            vae.decode(torch.empty(1, vc.latent_channels, h, h))
    return {"unet_step": unet_count.get_total_flops(), "vae_decode": vae_count.get_total_flops()}


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best GFLOP/s of a large square matrix product in `dtype`."""
    n, tries = (8192, 10) if device.type == "cuda" else (4096, 3)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    (a @ b).sum().item()  # warm-up
    rate = best_rate(device, lambda: a @ b, 2 * n ** 3, tries)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU's memory to the workers
    return rate


def int8_matmul_peak(device: torch.device) -> float | None:
    """Best GOP/s of torch._int_mm on 4096^3 int8 matrices (int32 out), or None where it cannot
    run: a private op, so its absence or refusal is expected, not an error."""
    n, tries = 4096, 3
    g = torch.Generator().manual_seed(0)
    try:
        a, b = (torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8).to(device) for _ in range(2))
        torch._int_mm(a, b).sum().item()  # warm-up, and the check that it runs here at all
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return best_rate(device, lambda: torch._int_mm(a, b), 2 * n ** 3, tries)


def best_rate(device: torch.device, fn, operations: int, tries: int) -> float:
    """Giga-operations per second of the fastest of `tries` calls of fn."""
    best = min(timed(device, fn)[0] for _ in range(tries))
    return operations / best / 1e9


def add_model_options(parser) -> None:
    """The options that choose the random model folder (model_folder's arguments)."""
    parser.add_argument("--tiny", action="store_true", help="make_tiny_checkpoint's tiny model instead of small-sd")
    parser.add_argument("--seed", type=int, default=0, help="weights seed of the random model")
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parents[1] / ".cache")


def timed(device: torch.device, fn):
    """(seconds, fn()): the wall clock around fn, with the device's queued work waited for."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", cpuinfo)[1]
    except (OSError, TypeError):
        model = platform.processor() or "CPU"
    return f"{model}, {torch.get_num_threads()} threads"
