"""The generation parameters a PNG carries, in the form AUTOMATIC1111 writes and other SD
tools (stable-diffusion.cpp, image browsers, civitai) read: a `parameters` text chunk

    an apple, oil painting
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 640x480, Model: small-stable-diffusion-v0, Denoising strength: 0.6, Clip skip: 2
    (and with step skipping: T-GATE gate step: 10, DeepCache interval: 2, DeepCache branch: 1)

Written by the command line and by the server, so both say the same thing.
"""
from __future__ import annotations

import io

from PIL import Image, PngImagePlugin


def generation_parameters(prompt: str, negative: str, steps: int, sampler: str, guidance: float,
                          seed: int, width: int, height: int, model: str, *,
                          denoising_strength: float | None = None, clip_skip: int = 1,
                          gate_step: int | None = None, cache_interval: int | None = None,
                          cache_branch: int | None = None) -> str:
    """The `parameters` text other SD tools write and read: the prompt, an optional
    negative-prompt line, then comma-separated `Key: value` pairs in AUTOMATIC1111's order.
    `denoising_strength` is written for img2img only, `clip_skip` (A1111's numbering) above 1 only,
    step skipping (minisd's T-GATE and DeepCache, after A1111's keys) when used."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    fields = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {guidance:g}", f"Seed: {seed}",
              f"Size: {width}x{height}", f"Model: {model}"]
    if denoising_strength is not None:
        fields.append(f"Denoising strength: {denoising_strength:g}")
    if clip_skip > 1:
        fields.append(f"Clip skip: {clip_skip}")
    if gate_step is not None:
        fields.append(f"T-GATE gate step: {gate_step}")
    if cache_interval is not None:
        fields.append(f"DeepCache interval: {cache_interval}, DeepCache branch: {cache_branch}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_info(parameters: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)  # the chunk other SD tools read
    return info


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """The image as PNG file bytes, with its parameters."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(parameters))
    return buffer.getvalue()
