"""Step skipping: two training-free ways to spend less work on an image, both opt-in.

T-GATE, `gate_step=K` (https://arxiv.org/abs/2404.02747): cross-attention settles early in
sampling, once the layout is planned. So after the first K steps every cross-attention layer's
output is frozen at the mean of its unconditional and conditional outputs at step K-1, and
classifier-free guidance stops: the UNet runs on the latents alone (batch 1 per image, not 2)
and does no cross-attention work at all. The tgate package gates the same way at its
`gate_step` (it can also cache self-attention, which minisd does not).

DeepCache, `cache_interval=N` (https://arxiv.org/abs/2312.00858): the UNet's deep features
change slowly from step to step, its shallow ones quickly. So every N-th step runs the whole
UNet and keeps the features that enter the shallow part of the up path; the steps in between
run only the shallow part, from the cached features:

    full step:     conv_in -> down path -> mid -> up path ---------------------> conv_out
                                                          \\ features cached at skip branch b
    shallow step:  conv_in -> the first b down layers ..... cached features -> the last b+1 up layers -> conv_out

The skip branches are numbered from the outside: branch 0 is the skip from conv_in to the
last up layer, branch b the skip saved by the b-th down layer (a resnet with its attention, or
a downsampler) and read by the (b+1)-th up layer from the end. `cache_branch` picks it. The
default, chosen by tools/frontier.py's measurements, is branch 0, as in DeepCache's package: a
shallow step runs conv_in, the last up layer and conv_out. Branch `layers_per_block` (what
enters the last up block: the first down block's layers and the whole last up block run) gave
the embedded model the same accuracy (within half a point either way at 15, 20 and 25 steps)
and took 13-14% longer per image on small-sd's shapes (README, Speed). (DeepCache's package
numbers the same branches the same way, `cache_branch_id`, for layers_per_block=2.)

Both combine. The step before the gate always runs full, so that every layer's cross-attention
is recorded at one step; at the gate the batch halves, so the cache starts again there (the
first gated step runs full) and counts its interval from it. Steps are counted over the steps
the loop runs (img2img runs fewer: `strength`). What each costs in quality against what it
saves is measured by tools/frontier.py (README, Speed).

`SkippingUNet` is the UNet cut where the two methods need it, as a pure function of its
inputs (cached features in, features to cache out), so that torch.compile can compile it like
the UNet itself, and int8 can quantize it (int8.py's Int8SkippingUNet: one int8 graph per kind
of step); `StepSkipping` holds one generation's caches and decides each step. tgate's and
DeepCache's packages on diffusers give the same images to float32 rounding
(tests/test_step_skipping_addons.py).
"""
from __future__ import annotations

import itertools
import numbers
import warnings

import torch
from einops import rearrange
from torch import nn

from .compiling import compile_module
from .errors import InputError
from .unet import Transformer2DModel, UNet2DConditionModel, to_feature_map


def count_branches(unet: UNet2DConditionModel) -> int:
    """The number of skip branches: conv_in's and one per down layer and downsampler."""
    return 1 + sum(len(block.resnets) + (block.downsamplers is not None) for block in unet.down_blocks)


def default_branch(unet: UNet2DConditionModel) -> int:
    """The skip branch cached when none is asked for: the module docstring says why this one."""
    return 0


def check_step_skipping(gate_step, cache_interval, cache_branch, unet) -> None:
    """Clear errors for settings no generation can run with."""
    for name, value, least in (("gate_step", gate_step, 1), ("cache_interval", cache_interval, 1),
                               ("cache_branch", cache_branch, 0)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least):
            raise InputError(f"{name}: must be an integer >= {least} (or None: off), got {value!r:.80}")
    if cache_branch is not None:
        if cache_interval is None:
            raise InputError("cache_branch: applies with cache_interval only; pass cache_interval= as well")
        if cache_branch >= count_branches(unet):
            raise InputError(f"cache_branch: this UNet has skip branches 0 to {count_branches(unet) - 1}, "
                             f"got {cache_branch}")


def step_skipping_for(pipe, gate_step, cache_interval, cache_branch, guided: bool) -> "StepSkipping | None":
    """The pipeline's step skipping for one generation, None when off. The cut UNet is kept
    per branch in `pipe.skipping_models`, and compiled when the pipeline's UNet is: one graph
    per kind of step it meets (full, recording, shallow, gated, gated shallow) and size. (Past
    Dynamo's recompile limit, `torch._dynamo.config.recompile_limit`, 8 by default, further
    kinds and sizes run eagerly, with Dynamo's warning.)"""
    if gate_step is None and cache_interval is None:
        return None
    if hasattr(pipe.unet, "skipping_model"):  # an int8 UNet quantizes its own cut (int8.py)
        return StepSkipping(pipe.unet.skipping_model(cache_branch), gate_step, cache_interval, guided)
    compiled = getattr(pipe.unet, "_compiled_call_impl", None) is not None  # Pipeline.compile ran
    model = pipe.skipping_models.get(cache_branch)
    if model is None or model.unet is not pipe.unet or model.compiled != compiled:  # none yet, or stale
        model = SkippingUNet(pipe.unet, None if cache_branch is None else int(cache_branch))
        if compiled:
            compile_module(model, pipe.device)
        model.compiled = compiled
        pipe.skipping_models[cache_branch] = model
    return StepSkipping(model, gate_step, cache_interval, guided)


class SkippingUNet(nn.Module):
    """`model(sample, t, context, deep=None, cross=None, record=False) -> (noise, deep, recorded)`:
    the UNet's own layers, run in its order, with two cuts.

    - `deep` given: a shallow step from these cached features (DeepCache); otherwise a full
      step, which returns the features entering up layer -(branch+1), to cache.
    - `cross` given (one tensor per cross-attention layer, in the order a full step runs them):
      each cross-attention's output is taken from it, and `context` is not used (T-GATE).
    - `record=True`: a full step also returns every cross-attention layer's output.
    tests/test_step_skipping.py checks a full step against the UNet itself, bit for bit, and a
    shallow step fed fresh features against it too."""

    def __init__(self, unet: UNet2DConditionModel, branch: int | None = None):
        super().__init__()
        self.unet = unet
        self.compiled = False  # set by step_skipping_for when it compiles this
        self.branch = default_branch(unet) if branch is None else branch
        # Each layer with its cross-attention's place in `cross`: the order a full step runs them.
        counter = itertools.count()

        def numbered(attention):
            return None if attention is None else (attention, next(counter))

        # The down path as skip-saving layers: (resnet, (attention, k) or None), or (downsampler,).
        self.down_layers = []
        for block in unet.down_blocks:
            for i, resnet in enumerate(block.resnets):
                self.down_layers.append((resnet, numbered(block.attentions and block.attentions[i])))
            if block.downsamplers is not None:
                self.down_layers.append((block.downsamplers[0],))
        self.mid_attention = numbered(unet.mid_block.attentions[0])
        # The up path: (resnet, (attention, k) or None, the block's upsampler after its last layer).
        self.up_layers = []
        for block in unet.up_blocks:
            for i, resnet in enumerate(block.resnets):
                last = i == len(block.resnets) - 1
                self.up_layers.append((resnet, numbered(block.attentions and block.attentions[i]),
                                       block.upsamplers[0] if last and block.upsamplers is not None else None))
        self.entry = len(self.up_layers) - 1 - self.branch  # the up layer that reads the cached features

    def forward(self, sample: torch.Tensor, timestep, context: torch.Tensor | None = None,
                deep: torch.Tensor | None = None, cross: tuple[torch.Tensor, ...] | None = None,
                record: bool = False):
        unet, recorded = self.unet, {}

        def attend(numbered_attention, x: torch.Tensor) -> torch.Tensor:
            if numbered_attention is None:  # a block without attention
                return x
            layer, k = numbered_attention
            if cross is None and not record:
                return layer(x, context)
            x, recorded[k] = transformer_with_cross(layer, x, context, None if cross is None else cross[k])
            return x

        temb = unet.embed_timestep(timestep, sample)
        x = unet.conv_in(sample)
        skips = [x]
        for layer in self.down_layers[: self.branch if deep is not None else None]:
            if len(layer) == 1:  # a downsampler
                x = layer[0](x)
            else:
                x = attend(layer[1], layer[0](x, temb))
            skips.append(x)

        if deep is None:  # a full step: middle, then the deep part of the up path
            mid = unet.mid_block
            x = mid.resnets[1](attend(self.mid_attention, mid.resnets[0](x, temb)), temb)
            x = self.run_up(self.up_layers[: self.entry], x, skips, temb, attend)
            deep = x
        x = self.run_up(self.up_layers[self.entry:], deep, skips, temb, attend)
        noise = unet.conv_out(torch.nn.functional.silu(unet.conv_norm_out(x)))
        return noise, deep, tuple(recorded[k] for k in sorted(recorded)) if record else None

    @staticmethod
    def run_up(layers, x, skips, temb, attend) -> torch.Tensor:
        """Up layers in order, each reading the newest skip (as UpBlock.forward does)."""
        for resnet, attention, upsampler in layers:
            x = attend(attention, resnet(torch.cat([x, skips.pop()], dim=1), temb))
            if upsampler is not None:  # to the next skip's size (UNet2DConditionModel.forward says why)
                x = upsampler(x, skips[-1].shape[-2:])
        return x


def transformer_with_cross(layer: Transformer2DModel, x: torch.Tensor, context: torch.Tensor | None,
                           cross: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer(x, context)` (unet.py's Transformer2DModel and BasicTransformerBlock, step for
    step), with the cross-attention's output `cross` given instead of computed, and returned."""
    tokens = rearrange(layer.proj_in(layer.norm(x)), "b c h w -> b (h w) c")
    (block,) = layer.transformer_blocks  # SD v1: one transformer block per layer
    tokens = tokens + block.attn1(block.norm1(tokens))
    cross = block.attn2(block.norm2(tokens), context) if cross is None else cross
    tokens = tokens + cross
    tokens = tokens + block.ff(block.norm3(tokens))
    return x + layer.proj_out(to_feature_map(tokens, like=x)), cross


class StepSkipping:
    """One generation's step skipping: which steps run full, shallow or gated, and the caches.
    `unet_for_step(i)` is the UNet the sampling loop calls at step i; `gated(i)` tells the loop
    that guidance is over."""

    def __init__(self, model: SkippingUNet, gate_step: int | None, cache_interval: int | None, guided: bool):
        self.model, self.guided = model, guided
        self.gate_step, self.cache_interval = (None if n is None else int(n) for n in (gate_step, cache_interval))
        self.deep: dict[tuple, torch.Tensor] = {}  # per UNet input shape: the two passes of unbatched CFG differ
        self.recorded: list[tuple[torch.Tensor, ...]] = []  # the cross-attention outputs at step gate_step - 1
        self.frozen: tuple[torch.Tensor, ...] | None = None

    def gated(self, i: int) -> bool:
        return self.gate_step is not None and i >= self.gate_step

    def runs_full(self, i: int) -> bool:
        if self.cache_interval is None or (self.gate_step is not None and i == self.gate_step - 1):
            return True
        since = i - self.gate_step if self.gated(i) else i  # at the gate the batch halves: a fresh cache
        return since % self.cache_interval == 0

    def unet_for_step(self, i: int):
        def unet(sample: torch.Tensor, t, context: torch.Tensor | None) -> torch.Tensor:
            cross = self.frozen_cross() if self.gated(i) else None
            context = None if cross is not None else context  # past the gate the text is not read
            key = (tuple(sample.shape), None if context is None else tuple(context.shape))
            if not self.runs_full(i):
                return self.model(sample, t, context, self.deep[key], cross)[0]
            record = self.gate_step is not None and i == self.gate_step - 1
            noise, deep, recorded = self.model(sample, t, context, None, cross, record)
            if self.cache_interval is not None:
                self.deep[key] = deep
            if record:
                self.recorded.append(recorded)
            return noise
        return unet

    def frozen_cross(self) -> tuple[torch.Tensor, ...]:
        """Each cross-attention layer's output from the step before the gate: with guidance the
        mean of its unconditional and conditional halves (or passes), else as it was."""
        if self.frozen is None:
            if len(self.recorded) == 2:  # unbatched CFG: the unconditional pass, then the conditional
                self.frozen = tuple((u + c) / 2 for u, c in zip(*self.recorded))
            elif self.guided:
                self.frozen = tuple(sum(out.chunk(2)) / 2 for out in self.recorded[0])
            else:
                self.frozen = self.recorded[0]
            self.recorded = []
        return self.frozen


def warn_if_gate_unreached(gate_step: int | None, steps_run: int) -> None:
    if gate_step is not None and gate_step >= steps_run:
        warnings.warn(f"gate_step={gate_step}: only {steps_run} steps run, so none is gated", stacklevel=3)


# --- the command line: `minisd generate` and `minisd batch` share these options -------------

# --fast: a setting on the Pareto front tools/frontier.py measured on the embedded model (README,
# Speed): 20 steps, the gate at 60% of them, the whole UNet every second step, caching what
# enters the last up block (branch layers_per_block). There it took 0.42x the time of plain 25
# steps for 98.0% mean accuracy against 99.2% (shape 92% against 98%).
FAST_STEPS, FAST_GATE_SHARE, FAST_CACHE_INTERVAL = 20, 0.6, 2

def check_step_skipping_options(args) -> None:
    """--gate-step, --cache-interval, --cache-branch, before the model loads (the branch's
    upper bound depends on the model: the pipeline checks it)."""
    for name, value, least in (("--gate-step", args.gate_step, 1), ("--cache-interval", args.cache_interval, 1),
                               ("--cache-branch", args.cache_branch, 0)):
        if value is not None and value < least:
            raise InputError(f"{name}: must be at least {least}, got {value}")
    if args.cache_branch is not None and args.cache_interval is None:
        raise InputError("--cache-branch: applies with --cache-interval only; give --cache-interval N too")


def step_skipping(args, pipe, steps: int | None = None) -> dict:
    """The step-skipping keywords of `pipe`'s call of `steps` (default --steps), and of its
    generation_parameters: every value as used, the default branch too, so that the PNG says
    it. --fast fills in what was not given explicitly."""
    gate, interval, branch = args.gate_step, args.cache_interval, args.cache_branch
    if getattr(args, "fast", False):
        gate = round(FAST_GATE_SHARE * (steps or args.steps)) if gate is None else gate
        interval = FAST_CACHE_INTERVAL if interval is None else interval
        branch = pipe.unet.config.layers_per_block if branch is None else branch  # the branch measured
    if interval is not None and branch is None:
        branch = default_branch(pipe.unet)
    return {"gate_step": gate, "cache_interval": interval, "cache_branch": branch}
