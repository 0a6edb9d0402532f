"""Image-to-image's two extra inputs: the starting image and how much of it to keep.

    image [PIL or tensor in [0, 1]] -> RGB, resized to a multiple of 8 -> [k, 3, h, w] in [-1, 1]
    -> VAE encoder -> a sample of the latent distribution x scaling_factor     (x_0 of the image)
    -> noised to the level of step `start` of the schedule                      (x_t, not x_T)
    -> denoised over the remaining steps as in text-to-image

`strength` picks `start`: of N steps the last min(int(N * strength), N) run, so strength 1
starts from (almost) pure noise and small strengths keep the image's composition. The
arithmetic is diffusers' `StableDiffusionImg2ImgPipeline.get_timesteps`; the image handling is
its `VaeImageProcessor.preprocess`:
https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError

DEFAULT_STRENGTH = 0.8  # diffusers' default


@dataclass
class InitImages:
    pixels: torch.Tensor  # [k, 3, h, w] in [-1, 1], float32 on the CPU; h, w multiples of 8
    output_size: tuple[int, int]  # (height, width) the generated images are resized back to


def prepare_images(image, height: int | None, width: int | None, factor: int) -> InitImages:
    """`image` (a PIL image, a list of them, or a float tensor [B,3,H,W] or [3,H,W] in [0, 1])
    -> pixels at the generation size, and the size to hand back.

    The size is `height` x `width` when given (the images are resized to it), else the first
    image's. A size that is not a multiple of `factor` (8) is handled as diffusers' image
    processor does: rounded *down* to a multiple of 8, the images resized to that (PIL images
    with Lanczos, tensors with nearest-neighbour `F.interpolate`), so the VAE sees what
    diffusers' VAE sees; the generated images are then resized back to the requested size
    (`resize_back`), so the output has the input's size. PIL images of any mode (RGBA,
    greyscale, palette) are converted to RGB.
    """
    images = _as_list(image)
    first = images[0]
    in_h, in_w = (first.height, first.width) if isinstance(first, Image.Image) else tuple(first.shape[-2:])
    out_h, out_w = height or in_h, width or in_w
    gen_h, gen_w = out_h - out_h % factor, out_w - out_w % factor
    if gen_h == 0 or gen_w == 0:
        raise InputError(f"image: {in_w}x{in_h} is too small; images need at least {factor}x{factor} pixels")
    if isinstance(first, Image.Image):
        pixels = torch.stack([_pil_to_tensor(im, gen_w, gen_h, f"image[{i}]") for i, im in enumerate(images)])
    else:
        pixels = torch.cat(images).float()
        if tuple(pixels.shape[-2:]) != (gen_h, gen_w):
            pixels = F.interpolate(pixels, size=(gen_h, gen_w))  # diffusers' (nearest) resize of tensors
    return InitImages(pixels * 2 - 1, (out_h, out_w))


def _as_list(image) -> list:
    """One list of PIL images or one list of [1,3,H,W] tensors, checked."""
    if isinstance(image, np.ndarray):  # [H,W,3] or [B,H,W,3] in [0, 1], as diffusers takes arrays
        if image.ndim not in (3, 4) or not np.issubdtype(image.dtype, np.floating):
            raise InputError(f"image: a numpy array must be float [H,W,3] or [B,H,W,3] in [0, 1], "
                             f"got {image.dtype} of shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).movedim(-1, -3)
    if isinstance(image, torch.Tensor):
        return list(_check_tensor(image).split(1))
    if not isinstance(image, (list, tuple, Image.Image)):
        raise InputError(f"image: expected a PIL image, a list of them, or a float tensor [B,3,H,W] in "
                         f"[0, 1], got {type(image).__name__}")
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise InputError("image: an empty list; give a PIL image, a list of them, or a tensor [B,3,H,W]")
    for i, im in enumerate(images):
        if not isinstance(im, (Image.Image, torch.Tensor)):
            raise InputError(f"image[{i}]: expected a PIL image or a float tensor [3,H,W] in [0, 1], "
                             f"got {type(im).__name__}")
        if isinstance(im, torch.Tensor) != isinstance(images[0], torch.Tensor):
            raise InputError(f"image[{i}]: a {type(im).__name__} in a list of {type(images[0]).__name__}; "
                             "give all images in one form")
    if isinstance(images[0], torch.Tensor):
        tensors = [_check_tensor(im, f"image[{i}]") for i, im in enumerate(images)]
        if len({tuple(t.shape[1:]) for t in tensors}) > 1:
            raise InputError(f"image: the tensors differ in shape ({', '.join(str(tuple(t.shape)) for t in tensors)}); "
                             "give tensors of one size, or PIL images")
        return tensors
    return images


def _check_tensor(t: torch.Tensor, name: str = "image") -> torch.Tensor:
    """A float [B,3,H,W] (or [3,H,W]) tensor in [0, 1] -> [B,3,H,W], on the CPU, not modified."""
    if not t.is_floating_point():
        raise InputError(f"{name}: expected a float tensor in [0, 1], got {t.dtype} (divide 8-bit "
                         "images by 255)")
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[1] != 3 or t.numel() == 0:
        raise InputError(f"{name}: expected a tensor [B,3,H,W] or [3,H,W] of RGB images (B, H, W > 0), "
                         f"got shape {tuple(t.shape)}")
    t = t.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise InputError(f"{name}: holds NaN or infinity")
    low, high = float(t.min()), float(t.max())
    if low < 0 or high > 1:
        raise InputError(f"{name}: values must lie in [0, 1], got [{low:.3g}, {high:.3g}]"
                         + (" (images in [-1, 1]: pass (x + 1) / 2)" if low >= -1 and high <= 1 else ""))
    return t


def _pil_to_tensor(image: Image.Image, width: int, height: int, name: str) -> torch.Tensor:
    """RGB, resized with Lanczos when the size differs (as diffusers), [3,H,W] in [0, 1]."""
    try:  # PIL reads a file's pixels lazily: a truncated file fails only here
        image = image.convert("RGB") if image.mode != "RGB" else image
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    except (OSError, ValueError) as e:
        raise InputError(f"{name}: cannot be read as an RGB image ({e})") from None
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def resize_back(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Generated images [n,3,h,w] in [0, 1] -> [n,3,*size]: undoes the rounding down to a
    multiple of 8 (bicubic, antialiased); unchanged when the sizes agree."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    resized = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True)
    return resized.clamp(0, 1).to(images.dtype)


def check_strength(strength, steps: int, max_steps: int = 1000) -> int:
    """The index of the first of `steps` scheduled steps that img2img runs. The last
    min(int(steps * strength), steps) steps run (diffusers' get_timesteps, float rounding
    included: int(10 * 0.29) is 2). `max_steps`: the most steps the scheduler allows."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise InputError(f"strength: must be a number in (0, 1] (1 starts from pure noise; 0.8 is "
                         f"typical), got {strength!r:.80}")
    strength = float(strength)
    kept = min(int(steps * strength), steps)
    if kept < 1:
        least = math.ceil(1e4 / steps) / 1e4  # the smallest 4-decimal strength that keeps a step
        while int(steps * least) < 1:
            least += 1e-4
        advice = f"use a strength of at least {least:.4g}"
        more = next((m for m in range(steps + 1, max_steps + 1) if int(m * strength) >= 1), None)
        if more is not None:
            advice += f", or at least {more} steps"
        raise InputError(f"strength: {strength!r} of {steps} steps leaves no step to run "
                         f"(int({steps} * {strength!r}) = 0); {advice}")
    return steps - kept
