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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .clip import CLIPTextModel, load_text_encoder
from .dpm_solver import DPMSolverMultistep, load_scheduler
from .errors import CheckpointError, InputError
from .fast import SpeedLevers, apply_levers, text_kv_cached
from .folders import find_model_folder
from .runtime import ProgressBar, check_finite, check_memory
from .safety import NOT_GIVEN, choose_safety_checker
from .tokenizer import CLIPTokenizer, check_prompts, load_tokenizer
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
                        compile: bool | str = False, levers: SpeedLevers = SpeedLevers(),
                        **components) -> "Pipeline":
        """Load every component of a diffusers pipeline folder. Pass a component by keyword
        (`safety_checker=None`, `unet=my_unet`) to use it instead of the folder's.
        `levers` picks the speed levers of fast.py (`SpeedLevers.none()`: the models exactly as
        written), applied to the UNet and VAE, the folder's or those passed in (which are changed
        in place); a Pipeline built by hand gets none. `compile=True` (or a torch.compile mode)
        compiles the UNet and VAE decoder. One generation at a time per Pipeline."""
        folder = find_model_folder(folder)
        # bfloat16 keeps 8 bits of mantissa: fine for the UNet's many steps, but the text
        # context is computed once and steers all of them, so the encoder stays in float32.
        text_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        channels_last = levers.layouts(torch.device(device), dtype)
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
        parts["safety_checker"] = choose_safety_checker(folder, components.pop("safety_checker", NOT_GIVEN),
                                                        device, dtype, variant)
        if components:
            raise InputError(f"Pipeline.from_pretrained: unknown component(s) {sorted(components)}")
        pipe = cls(**parts, name=folder.name)
        for name, last in channels_last.items():  # no-ops, unless the caller passed them
            getattr(pipe, name).to(memory_format=torch.channels_last if last else torch.contiguous_format)
        apply_levers(levers, pipe.unet, pipe.vae)
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
        prompts, negatives = self._check_inputs(prompt, negative_prompt, height, width, guidance_scale,
                                                num_images_per_prompt, guidance_rescale, output_type)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)  # checks the step count
        n = len(prompts) * num_images_per_prompt
        check_memory(n, height, width, self.dtype, self.device)
        use_cfg = guidance_scale > 1.0  # guidance 1 is the plain conditional prediction

        # 1. text -> context [n, 77, D]; with guidance, [unconditional; conditional] as one batch
        context = self.encode_prompt(prompts, num_images_per_prompt)
        if use_cfg:
            context = torch.cat([self.encode_prompt(negatives, num_images_per_prompt), context])

        # 2. noise -> latents [n, 4, height/8, width/8], denoised step by step
        latents = self.prepare_latents(n, height // f, width // f, generator, latents)
        bar = ProgressBar(len(self.scheduler.timesteps), enabled=progress, min_interval=1.0)
        try:
            with text_kv_cached(self.unet, context):  # a speed lever (fast.py); a no-op when off
                for i, t in enumerate(self.scheduler.timesteps):
                    model_in = torch.cat([latents] * 2) if use_cfg else latents
                    noise = self.unet(self.scheduler.scale_model_input(model_in, t), t, context)
                    if i == 0:  # once, not every step: each check stalls a GPU
                        check_finite(noise, "the UNet's first prediction",
                                     "unet weights hold NaN/inf, or float16 overflowed")
                    if use_cfg:  # classifier-free guidance: https://arxiv.org/abs/2207.12598
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

        # 3. latents -> images [n, 3, height, width] in [0, 1], one at a time: the decoder's
        # full-resolution activations dominate peak memory.
        images = torch.cat([self.vae.decode(z / self.vae.scaling_factor) for z in latents.split(1)])
        check_finite(images, "the VAE's decoded image", "vae weights hold NaN/inf, or float16 overflowed")
        images = (images / 2 + 0.5).clamp(0, 1)

        # 4. the safety checker blacks out flagged images
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

    def _check_inputs(self, prompt, negative_prompt, height, width, guidance, per_prompt, guidance_rescale,
                      output_type) -> tuple[list[str], list[str]]:
        prompts = check_prompts(prompt, "prompt")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = check_prompts(negative_prompt, "negative_prompt")
            if len(negatives) == 1 and len(prompts) > 1 and isinstance(negative_prompt, str):
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise InputError(f"negative_prompt: {len(negatives)} negative prompt(s) for {len(prompts)} prompt(s)")
        f = self.vae.downscale_factor
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % f:
                raise InputError(f"{name}: must be a positive multiple of {f}, got {size!r}")
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
