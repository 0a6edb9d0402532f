"""Text-to-image: the only file that knows the order in which the components run.

    prompt -> tokenizer -> text encoder -> context            (once per generation)
    noise  -> [UNet(latents, t, context) with CFG -> DPM-Solver++ step] x steps -> latents
    latents / scaling_factor -> VAE decoder -> image -> safety checker -> image or black

Argument names follow diffusers' `StableDiffusionPipeline.__call__`, so switching is a
rename of the import. Follows
https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint import find_model_folder, read_model_index
from .clip import CLIPTextModel, load_text_encoder
from .dpm_solver import DPMSolverMultistep, load_scheduler
from .errors import CheckpointError, InputError, MinisdError, ResourceError
from .safety import load_safety_checker
from .tokenizer import CLIPTokenizer, load_tokenizer
from .unet import UNet2DConditionModel, load_unet
from .vae import AutoencoderKL, load_vae

log = logging.getLogger("minisd")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, np [B,H,W,3] in [0,1], torch [B,3,H,W] in [0,1], or latents
    nsfw_content_detected: list[bool] | None  # None when no safety checker ran


class Pipeline:
    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
                 vae: AutoencoderKL, scheduler: DPMSolverMultistep, safety_checker=None, name: str = "minisd"):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler, self.safety_checker, self.name = scheduler, safety_checker, name
        problems = []
        if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
            problems.append(f"text_encoder hidden_size {text_encoder.config.hidden_size} != "
                            f"unet cross_attention_dim {unet.config.cross_attention_dim}")
        if vae.config.latent_channels != unet.config.in_channels:
            problems.append(f"vae latent_channels {vae.config.latent_channels} != unet in_channels "
                            f"{unet.config.in_channels}")
        if problems:
            raise CheckpointError(f"{name}: components do not fit together: {'; '.join(problems)}")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, variant: str | None = None,
                        compile: bool | str = False, **components) -> "Pipeline":
        """Load every component of a diffusers pipeline folder. Pass a component by keyword
        (`safety_checker=None`, `unet=my_unet`) to use it instead of the folder's.
        `compile=True` (or a torch.compile mode) compiles the UNet and VAE decoder; see `compile`."""
        folder = find_model_folder(folder)
        # bfloat16 keeps 8 bits of mantissa: fine for the UNet's many steps, but the text
        # context is computed once and steers all of them, so the encoder stays in float32.
        text_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        channels_last = channels_last_for(torch.device(device), dtype)
        loaders = {"tokenizer": (load_tokenizer, None), "text_encoder": (load_text_encoder, text_dtype),
                   "unet": (load_unet, dtype), "vae": (load_vae, dtype), "scheduler": (load_scheduler, None)}
        parts = {}
        for name, (load, part_dtype) in loaders.items():
            if name in components:
                parts[name] = components.pop(name)
            elif part_dtype is None:
                parts[name] = load(folder)
            else:
                layout = {"channels_last": channels_last[name]} if name in channels_last else {}
                parts[name] = load(folder, device=device, dtype=part_dtype, variant=variant, **layout)
        parts["safety_checker"] = _load_safety_checker(folder, device, dtype, variant, components)
        if components:
            raise InputError(f"Pipeline.from_pretrained: unknown component(s) {sorted(components)}")
        pipe = cls(**parts, name=folder.name)
        for name, last in channels_last.items():  # no-ops, unless the caller passed them
            getattr(pipe, name).to(memory_format=torch.channels_last if last else torch.contiguous_format)
        pipe.unet.fuse_qkv()
        if compile:
            pipe.compile(None if compile is True else compile)
        return pipe

    def compile(self, mode: str | None = None) -> None:
        """torch.compile the UNet and the VAE decoder in place (their state dicts keep their
        keys). Compilation happens on the first image of each size and takes a while; later
        images of that size reuse it. Static shapes, so steps and prompts of one size never
        recompile. `mode=None` picks by device: "reduce-overhead" (CUDA graphs) on CUDA,
        inductor's default on the CPU."""
        if self.device.type == "cpu":
            log.warning("torch.compile on the CPU: about 90 s of compiling, and for small-sd it measured "
                        "no faster than eager in bf16 and slower in fp32 (README, Speed)")
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.unet.compile(mode=mode, fullgraph=True, dynamic=False)
        self.vae.decoder.compile(mode=mode, fullgraph=True, dynamic=False)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, guidance_rescale: float = 0.0,
                 output_type: str = "pil", progress: bool = False) -> PipelineOutput:
        f = self.vae.downscale_factor
        height = self.unet.config.sample_size * f if height is None else height
        width = self.unet.config.sample_size * f if width is None else width
        prompts, negatives = self._check_inputs(prompt, negative_prompt, height, width, num_inference_steps,
                                                guidance_scale, num_images_per_prompt, guidance_rescale,
                                                output_type)
        n = len(prompts) * num_images_per_prompt
        check_memory(n, height, width, self.dtype, self.device)
        use_cfg = guidance_scale > 1.0  # guidance 1 is the plain conditional prediction

        context = self.encode_prompt(prompts, num_images_per_prompt)
        if use_cfg:  # one batch: [unconditional; conditional]
            context = torch.cat([self.encode_prompt(negatives, num_images_per_prompt), context])

        # The text context is the same on every step, and so are its keys and values.
        context = self.unet.precompute_cross_kv(context)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = self.prepare_latents(n, height // f, width // f, generator, latents)

        bar = ProgressBar(len(self.scheduler.timesteps), enabled=progress)
        try:
            for i, t in enumerate(self.scheduler.timesteps):
                model_in = torch.cat([latents] * 2) if use_cfg else latents
                noise = self.unet(self.scheduler.scale_model_input(model_in, t), t, context)
                if i == 0:  # once, not every step: each check stalls a GPU
                    check_finite(noise, "the UNet's first prediction",
                                 "unet weights hold NaN/inf, or float16 overflowed")
                if use_cfg:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                    if guidance_rescale > 0:
                        noise = rescale_noise_cfg(noise, cond, guidance_rescale)
                latents = self.scheduler.step(noise, t, latents)
                bar.update()
        finally:  # also on Ctrl-C, so a message after it starts on a fresh line
            bar.close()
        check_finite(latents, "the denoised latents", "float16 overflowed, or the scheduler config is degenerate")

        if output_type == "latent":
            return PipelineOutput(latents, None)
        # One image at a time: the decoder's full-resolution activations dominate peak memory.
        images = torch.cat([self.vae.decode(z / self.vae.scaling_factor) for z in latents.split(1)])
        check_finite(images, "the VAE's decoded image", "vae weights hold NaN/inf, or float16 overflowed")
        images = (images / 2 + 0.5).clamp(0, 1)
        nsfw = None
        if self.safety_checker is not None:
            images, nsfw = self.safety_checker(images)
        return PipelineOutput(to_output_type(images, output_type), nsfw)

    def encode_prompt(self, prompts: list[str], num_images_per_prompt: int = 1) -> torch.Tensor:
        """Prompts -> text context [len(prompts) * num_images_per_prompt, 77, D], each
        prompt's copies next to each other (as diffusers orders them)."""
        for cut in self.tokenizer.truncated_text(prompts):
            if cut:
                # A 10,000-character prompt should not flood the log: its start and its end.
                shown = cut if len(cut) <= 240 else f"{cut[:120]} [... {len(cut) - 240} characters ...] {cut[-120:]}"
                log.warning("The following part of your input was truncated because CLIP can only "
                            "handle sequences up to %d tokens: %r", self.tokenizer.model_max_length, shown)
        ids = self.tokenizer(prompts).to(self.device)
        context = self.text_encoder(ids)
        check_finite(context, "the text encoder's output", "text_encoder weights hold NaN/inf")
        return context.to(self.dtype).repeat_interleave(num_images_per_prompt, dim=0)

    def prepare_latents(self, n: int, h: int, w: int, generator, latents: torch.Tensor | None) -> torch.Tensor:
        shape = (n, self.unet.config.in_channels, h, w)
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if latents is None and not all(g is None or isinstance(g, torch.Generator) for g in generators):
            raise InputError(f"generator: expected a torch.Generator or a list of them, got {generator!r:.80}")
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise InputError(f"latents: expected a torch.Tensor of shape {shape}, got {type(latents).__name__}")
            if tuple(latents.shape) != shape:
                raise InputError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
            if not torch.isfinite(latents).all():
                raise InputError("latents: contain NaN or infinity")
        elif isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise InputError(f"generator: a list of {len(generator)} generators for {n} images")
            # One draw per image, each from its own generator: image i depends on seed i only.
            latents = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
        else:
            # Drawn on the generator's device (the CPU by default), so a seed gives the same
            # noise, and so the same image, on any device.
            latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        latents = latents.to(device=self.device, dtype=self.dtype)
        return latents * self.scheduler.init_noise_sigma

    def _check_inputs(self, prompt, negative_prompt, height, width, steps, guidance, per_prompt,
                      guidance_rescale, output_type) -> tuple[list[str], list[str]]:
        prompts = _as_prompt_list(prompt, "prompt")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1 and len(prompts) > 1 and isinstance(negative_prompt, str):
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise InputError(f"negative_prompt: {len(negatives)} negative prompt(s) for {len(prompts)} prompt(s)")
        f = self.vae.downscale_factor
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % f:
                raise InputError(f"{name}: must be a positive multiple of {f}, got {size!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
            raise InputError(f"num_inference_steps: must be an integer from 1 to 1000, got {steps!r}")
        for name, value in (("guidance_scale", guidance), ("guidance_rescale", guidance_rescale)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise InputError(f"{name}: must be a finite number, got {value!r}")
        if not 0 <= guidance_rescale <= 1:  # a blend weight (arXiv 2305.08891, section 3.4)
            raise InputError(f"guidance_rescale: must lie in [0, 1] (0.7 is typical), got {guidance_rescale!r}")
        if not isinstance(per_prompt, int) or isinstance(per_prompt, bool) or per_prompt < 1:
            raise InputError(f"num_images_per_prompt: must be a positive integer, got {per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type: must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        return prompts, negatives


def channels_last_for(device: torch.device, dtype: torch.dtype) -> dict[str, bool]:
    """Whether the UNet's and the VAE's convolutions run channels-last (NHWC) or NCHW, as
    measured on small-sd at 256x256 with one CPU thread (diffusers, NCHW: UNet CFG step 2.95 s
    fp32, 1.64 s bf16; VAE decode 6.5 s fp32):
    - UNet fp32: NCHW 2.91 s, channels-last 3.10 s. bf16: channels-last 1.52 s, NCHW 1.59 s.
      NCHW also leaves fp32 weights in the file's memory mapping: nothing is copied at load.
    - VAE decode fp32: channels-last 6.44 s, NCHW 6.70 s; the same in bf16.
    cuDNN's tensor-core convolutions want channels-last."""
    return {"unet": not (device.type == "cpu" and dtype == torch.float32), "vae": True}


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


def _as_prompt_list(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError(f"{name}: expected a string or a non-empty list of strings, got {prompt!r:.80}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"{name}[{i}]: expected a string, got {type(p).__name__}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: how Python keeps undecodable argv bytes
            raise InputError(f"{name}[{i}]: not valid Unicode text ({e.reason}: {p[e.start:e.end]!r} at "
                             f"position {e.start}, from a byte that is not UTF-8); pass the prompt as UTF-8") from None
    return list(prompts)


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Pull the guided prediction's per-image std back toward the conditional one's, against
    over-exposure at high guidance: section 3.4 of https://arxiv.org/abs/2305.08891."""
    dims = list(range(1, noise_cond.ndim))
    rescaled = noise_cfg * (noise_cond.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def to_output_type(images: torch.Tensor, output_type: str):
    """Images [B,3,H,W] in [0,1] -> 'pt' as is, 'np' [B,H,W,3] float32, 'pil' 8-bit RGB."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(image) for image in (array * 255).round().astype(np.uint8)]


def _load_safety_checker(folder: Path, device, dtype, variant, components: dict):
    if "safety_checker" in components:
        checker = components.pop("safety_checker")
        if checker is None:
            log.warning("The safety checker is disabled: images are returned unfiltered. Keep it on "
                        "for any service open to the public.")
        return checker
    if not (folder / "safety_checker").is_dir():
        # A model that says it needs none (minisd-shapes draws only coloured shapes) gets a
        # note, not a warning on every run.
        declared_safe = read_model_index(folder).get("requires_safety_checker") is False
        (log.info if declared_safe else log.warning)(
            "%s has no safety_checker folder: images are returned unfiltered.", folder)
        return None
    return load_safety_checker(folder, device=device, dtype=dtype, variant=variant)


class ProgressBar:
    """A one-line progress bar on stderr (no dependency), redrawn in place."""

    def __init__(self, total: int, enabled: bool, stream=sys.stderr):
        self.total, self.done, self.enabled, self.stream = total, 0, enabled, stream
        self.start = time.perf_counter()

    def update(self) -> None:
        self.done += 1
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            filled = int(30 * self.done / self.total)
            self.stream.write(f"\r{self.done:3d}/{self.total} [{'#' * filled}{'.' * (30 - filled)}] "
                              f"{elapsed:5.1f}s, {elapsed / self.done:.2f}s/step")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
