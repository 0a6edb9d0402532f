"""Text-to-image and image-to-image: the only file that knows the order in which the components run.

    prompt -> tokenizer -> text encoder -> context                         (once per generation)
    txt2img: noise -> latents x_T          img2img: image -> VAE encoder -> noised to x_t
    latents -> [UNet(latents, t, context) with CFG -> DPM-Solver++ step] x steps -> latents
    latents / scaling_factor -> VAE decoder -> image -> safety checker -> image or black

Argument names follow diffusers' `StableDiffusionPipeline.__call__` and
`StableDiffusionImg2ImgPipeline.__call__`, so switching is a rename of the import. Follows
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py
and pipeline_stable_diffusion_img2img.py beside it. How prompts become a context is
text_conditioning.py's business; how an image becomes starting latents, img2img.py's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .clip import CLIPTextModel, check_clip_skip, load_text_encoder
from .compiling import compile_module
from .dpm_solver import DPMSolverMultistep, load_scheduler
from .errors import CheckpointError, InputError
from .fast import SpeedLevers, apply_levers, text_kv_cached
from .folders import find_model_folder, model_name, resolve_pretrained
from .img2img import DEFAULT_STRENGTH, check_strength, prepare_images, resize_back
from .int8 import Int8UNet, calibrate_int8, check_quantize
from .runtime import (ProgressBar, check_device, check_dtype, check_finite, check_generators, check_memory,
                      check_numbers, draw_noise, text_dtype_for)
from .safety import NOT_GIVEN, choose_safety_checker
from .step_skipping import StepSkipping, check_step_skipping, step_skipping_for, warn_if_gate_unreached
from .text_conditioning import check_prompt_syntax, check_text_inputs, encode_prompts
from .tokenizer import CLIPTokenizer, check_prompts, load_tokenizer
from .unet import UNet2DConditionModel, load_unet
from .vae import AutoencoderKL, load_vae

log = logging.getLogger("minisd")

@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, np [B,H,W,3] in [0,1], torch [B,3,H,W] in [0,1], or latents
    nsfw_content_detected: list[bool] | None  # None when no safety checker ran


class Pipeline:
    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
                 vae: AutoencoderKL, scheduler: DPMSolverMultistep, safety_checker=None, name: str = "minisd"):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler, self.safety_checker, self.name = scheduler, safety_checker, name
        self.levers: SpeedLevers | None = None  # set by from_pretrained; `to` re-picks the layouts
        self.skipping_models: dict = {}  # the UNet cut for step skipping, per cache_branch (step_skipping.py)
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
    def from_pretrained(cls, pretrained: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, variant: str | None = None,
                        compile: bool | str = False, levers: SpeedLevers = SpeedLevers(), *,
                        torch_dtype: torch.dtype | None = None, cache_dir: str | Path | None = None,
                        revision: str | None = None, local_files_only: bool | None = None,
                        quantize: str | None = None, calibration_prompts: list[str] | None = None,
                        compile_cache: str | Path | bool | None = None, **components) -> "Pipeline":
        """Load every component of a diffusers pipeline folder, or of a hub id such as
        "OFA-Sys/small-stable-diffusion-v0" in the local Hugging Face cache (folders.py; never
        downloaded, so `local_files_only` is always true). `torch_dtype` is diffusers' name for
        `dtype` (default float32). A component passed by keyword (`safety_checker=None`,
        `unet=my_unet`) replaces the folder's. `levers`: the speed levers of fast.py applied to
        the UNet and VAE, those passed in too (changed in place); `SpeedLevers.none()` runs the
        models as written. `compile=True` (or a torch.compile mode) compiles the UNet and the
        VAE decoder (compiling.py), on the CPU kept on disk per model and size for later processes
        (`compile_cache`: the folder, False for none; compile_cache.py). `quantize="int8"`:
        static int8 for the UNet on x86 CPUs, calibrated on `calibration_prompts` or fixed ones
        (int8.py; the `int8` extra). One generation at a time per Pipeline."""
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise InputError(f"from_pretrained: dtype={dtype} and torch_dtype={torch_dtype} disagree; give one")
        dtype = check_dtype(dtype or torch_dtype or torch.float32, "torch_dtype" if torch_dtype else "dtype")
        folder = find_model_folder(resolve_pretrained(pretrained, cache_dir, revision))
        device = check_device(device)
        if quantize is not None:
            check_quantize(quantize, device)
        channels_last = levers.layouts(device, dtype)
        loaders = {"tokenizer": (load_tokenizer, None), "text_encoder": (load_text_encoder, text_dtype_for(dtype)),
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
        components.pop("requires_safety_checker", None)  # diffusers' flag; the choice above is the policy
        if components:
            raise InputError(f"Pipeline.from_pretrained: unknown component(s) or argument(s) {sorted(components)}")
        pipe = cls(**parts, name=model_name(folder))
        pipe.levers = levers
        pipe._set_layouts(device, dtype)  # no-ops, unless the caller passed components
        apply_levers(levers, pipe.unet, pipe.vae)
        if quantize is not None:
            pipe.quantize(quantize, calibration_prompts, cache=compile_cache)
        if compile:
            pipe.compile(None if compile is True else compile, cache=compile_cache)
        return pipe

    def to(self, *args, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        """Move every component, as diffusers' `pipe.to("cuda")`: `.to(device)`, `.to(dtype)`,
        `.to(device, dtype)` or by keyword. With bfloat16 the text encoder stays float32 (as
        `from_pretrained` loads it). Returns the pipeline itself."""
        for arg in args:
            if isinstance(arg, torch.dtype) and dtype is None:
                dtype = arg
            elif isinstance(arg, (str, torch.device)) and device is None:
                device = arg
            else:
                raise InputError(f"Pipeline.to: expected a device (\"cuda\", \"cpu\", ...) and/or a torch dtype, "
                                 f"each once, got {arg!r:.80}")
        device = self.device if device is None else check_device(device)
        if isinstance(self.unet, Int8UNet):
            check_quantize("int8", device)  # its int8 graphs run on the CPU
        if dtype is None:
            self.text_encoder.to(device=device)
            dtype = self.dtype
        else:
            dtype = check_dtype(dtype)
            self.text_encoder.to(device=device, dtype=text_dtype_for(dtype))
        for model in (self.unet, self.vae, self.safety_checker):
            if model is not None:
                model.to(device=device, dtype=dtype)
        self._set_layouts(device, dtype)
        return self

    def _set_layouts(self, device: torch.device, dtype: torch.dtype) -> None:
        """The memory layout the levers pick for this device and dtype (fast.py)."""
        if self.levers is None:
            return
        for name, last in self.levers.layouts(device, dtype).items():
            getattr(self, name).to(memory_format=torch.channels_last if last else torch.contiguous_format)

    def compile(self, mode: str | None = None, cache: str | Path | bool | None = None) -> None:
        """torch.compile the UNet (unless int8, which compiles itself) and the VAE decoder in place
        (compiling.py): each size on its first image; on the CPU once per model and size
        (`cache`: the package folder, False for none; compile_cache.py)."""
        if not isinstance(self.unet, Int8UNet):
            compile_module(self.unet, self.device, mode, cache)
        compile_module(self.vae.decoder, self.device, mode, cache)

    def quantize(self, method: str = "int8", calibration_prompts: list[str] | None = None, cache=None) -> None:
        """Static int8 for the UNet (int8.py), calibrated before each size's first image on generations
        of `calibration_prompts` (or int8's own) run here, kept in the package cache (`cache`); the VAE
        decoder is compiled too (eager, it ran up to twice as slow right after int8 steps: compiling.py)."""
        check_quantize(method, self.device)
        if not isinstance(self.unet, Int8UNet):
            self.unet = Int8UNet(self.unet, calibration_prompts, cache)
        if self.vae.decoder._compiled_call_impl is None:
            compile_module(self.vae.decoder, self.device, cache=cache)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, guidance_rescale: float = 0.0,
                 output_type: str = "pil", progress: bool = False, *, image=None, strength: float | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 clip_skip: int | None = None, prompt_syntax: str = "plain",
                 callback_on_step_end=None, gate_step: int | None = None, cache_interval: int | None = None,
                 cache_branch: int | None = None) -> PipelineOutput:
        """Text-to-image, or image-to-image when `image` is given.

        `image`: a PIL image, a list of them (one for all prompts, or one per prompt; a single
        prompt with several images runs once per image), or a float tensor [B,3,H,W] in [0, 1].
        The output has the image's size (or height x width when given); img2img.prepare_images
        says how sizes that are not multiples of 8 are handled. `strength` (default 0.8 with an
        image) in (0, 1]: the share of the steps that run, from an image noised that far.
        `prompt_embeds` / `negative_prompt_embeds`: precomputed contexts [B, T, D] instead of
        the text. `clip_skip`: diffusers' (1 = the penultimate layer; the prompt's only, as in
        diffusers, except in the "a1111" syntax, where the negative prompt's too). `prompt_syntax`: "plain"
        (diffusers': 77 tokens at most) or "a1111" (AUTOMATIC1111's (word:1.2), [word], BREAK,
        any length; text_conditioning.py). `callback_on_step_end(pipe, i, t, {"latents": ...})`
        runs after each step, as in diffusers; latents in the dict it returns replace the step's.
        `gate_step`, `cache_interval`, `cache_branch`: step skipping, off by default (T-GATE and
        DeepCache; step_skipping.py)."""
        check_prompt_syntax(prompt_syntax)
        check_step_skipping(gate_step, cache_interval, cache_branch, self.unet)
        check_clip_skip(clip_skip, self.text_encoder.config.num_hidden_layers)
        prompts, negatives, prompt_embeds, negative_prompt_embeds = check_text_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, self.unet.config.cross_attention_dim)
        self._check_sizes(height, width)
        init = None
        if image is not None:
            if latents is not None:
                raise InputError("latents: give latents (text-to-image) or an image (image-to-image), not both")
            init = prepare_images(image, height, width, self.vae.downscale_factor)
            height, width = init.pixels.shape[-2:]
            batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
            if batch == 1 and len(init.pixels) > 1:  # one prompt, several images: the prompt for each
                prompts, negatives, prompt_embeds, negative_prompt_embeds = (
                    x if x is None else x * len(init.pixels) if isinstance(x, list) else x.repeat(len(init.pixels), 1, 1)
                    for x in (prompts, negatives, prompt_embeds, negative_prompt_embeds))
            elif len(init.pixels) not in (1, batch):
                raise InputError(f"image: {len(init.pixels)} images for {batch} prompts; give one image for all "
                                 "prompts, or one per prompt")
        elif strength is not None:
            raise InputError("strength: applies to image-to-image only; pass image= as well")
        f = self.vae.downscale_factor
        height = self.unet.config.sample_size * f if height is None else height
        width = self.unet.config.sample_size * f if width is None else width
        self._check_sizes(height, width)
        check_numbers(guidance_scale, num_images_per_prompt, guidance_rescale, output_type)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)  # checks the step count
        if calibrate_int8(self, height, width):  # an int8 UNet's first image of this size ran generations
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        start = 0 if init is None else check_strength(DEFAULT_STRENGTH if strength is None else strength,
                                                      num_inference_steps, self.scheduler.config.num_train_timesteps)
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        n = batch * num_images_per_prompt
        check_memory(n, height, width, self.dtype, self.device)
        use_cfg = guidance_scale > 1.0  # guidance 1 is the plain conditional prediction
        warn_if_gate_unreached(gate_step, num_inference_steps - start)
        skipping = step_skipping_for(self, gate_step, cache_interval, cache_branch, guided=use_cfg)

        # 1. text -> contexts [n, T, D]: the conditional one, and with guidance the unconditional
        cond = self._context(prompts, prompt_embeds, num_images_per_prompt, clip_skip, prompt_syntax)
        # Quirk: diffusers' clip_skip leaves the negative prompt on the last layer; A1111 skips both.
        negative_skip = clip_skip if prompt_syntax == "a1111" else None
        uncond = (self._context(negatives, negative_prompt_embeds, num_images_per_prompt, negative_skip,
                                prompt_syntax) if use_cfg else None)

        # 2. starting latents [n, 4, height/8, width/8]: noise, or the image noised to step `start`
        if init is None:
            latents = self.prepare_latents(n, height // f, width // f, generator, latents)
        else:
            which = [0 if len(init.pixels) == 1 else i // num_images_per_prompt for i in range(n)]
            latents = self.prepare_image_latents(init.pixels, which, generator, start)

        # 3. denoised step by step
        latents = self.denoise(latents, cond, uncond, guidance_scale, guidance_rescale, start, progress,
                               callback_on_step_end, skipping)
        if output_type == "latent":
            return PipelineOutput(latents, None)

        # 4. latents -> images [n, 3, height, width] in [0, 1]; the safety checker blacks out flagged ones
        images = self.decode(latents)
        nsfw = None
        if self.safety_checker is not None:
            images, nsfw = self.safety_checker(images)
        if init is not None:
            images = resize_back(images, init.output_size)
        return PipelineOutput(to_output_type(images, output_type), nsfw)

    def denoise(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float,
                guidance_rescale: float = 0.0, start: int = 0, progress: bool = False,
                callback_on_step_end=None, skipping: StepSkipping | None = None) -> torch.Tensor:
        """The sampling loop over the scheduler's timesteps from index `start`. With `uncond`,
        classifier-free guidance: one UNet batch [uncond; cond] when the contexts have one
        length, else two passes (prompts of different lengths in the "a1111" syntax). With
        `skipping`, each step's UNet is the one it picks, and past a T-GATE gate guidance stops."""
        timesteps = self.scheduler.timesteps[start:]
        if start:
            self.scheduler.set_begin_index(start)
        batched = uncond is not None and uncond.shape == cond.shape
        contexts = [torch.cat([uncond, cond])] if batched else [c for c in (uncond, cond) if c is not None]
        bar = ProgressBar(len(timesteps), enabled=progress, min_interval=1.0)
        try:
            with text_kv_cached(self.unet, *contexts):  # a speed lever (fast.py); a no-op when off
                for i, t in enumerate(timesteps):
                    unet = self.unet if skipping is None else skipping.unet_for_step(i)
                    guided = uncond is not None and not (skipping and skipping.gated(i))
                    if not guided:  # no guidance, or past the gate: the latents alone, the text's context
                        noise = unet(self.scheduler.scale_model_input(latents, t), t, cond)
                    elif batched:
                        noise = unet(self.scheduler.scale_model_input(torch.cat([latents] * 2), t), t, contexts[0])
                    else:
                        model_in = self.scheduler.scale_model_input(latents, t)
                        noise = torch.cat([unet(model_in, t, c) for c in contexts])
                    if i == 0:  # once, not every step: each check stalls a GPU
                        check_finite(noise, "the UNet's first prediction",
                                     "unet weights hold NaN/inf, or float16 overflowed")
                    if guided:  # classifier-free guidance: https://arxiv.org/abs/2207.12598
                        noise_uncond, noise_cond = noise.chunk(2)
                        noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                        if guidance_rescale > 0:
                            noise = rescale_noise_cfg(noise, noise_cond, guidance_rescale)
                    latents = self.scheduler.step(noise, t, latents)
                    bar.update()
                    if callback_on_step_end is not None:
                        latents = (callback_on_step_end(self, i, t, {"latents": latents}) or {}).get("latents", latents)
        finally:  # also on Ctrl-C, so a message after it starts on a fresh line
            bar.close()
        check_finite(latents, "the denoised latents", "float16 overflowed, or the scheduler config is degenerate")
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [n, 3, H, W] in [0, 1], one at a time: the decoder's
        full-resolution activations dominate peak memory."""
        images = torch.cat([self.vae.decode(z / self.vae.scaling_factor) for z in latents.split(1)])
        check_finite(images, "the VAE's decoded image", "vae weights hold NaN/inf, or float16 overflowed")
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_prompt(self, prompts: str | list[str], num_images_per_prompt: int = 1, clip_skip: int | None = None,
                      prompt_syntax: str = "plain") -> torch.Tensor:
        """Prompts -> text context [len(prompts) * num_images_per_prompt, T, D] in the
        pipeline's dtype, each prompt's copies next to each other (as diffusers orders them).
        T is 77, or 77 per chunk of the longest prompt in the "a1111" syntax."""
        context = encode_prompts(self.tokenizer, self.text_encoder, check_prompts(prompts, "prompt"),
                                 prompt_syntax, clip_skip)
        return context.to(self.dtype).repeat_interleave(num_images_per_prompt, dim=0)

    def _context(self, prompts, embeds, num_images_per_prompt, clip_skip, prompt_syntax) -> torch.Tensor:
        if embeds is None:
            return self.encode_prompt(prompts, num_images_per_prompt, clip_skip, prompt_syntax)
        return embeds.to(self.device, self.dtype).repeat_interleave(num_images_per_prompt, dim=0)

    def prepare_latents(self, n: int, h: int, w: int, generator, latents: torch.Tensor | None) -> torch.Tensor:
        """Text-to-image's starting latents: `latents` as given, or standard normal noise."""
        shape = (n, self.unet.config.in_channels, h, w)
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise InputError(f"latents: expected a torch.Tensor of shape {shape}, got {type(latents).__name__}")
            if tuple(latents.shape) != shape:
                raise InputError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
            if not torch.isfinite(latents).all():
                raise InputError("latents: contain NaN or infinity")
        else:
            latents = draw_noise(shape, generator)
        latents = latents.to(device=self.device, dtype=self.dtype)
        return latents * self.scheduler.init_noise_sigma

    def prepare_image_latents(self, pixels: torch.Tensor, which: list[int], generator, start: int) -> torch.Tensor:
        """Image-to-image's starting latents: images [k,3,h,w] in [-1, 1] -> a sample of each
        one's latent distribution, scaled -> output image i takes image which[i], noised to the
        level of step `start`. The generator is drawn from as diffusers' img2img does: the
        posterior samples first, then the noise; with a list, generator i serves image i alone."""
        n, shape = len(which), (len(which), self.unet.config.in_channels, *(s // self.vae.downscale_factor
                                                                             for s in pixels.shape[-2:]))
        check_generators(generator, n)
        moments = [self.vae.encode(p.to(self.device, self.dtype)) for p in pixels.split(1)]
        mean, logvar = (torch.cat(m) for m in zip(*moments))
        check_finite(mean, "the VAE encoder's output", "vae weights hold NaN/inf, or float16 overflowed")
        std = torch.exp(0.5 * logvar)
        if isinstance(generator, (list, tuple)):
            mean, std = mean[which], std[which]  # each image sampled with its own generator
            eps = draw_noise(shape, generator)
        else:  # one draw per distinct image, shared by its copies (diffusers repeats the sample)
            eps = draw_noise(tuple(mean.shape), generator)
        x0 = (mean + std * eps.to(self.device, self.dtype)) * self.vae.scaling_factor
        if not isinstance(generator, (list, tuple)):
            x0 = x0[which]
        noise = draw_noise(shape, generator).to(self.device, self.dtype)
        return self.scheduler.add_noise(x0, noise, start)

    def _check_sizes(self, height, width) -> None:
        f = self.vae.downscale_factor
        for name, size in (("height", height), ("width", width)):
            if size is None:
                continue
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % f:
                hint = "; pass the image as image=" if isinstance(size, (Image.Image, torch.Tensor)) else ""
                raise InputError(f"{name}: must be a positive multiple of {f}, got {size!r:.80}{hint}")


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
