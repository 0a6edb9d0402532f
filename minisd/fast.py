"""Speed levers: faster equivalents of parts of the models, applied in one place.

unet.py, vae.py and clip.py compute the textbook math and nothing else. Each lever here makes
that math cheaper without changing its result beyond float rounding; each can be switched off
(`SpeedLevers(fused_qkv=False)`, or `SpeedLevers.none()` for the textbook path everywhere);
tests/test_fast.py checks each against the plain path and against diffusers.

    Pipeline.from_pretrained(folder)                            # every lever on
    Pipeline.from_pretrained(folder, levers=SpeedLevers.none()) # the models exactly as written

`apply_levers` swaps layers for faster subclasses that hold the same parameters (the state dict
keeps its keys), except for the layout, which is chosen when the weights are read.

MEASURED
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Attention, ResnetBlock2D


@dataclass(frozen=True)
class SpeedLevers:
    """Which levers to pull; the defaults are minisd's defaults."""

    fused_qkv: bool = True
    cached_cross_kv: bool = True
    inplace_residuals: bool = True
    channels_last: bool | None = None  # None: what was measured fastest for the device and dtype

    @classmethod
    def none(cls) -> "SpeedLevers":
        """The models exactly as written in unet.py and vae.py."""
        return cls(fused_qkv=False, cached_cross_kv=False, inplace_residuals=False, channels_last=False)

    def layouts(self, device: torch.device, dtype: torch.dtype) -> dict[str, bool]:
        """Whether the UNet's and the VAE's convolutions run channels-last."""
        if self.channels_last is None:
            return channels_last_for(device, dtype)
        return {"unet": self.channels_last, "vae": self.channels_last}


def channels_last_for(device: torch.device, dtype: torch.dtype) -> dict[str, bool]:
    """The layout measured fastest for small-sd on the CPU; on CUDA, cuDNN's tensor-core
    convolutions want channels-last. LAYOUTS"""
    return {"unet": not (device.type == "cpu" and dtype == torch.float32), "vae": True}


def apply_levers(levers: SpeedLevers, *models: nn.Module) -> None:
    """Swap the models' layers for the fast equivalents `levers` asks for, in place."""
    for model in models:
        layers = [(parent, name, layer) for parent in model.modules() for name, layer in parent.named_children()]
        for parent, name, layer in layers:
            if type(layer) is Attention and name == "attn1" and levers.fused_qkv:
                setattr(parent, name, FusedSelfAttention.of(layer))
            elif type(layer) is Attention and name == "attn2" and levers.cached_cross_kv:
                setattr(parent, name, CachedCrossAttention.of(layer))
            elif type(layer) is ResnetBlock2D and levers.inplace_residuals:
                setattr(parent, name, InPlaceResidualBlock.of(layer))


class _Swapped(nn.Module):
    """A faster subclass of a model layer, made from a loaded layer by `of`."""

    @classmethod
    def of(cls, plain: nn.Module):
        """An instance of this class holding `plain`'s very layers and parameters (no copies)."""
        fast = cls.__new__(cls)
        # nn.Module keeps its settings and its registries (layers, parameters, hooks) in __dict__:
        # share the values, copy the registries.
        fast.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in plain.__dict__.items()})
        fast._setup()
        return fast

    def _setup(self) -> None:
        pass


class FusedSelfAttention(_Swapped, Attention):
    """Self-attention whose q, k and v come from one matrix product. The three weights become
    views into one fused [3*dim, dim] tensor: no memory is duplicated, and the state dict
    keeps its `to_q/to_k/to_v` keys."""

    def _setup(self) -> None:
        layers = (self.to_q, self.to_k, self.to_v)
        fused = torch.cat([layer.weight for layer in layers]).detach()
        for layer, weight in zip(layers, fused.chunk(3)):
            layer.weight = nn.Parameter(weight, requires_grad=False)  # inference only: frozen
        self.qkv_weight = fused
        if not self._load_state_dict_post_hooks:  # a load that assigns new tensors: fuse those
            self.register_load_state_dict_post_hook(lambda module, _: module._setup())

    def _apply(self, fn, recurse=True):
        # `.to()`, `.half()`, `.cuda()` convert each parameter on its own, which would leave
        # the fused tensor behind: fuse again from the converted weights.
        super()._apply(fn, recurse)
        self._setup()
        return self

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(*F.linear(x, self.qkv_weight).chunk(3, dim=-1))


class CachedCrossAttention(_Swapped, Attention):
    """Cross-attention that, inside `text_kv_cached`, reuses the text's keys and values
    computed once instead of projecting the same text at every step."""

    def _setup(self) -> None:
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kv_context: torch.Tensor | None = None  # the context they were computed from

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.kv is None:
            return super().forward(x, context)
        if not torch.compiler.is_compiling() and context is not self.kv_context:
            raise RuntimeError("text_kv_cached: the UNet was called with another text context than the "
                               "one its keys and values were computed from")
        return self.attend(self.to_q(x), *self.kv)


class InPlaceResidualBlock(_Swapped, ResnetBlock2D):
    """x + F(x), with x added into F(x)'s own fresh tensor rather than into a new one: on the
    CPU every new full-size tensor costs page faults. Autograd allows it: conv2, which made
    F(x), does not keep its output for the backward pass."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.residual(x, temb).add_(self.shortcut(x))


@contextmanager
def text_kv_cached(unet: nn.Module, context: torch.Tensor) -> Iterator[None]:
    """Within the block, the UNet's cross-attention layers use the keys and values of
    `context` (the text, [B, 77, D]) computed here, once. A no-op for a UNet without
    `CachedCrossAttention` layers (the lever switched off)."""
    layers = [m for m in unet.modules() if isinstance(m, CachedCrossAttention)]
    if any(layer.kv is not None for layer in layers):
        raise RuntimeError("text_kv_cached: this UNet is already inside a text_kv_cached block "
                           "(one generation at a time per model)")
    for layer in layers:
        layer.kv, layer.kv_context = (layer.to_k(context), layer.to_v(context)), context
    try:
        yield
    finally:
        for layer in layers:
            layer.kv = layer.kv_context = None
