"""Speed levers: faster equivalents of parts of the models, applied in one place.

unet.py, vae.py and clip.py compute the textbook math and nothing else. Each lever here makes
that math cheaper without changing its result beyond float rounding; each can be switched off
(`SpeedLevers(fused_qkv=False)`, or `SpeedLevers.none()` for the textbook path everywhere);
tests/test_fast.py checks each against the plain path and against diffusers.

    Pipeline.from_pretrained(folder)                            # every lever on
    Pipeline.from_pretrained(folder, levers=SpeedLevers.none()) # the models exactly as written

The levers, and what each was measured to save (small-sd, 256x256, CFG batch of 2, one CPU
thread; `python tools/bench_levers.py` measures them again on any machine):

- fused_qkv: self-attention computes q, k and v with one [3*dim, dim] matrix product instead
  of three: one pass over the pixels' features instead of three. {fused_qkv}
- cached_cross_kv: cross-attention's keys and values depend only on the text, which is the
  same at every denoising step: compute them once per generation (16 layers x 2 products of
  [77, 768] x [768, dim] for small-sd, 3.8 GFLOP a step). {cached_cross_kv}
- channels_last: convolution kernels and feature maps stored NHWC, the layout the fast
  convolution kernels of oneDNN (CPU) and cuDNN (tensor cores) want. Measured on the CPU, it
  pays for the bf16 UNet and for the VAE, not for the fp32 UNet (see `channels_last_for`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Attention, BasicTransformerBlock


@dataclass(frozen=True)
class SpeedLevers:
    """Which levers to pull; the defaults are minisd's defaults."""

    fused_qkv: bool = True
    cached_cross_kv: bool = True
    channels_last: bool | None = None  # None: what was measured fastest for the device and dtype

    @classmethod
    def none(cls) -> "SpeedLevers":
        """The models exactly as written in unet.py and vae.py."""
        return cls(fused_qkv=False, cached_cross_kv=False, channels_last=False)

    def layouts(self, device: torch.device, dtype: torch.dtype) -> dict[str, bool]:
        """Whether the UNet's and the VAE's convolutions run channels-last."""
        if self.channels_last is None:
            return channels_last_for(device, dtype)
        return {"unet": self.channels_last, "vae": self.channels_last}


def channels_last_for(device: torch.device, dtype: torch.dtype) -> dict[str, bool]:
    """The layout measured fastest on small-sd at 256x256 with one CPU thread (a CFG UNet step
    and one VAE decode; diffusers, which runs NCHW: UNet 2.95 s fp32, 1.64 s bf16):

        UNet fp32   NCHW 2.91 s   channels-last 3.10 s   (NCHW also leaves fp32 weights in
                                                          the file's mapping: no copy at load)
        UNet bf16   NCHW 1.59 s   channels-last 1.52 s
        VAE fp32    NCHW 6.70 s   channels-last 6.44 s   (the same in bf16)

    On CUDA, cuDNN's tensor-core convolutions want channels-last."""
    return {"unet": not (device.type == "cpu" and dtype == torch.float32), "vae": True}


def apply_levers(unet: nn.Module, levers: SpeedLevers) -> None:
    """Swap the UNet's attention layers for the fast equivalents `levers` asks for, in place.
    The swapped layers keep the same parameters under the same state-dict keys."""
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            if levers.fused_qkv and type(block.attn1) is Attention:
                block.attn1 = FusedSelfAttention(block.attn1)
            if levers.cached_cross_kv and type(block.attn2) is Attention:
                block.attn2 = CachedCrossAttention(block.attn2)


def _take_over(new: Attention, plain: Attention) -> None:
    """Make `new` use `plain`'s layers (the same parameter tensors, not copies)."""
    nn.Module.__init__(new)
    new.heads = plain.heads
    new.to_q, new.to_k, new.to_v, new.to_out = plain.to_q, plain.to_k, plain.to_v, plain.to_out


class FusedSelfAttention(Attention):
    """Self-attention whose q, k and v come from one matrix product. The three weights become
    views into one fused [3*dim, dim] tensor: no memory is duplicated, and the state dict
    keeps its `to_q/to_k/to_v` keys."""

    def __init__(self, plain: Attention):
        _take_over(self, plain)
        self._fuse()

    def _fuse(self) -> None:
        layers = (self.to_q, self.to_k, self.to_v)
        fused = torch.cat([layer.weight for layer in layers]).detach()
        for layer, weight in zip(layers, fused.chunk(3)):
            layer.weight = nn.Parameter(weight, requires_grad=False)
        self.qkv_weight = fused

    def _apply(self, fn, recurse=True):
        # `.to()`, `.half()`, `.cuda()` convert each parameter on its own, which would leave
        # the fused tensor behind: fuse again from the converted weights.
        super()._apply(fn, recurse)
        self._fuse()
        return self

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(*F.linear(x, self.qkv_weight).chunk(3, dim=-1))


class CachedCrossAttention(Attention):
    """Cross-attention that, inside `text_kv_cached`, reuses the text's keys and values
    computed once instead of projecting the same text at every step."""

    def __init__(self, plain: Attention):
        _take_over(self, plain)
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kv_context: torch.Tensor | None = None  # the context they were computed from

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.kv is None:
            return super().forward(x, context)
        if not torch.compiler.is_compiling() and context is not self.kv_context:
            raise RuntimeError("text_kv_cached: the UNet was called with another text context than the "
                               "one its keys and values were computed from")
        return self.attend(self.to_q(x), *self.kv)


@contextmanager
def text_kv_cached(unet: nn.Module, context: torch.Tensor) -> Iterator[None]:
    """Within the block, the UNet's cross-attention layers use the keys and values of
    `context` (the text, [B, 77, D]) computed here, once. A no-op for a UNet without
    `CachedCrossAttention` layers (the lever switched off)."""
    layers = [m for m in unet.modules() if isinstance(m, CachedCrossAttention)]
    for layer in layers:
        layer.kv, layer.kv_context = (layer.to_k(context), layer.to_v(context)), context
    try:
        yield
    finally:
        for layer in layers:
            layer.kv = layer.kv_context = None
