"""Speed levers: faster equivalents of parts of the models, applied in one place.

unet.py, vae.py and clip.py compute the textbook math and nothing else. Each lever here makes
that math cheaper without changing its result beyond float rounding; each can be switched off
(`SpeedLevers(fused_qkv=False)`, or `SpeedLevers.none()` for the textbook path everywhere);
tests/test_fast.py checks each against the plain path and against diffusers.

    Pipeline.from_pretrained(folder)                            # every lever on
    Pipeline.from_pretrained(folder, levers=SpeedLevers.none()) # the models exactly as written

`apply_levers` swaps layers for faster subclasses that hold the same parameters (the state dict
keeps its keys); the layout is chosen when the weights are read.

What each lever changed, as time relative to no lever (below 1: faster), measured by
tools/bench_levers.py on small-sd's shapes at 256x256, CFG batch of 2, medians of 9, on this
project's 2-core AMD EPYC: one thread / two threads. A UNet step varies by about 4% from run
to run on this shared machine, so only the larger effects are settled:

                          UNet step              VAE decode
    lever                 fp32        bf16        fp32        bf16
    fused_qkv             1.00/0.97   1.01/0.99   -           -
    cached_cross_kv       0.99/0.99   0.99/0.96   -           -
    inplace_residuals     0.98/1.00   0.98/0.97   1.00/0.92   1.02/1.00
    channels_last         1.00/1.05   0.92/0.96   0.89/0.71   0.91/0.87
    all (the defaults)    0.98/0.97   0.91/0.95   0.86/0.70   0.89/0.88

- fused_qkv: self-attention's q, k and v from one [3*dim, dim] matrix product, one pass over
  the pixels' features instead of three: 0-3% of a step here; the usual GPU recipe.
- cached_cross_kv: cross-attention's keys and values depend only on the text, the same at every
  step: computed once per generation, they save small-sd's 10 cross-attention layers two
  [2 x 77, 768] x [768, dim] products a step, 3.8 of its 236.8 GFLOP (1.6%).
- inplace_residuals: every x + F(x) adds x into F(x)'s own fresh output instead of into a new
  tensor; on the CPU each new full-size tensor costs page faults. In one process beside other
  models (above) that is 0-8%; in whole images, where tools/bench.py gives each library a
  process of its own, leaving these adds out cost minisd's bf16 image 5-14% against its
  previous version in three runs, and with them it measured level (0.92 and 0.93 of it).
- channels_last: kernels and feature maps stored NHWC, the layout oneDNN's (CPU) and cuDNN's
  (tensor cores) fast convolutions want: 4-8% of a bf16 UNet step, 9-29% of a VAE decode. For
  the fp32 UNet on the CPU it measured level or 5% slower, and NCHW leaves fp32 weights in the
  file's memory mapping (nothing copied at load), so that one stays NCHW (`channels_last_for`).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Attention, BasicTransformerBlock, ResnetBlock2D, Transformer2DModel
from .vae import VAEAttention


@dataclass(frozen=True)
class SpeedLevers:
    """Which levers `Pipeline.from_pretrained` pulls; all of them by default."""

    fused_qkv: bool = True  # self-attention: FusedSelfAttention, one matrix product for q, k, v
    cached_cross_kv: bool = True  # cross-attention: CachedCrossAttention, the text's K/V once
    inplace_residuals: bool = True  # every x + F(x): the InPlace* layers, no new tensor for the sum
    channels_last: bool | None = None  # NHWC convolutions; None: as channels_last_for measured

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
    """Channels-last everywhere except the fp32 UNet on the CPU (the table above says why);
    on CUDA, cuDNN's tensor-core convolutions want channels-last."""
    return {"unet": not (device.type == "cpu" and dtype == torch.float32), "vae": True}


def apply_levers(levers: SpeedLevers, *models: nn.Module) -> None:
    """Swap the models' layers for the fast equivalents `levers` asks for, in place."""

    def faster(name: str, layer: nn.Module) -> nn.Module | None:
        if type(layer) is Attention and name == "attn1" and levers.fused_qkv:
            return FusedSelfAttention.of(layer)
        if type(layer) is Attention and name == "attn2" and levers.cached_cross_kv:
            return CachedCrossAttention.of(layer)
        if type(layer) in IN_PLACE and levers.inplace_residuals:
            return IN_PLACE[type(layer)].of(layer)
        return None

    for model in models:
        swap_layers(model, faster)


def swap_layers(model: nn.Module, replacement: Callable[[str, nn.Module], nn.Module | None]) -> None:
    """Replace, in place, each layer of `model` for which `replacement(name, layer)` gives a
    new one (None: keep it). Inner layers first: a swapped block takes the swapped ones over."""
    layers = [(parent, name, layer) for parent in model.modules() for name, layer in parent.named_children()]
    for parent, name, layer in reversed(layers):
        new = replacement(name, layer)
        if new is not None:
            setattr(parent, name, new)


def rebuilt_as(cls: type, layer: nn.Module) -> nn.Module:
    """An instance of `cls` holding `layer`'s very layers and parameters (no copies)."""
    new = cls.__new__(cls)
    # nn.Module keeps its settings and its registries (layers, parameters, hooks) in __dict__:
    # share the values, copy the registries.
    new.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in layer.__dict__.items()})
    return new


def uncache_cross_kv(model: nn.Module) -> None:
    """Turn `model`'s CachedCrossAttention layers back into plain cross-attention, in place.
    For torch.compile with Inductor's freezing (compiling.py), which takes every tensor held
    by a layer as a constant of the graph: the cached K/V of one prompt would be guarded on
    and baked in, and each new prompt would recompile. The compiled graph projects the text
    at every step instead (1.6% of a step at 256x256, fused by Inductor)."""
    def plain(name: str, layer: nn.Module) -> nn.Module | None:
        if not isinstance(layer, CachedCrossAttention):
            return None
        attention = rebuilt_as(Attention, layer)
        del attention.kv
        return attention

    swap_layers(model, plain)


class _Swapped(nn.Module):
    """A faster subclass of a model layer, made from a loaded layer by `of`."""

    @classmethod
    def of(cls, plain: nn.Module):
        """An instance of this class holding `plain`'s very layers and parameters (no copies)."""
        fast = rebuilt_as(cls, plain)
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
        self.kv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (context, keys, values)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if not self.kv:
            return super().forward(x, context)
        compiling = torch.compiler.is_compiling()
        for cached, k, v in self.kv:
            # Compiled code cannot test identity; the contexts of one block differ in shape
            # (contexts of one shape run as one batch).
            if (context.shape == cached.shape) if compiling else (context is cached):
                return self.attend(self.to_q(x), k, v)
        raise RuntimeError("text_kv_cached: the UNet was called with another text context than the "
                           "ones its keys and values were computed from")


# The residual adds, x + F(x), with x added into F(x)'s own fresh tensor rather than into a new
# one: on the CPU every new full-size tensor costs page faults. (The layer that made F(x), a
# convolution or a linear, keeps no output for a backward pass, so autograd allows it.)

class InPlaceResidualBlock(_Swapped, ResnetBlock2D):
    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.residual(x, temb).add_(self.shortcut(x))


class InPlaceTransformer2D(_Swapped, Transformer2DModel):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.residual(x, context).add_(x)


class InPlaceTransformerBlock(_Swapped, BasicTransformerBlock):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class InPlaceVAEAttention(_Swapped, VAEAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x).add_(x)


IN_PLACE = {ResnetBlock2D: InPlaceResidualBlock, Transformer2DModel: InPlaceTransformer2D,
            BasicTransformerBlock: InPlaceTransformerBlock, VAEAttention: InPlaceVAEAttention}


@contextmanager
def text_kv_cached(unet: nn.Module, *contexts: torch.Tensor) -> Iterator[None]:
    """Within the block, the UNet's cross-attention layers use the keys and values of each of
    `contexts` (the text, [B, T, D]; two when the conditional and unconditional passes run
    apart) computed here, once. A no-op for a UNet without `CachedCrossAttention` layers (the
    lever switched off)."""
    layers = [m for m in unet.modules() if isinstance(m, CachedCrossAttention)]
    if any(layer.kv for layer in layers):
        raise RuntimeError("text_kv_cached: this UNet is already inside a text_kv_cached block "
                           "(one generation at a time per model)")
    for layer in layers:
        layer.kv = [(context, layer.to_k(context), layer.to_v(context)) for context in contexts]
    try:
        yield
    finally:
        for layer in layers:
            layer.kv = []
