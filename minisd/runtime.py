"""Guards and feedback around a generation, kept out of the pipeline's story: device and dtype
checks, seeded noise, NaN/inf checks, a memory check before allocating, and the progress bar.

Each guard turns a failure that torch would report late, deep or not at all (a black image
from a NaN, a machine swapping to a halt, a silent minute) into a clear message or a line
on stderr.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from .errors import InputError, MinisdError, ResourceError

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_device(device, argument: str = "device") -> torch.device:
    """A device this machine has, as a torch.device; refused before anything is loaded or moved
    (torch would fail later and deeper, with an AssertionError or a RuntimeError)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"{argument}: {device!r:.80} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    backend = getattr(torch, device.type, None)  # torch.cpu, torch.cuda, torch.mps, torch.xpu
    if not (hasattr(backend, "is_available") and backend.is_available()):
        raise InputError(f"{argument}: {str(device)!r} is not available on this machine (or this torch build); "
                         "try cpu")
    if device.index is not None and hasattr(backend, "device_count") and device.index >= backend.device_count():
        raise InputError(f"{argument}: {str(device)!r}: this machine has {backend.device_count()} "
                         f"{device.type} device(s)")
    return device


def check_dtype(dtype, argument: str = "dtype") -> torch.dtype:
    """A floating-point torch dtype the models can run in."""
    if dtype not in FLOAT_DTYPES:
        raise InputError(f"{argument}: expected one of torch.float32, torch.float16, torch.bfloat16, "
                         f"got {dtype!r:.80}")
    return dtype


def text_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The text encoder's dtype in a pipeline of `dtype`. bfloat16 keeps 8 bits of mantissa:
    fine for the UNet's many steps, but the text context is computed once and steers all of
    them, so the encoder stays in float32."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def check_generators(generator, n: int) -> None:
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    if not all(g is None or isinstance(g, torch.Generator) for g in generators):
        raise InputError(f"generator: expected a torch.Generator or a list of them, got {generator!r:.80}")
    if isinstance(generator, (list, tuple)) and len(generator) != n:
        raise InputError(f"generator: a list of {len(generator)} generators for {n} images")


def draw_noise(shape: tuple[int, ...], generator) -> torch.Tensor:
    """Standard normal noise in float32, drawn on the generator's device (the CPU by default),
    so a seed gives the same noise, and so the same image, on any device. With a list of
    generators, one draw per image, each from its own generator: image i depends on seed i only."""
    check_generators(generator, shape[0])
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
    return torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")


def check_finite(tensor: torch.Tensor, what: str, likely_cause: str) -> None:
    """Never hand back a silently black or grey image: NaN/inf stops the run, saying where."""
    if not torch.isfinite(tensor).all():
        raise MinisdError(f"{what} contains NaN or infinity ({likely_cause}); "
                          "try dtype=torch.float32 (--dtype float32), or re-download the checkpoint")


def estimated_peak_bytes(n: int, height: int, width: int, itemsize: int) -> int:
    """A deliberately rough upper estimate of the activations one generation needs: the VAE
    decoder's last blocks (up to 256 channels, a few buffers, at full resolution, one image at
    a time) and the UNet's (320 channels at 1/8 resolution, CFG batch, a dozen buffers)."""
    vae = height * width * 256 * 4 * itemsize
    unet = 2 * n * (height // 8) * (width // 8) * 320 * 12 * itemsize
    return vae + unet


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`; None where that cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None  # unknown: don't guess


def check_memory(n: int, height: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a size that cannot fit before allocating anything, rather than swapping the
    machine to a halt or dying mid-run."""
    need = estimated_peak_bytes(n, height, width, torch.finfo(dtype).bits // 8)
    have = available_memory(device)
    if have is not None and need > have:
        raise ResourceError(f"{n} image(s) of {width}x{height} need about {need / 2**30:.1f} GiB, but "
                            f"{device} has {have / 2**30:.1f} GiB available; choose a smaller size or fewer images")


class ProgressBar:
    """A one-line progress bar on stderr, with no dependency:

        unet 1200/6000 [######........................] loss 0.0412, 1.4s, 0.12s/step, eta 9.6min

    On a terminal it is redrawn in place; into a file or pipe it writes a line at most every
    `min_interval` seconds (and always the last), so a log of a two-hour run stays readable.
    `update(**values)` shows numbers beside it (`loss 0.0412`)."""

    def __init__(self, total: int, label: str = "", done: int = 0, enabled: bool = True,
                 stream=None, min_interval: float = 0.0, unit: str = "step"):
        self.total, self.label, self.done, self.enabled, self.unit = total, label, done, enabled, unit
        self.stream = sys.stderr if stream is None else stream
        self.in_place = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        self.min_interval, self.first = min_interval, done
        self.start = self.last_drawn = time.perf_counter()
        self.drawn = False

    def update(self, done: int | None = None, **values: float) -> None:
        self.done = self.done + 1 if done is None else done
        now = time.perf_counter()
        finished = self.done >= self.total
        if not self.enabled or (not self.in_place and not finished and now - self.last_drawn < self.min_interval
                                and self.drawn):
            return
        self.last_drawn, self.drawn = now, True
        elapsed = now - self.start
        per_step = elapsed / max(self.done - self.first, 1)
        filled = int(30 * self.done / max(self.total, 1))
        numbers = "".join(f" {name} {value:.4g}," for name, value in values.items())
        line = (f"{self.label + ' ' if self.label else ''}{self.done:3d}/{self.total} "
                f"[{'#' * filled}{'.' * (30 - filled)}]{numbers} {elapsed:5.1f}s, {per_step:.2f}s/{self.unit}, "
                f"eta {_duration(per_step * (self.total - self.done))}")
        self.stream.write(f"\r{line}" if self.in_place else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line (also on Ctrl-C, so a message after it starts on a fresh line)."""
        if self.enabled and self.in_place and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.0f}min"


def check_numbers(guidance, per_prompt, guidance_rescale, output_type) -> None:
    """The pipeline's numeric arguments and output type."""
    for name, value in (("guidance_scale", guidance), ("guidance_rescale", guidance_rescale)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise InputError(f"{name}: must be a finite number, got {value!r}")
    if not 0 <= guidance_rescale <= 1:  # a blend weight (arXiv 2305.08891, section 3.4)
        raise InputError(f"guidance_rescale: must lie in [0, 1] (0.7 is typical), got {guidance_rescale!r}")
    if not isinstance(per_prompt, int) or isinstance(per_prompt, bool) or per_prompt < 1:
        raise InputError(f"num_images_per_prompt: must be a positive integer, got {per_prompt!r}")
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type: must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
