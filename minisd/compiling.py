"""torch.compile for the pipeline: which parts, with which Inductor settings, and why.

`Pipeline.from_pretrained(..., compile=True)` compiles the UNet (it runs at every step) and
the VAE decoder. On the CPU the decoder compiled with freezing measured level with eager in
isolation (918 against 920 ms per 256x256 decode, bf16, small-sd's VAE; 432 against 443 on a
faster machine): its convolutions already run oneDNN's kernels in the channels-last layout the
levers give it. But right after a generation's steps the eager decoder slows down, most after
int8 steps (1167, 1260, 798 ms against 478, 457, 565 for the decode after it): it allocates
200-300 MB of fresh activations per decode and takes 70,000-85,000 page faults, where the
compiled one plans its buffers (23,000-32,000 faults, 420-435 ms right after int8 steps,
docs/cpu-floor.md). So it is compiled, and kept in the package cache as the UNet is (an int8
pipeline compiles it too). The text encoder runs once per generation, about 1% of an image:
not worth its compile time. Not used: max-autotune (Inductor's C++ GEMM templates beside
oneDNN): on the AMX machine its int8 UNet step measured level (211 against 213 ms) for 200 s
more compiling (docs/cpu-floor.md). Shapes are
static (`dynamic=False`): the first image of each size and batch compiles, later steps,
prompts and seeds of that size reuse the code (tests/test_fast.py checks that nothing
recompiles).

On the CPU the setting that matters is Inductor's *freezing*: the weights are treated as
constants of the graph, so they are folded and prepacked once into the blocked layouts
oneDNN's convolution and matrix-product kernels want, and each convolution and linear is
fused with the pointwise operations around it; OpenVINO's CPU plugin does the same when it
compiles a model. Measured on small-sd's bf16 UNet at 256x256 (CFG batch, 2 threads): 611 ms
a step eager, 435 ms compiled with freezing; compiled without it, no faster than eager.
Freezing applies only to calls without autograd (the pipeline runs under `torch.no_grad`),
and it must be set while Inductor compiles, which happens inside the first call:
`compile_module` wraps the compiled call so the setting holds then and for any later
recompile, without changing Inductor's global configuration for other code in the process.
(Passing it as `torch.compile(options={"freezing": True})` does not reach the freezing pass
in torch 2.13: an int8 graph then fails to prepack its weights.) `cpp_wrapper` runs the
compiled graph from C++ and builds it as one C++ file: an int8 UNet of the tiny test model
compiled in 102 s instead of 168 s (99 kernels compiled one by one). What it measured is in
README.md, Speed.

Compile once, not once per process: Inductor's on-disk FX graph cache refuses a frozen graph
whose weights were prepacked into oneDNN tensors ("mkldnn tensors unpickleable"). So on the
CPU the UNet and the VAE decoder are compiled ahead of time instead (AOTInductor, the same
Inductor code and settings) into packages kept on disk per model and size, which later processes load in
seconds (compile_cache.py); calls it cannot serve (autograd on, other arguments) and the step
skipping UNets compile in process. The frozen weights live in the compiled code: change the
model's weights after its first compiled call and the compiled code will not see it (compile
again: `Pipeline.compile`; the package cache keys on the weights, so it compiles anew).

On CUDA, mode "reduce-overhead" (CUDA graphs); freezing is a CPU lever here. No GPU has
measured this path yet.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .compile_cache import CachedDecoderCall, CachedUNetCall, PackageCache, cache_folder
from .fast import uncache_cross_kv
from .unet import UNet2DConditionModel
from .vae import Decoder


# The models compiled ahead of time into the package cache on the CPU, and the call that serves each.
AHEAD_OF_TIME = ((UNet2DConditionModel, CachedUNetCall), (Decoder, CachedDecoderCall))


def inductor_settings(device: torch.device) -> dict:
    """The Inductor configuration `compile_module` compiles under on this device."""
    return {"freezing": True, "cpp_wrapper": True} if device.type == "cpu" else {}


def default_mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_module(module: nn.Module, device: torch.device, mode: str | None = None,
                   cache: str | Path | bool | None = None) -> None:
    """torch.compile `module` in place (its state dict, attributes and hooks stay as they
    are), static shapes and one graph for the whole forward, compiled under
    `inductor_settings(device)`. A UNet on the CPU in the default mode is compiled ahead of time
    into the package cache instead (compile_cache.py; `cache`: its folder, False for none,
    None for the default one)."""
    settings = inductor_settings(device)
    mode = mode or default_mode(device)
    if settings.get("freezing"):
        uncache_cross_kv(module)  # its cached K/V would be frozen into the graph (fast.py says more)
    module.compile(mode=mode, fullgraph=True, dynamic=False)
    if settings:
        # nn.Module.compile keeps the compiled call in `_compiled_call_impl`, which __call__
        # uses; compilation itself happens inside that call, so the settings go around it.
        module._compiled_call_impl = WithInductorSettings(module._compiled_call_impl, settings)
    folder = cache_folder(cache)
    cached_call = next((call for kind, call in AHEAD_OF_TIME if isinstance(module, kind)), None)
    if device.type == "cpu" and mode == "default" and folder is not None and cached_call is not None:
        # AOTInductor always generates a C++ wrapper: only freezing is passed on.
        ahead_of_time = {key: value for key, value in settings.items() if key != "cpp_wrapper"}
        module._compiled_call_impl = cached_call(module, module._compiled_call_impl, ahead_of_time,
                                                 PackageCache(folder))


class WithInductorSettings:
    """A compiled callable run with `torch._inductor.config` patched to `settings`."""

    def __init__(self, compiled, settings: dict):
        self.compiled, self.settings = compiled, settings

    def __call__(self, *args, **kwargs):
        import torch._inductor.config as inductor_config  # loaded by torch.compile already

        with inductor_config.patch(self.settings):
            return self.compiled(*args, **kwargs)
