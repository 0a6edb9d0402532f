"""Compiled UNets (and VAE decoders) kept on disk, so that a model is compiled once per size,
not once per process.

On the CPU, `compile=True` compiles the UNet with Inductor's freezing (compiling.py), about a
minute and a half for small-sd at 256x256 on two cores. Inductor's own on-disk graph cache
cannot keep such a graph: its frozen weights are prepacked oneDNN tensors, which it refuses to
pickle, so every new process used to compile again. Here the UNet is instead exported
(torch.export) and compiled ahead of time by AOTInductor into a package, one `.pt2` file per
model, input shapes and settings, holding the generated C++ code built as a shared library and
the frozen, prepacked weights (https://pytorch.org/docs/stable/torch.compiler_aot_inductor.html).
A later process with the same model and size loads the package in seconds. The code it runs is
the code the in-process compile makes (same Inductor, same settings, same kernels); loaded by
torch's own package loader it ran 7-30% slower (int8 and bf16 UNet steps, docs/cpu-floor.md),
its weights copied 16 bytes off a cache line, so aoti_package.py loads it with the weights
re-homed on cache-line boundaries. The int8 UNet (int8.py) is kept the same way, its key
holding the calibration inputs too: a later process still runs the calibration generations,
but not the quantization and compile.

    ~/.cache/minisd/compiled/unet-<key>.pt2         ($XDG_CACHE_HOME, or MINISD_COMPILE_CACHE)
    ~/.cache/minisd/compiled/unet-int8-<key>.pt2
    ~/.cache/minisd/compiled/vae-decoder-<key>.pt2  (compiling.py says why the decoder too)

The key is a hash of everything the compiled code depends on: the model's weights (their bytes:
a fine-tune or a merged LoRA is another model), its layers, the input shapes and dtypes,
Inductor's settings, the CPU's instruction set, and the versions of torch and of minisd's
source. A package that fails to load (a truncated copy, another torch) is compiled again and
replaced. A package is as large as the UNet's weights (1.1 GB for small-sd in bfloat16): delete
the folder to free the space; `MINISD_COMPILE_CACHE=off` (or `compile_cache=False`) compiles
in memory in each process as before. The folder holds native code that minisd loads and runs:
keep it where only you can write, as Inductor's own cache in /tmp/torchinductor_$USER.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .aoti_package import load_package

log = logging.getLogger("minisd")

FORMAT = 1  # bump when what goes into a package changes in a way the key does not see
OFF = ("", "0", "off", "false", "no", "none")


def cache_folder(setting: str | Path | bool | None = None) -> Path | None:
    """Where compiled packages live: `setting` when a path, None when caching is off (False or
    MINISD_COMPILE_CACHE=off), else $MINISD_COMPILE_CACHE or $XDG_CACHE_HOME/minisd/compiled
    (~/.cache/minisd/compiled)."""
    if setting is False:
        return None
    if setting not in (None, True):
        return Path(setting).expanduser()
    env = os.environ.get("MINISD_COMPILE_CACHE")
    if env is not None:
        return None if env.strip().lower() in OFF else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minisd" / "compiled"


@functools.cache  # the files do not change under a running process
def _source_digest() -> str:
    """A hash of minisd's own source files: a change to the models' code changes the key."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def fingerprint(module: nn.Module, inputs: tuple[torch.Tensor, ...], settings: dict, extra: str = "") -> str:
    """The cache key of `module` compiled for `inputs` under `settings` (the module docstring
    lists what goes in). Reads every weight once: under a second per GB."""
    digest = hashlib.sha256()  # hardware-assisted: 0.6 s per GB here, blake2b 1.5 s
    head = [f"format {FORMAT}", torch.__version__, _source_digest(), torch.backends.cpu.get_cpu_capability(),
            vector_isa(),
            repr(sorted(settings.items())), extra]
    head += [f"{tuple(x.shape)} {x.dtype} {x.stride()}" for x in inputs]
    head += [f"{name} {type(layer).__module__}.{type(layer).__qualname__} {layer.extra_repr()}"
             for name, layer in module.named_modules()]
    digest.update("\n".join(head).encode())
    for name, tensor in module.state_dict(keep_vars=False).items():
        hash_tensor(digest, tensor, f"\n{name} {tensor.stride()}")
    return digest.hexdigest()


def vector_isa() -> str:
    """The CPU's vector and matrix instruction sets that Inductor's generated code may use
    ("avx512 avx512_bf16 vnni amx_tile"): finer than the capability torch dispatches on, which
    reads AVX512 on both kinds of machine this project runs on, with AMX and without."""
    checks = ("avx2", "avx512", "avx512_bf16", "vnni", "amx_tile", "amx_fp16")
    return " ".join(name for name in checks if getattr(torch.cpu, f"_is_{name}_supported", lambda: False)())


def hash_tensor(digest, tensor: torch.Tensor, label: str = "") -> None:
    """Feed `label`, the tensor's dtype and shape, then its bytes to a hashlib `digest`."""
    digest.update(f"{label} {tensor.dtype} {tuple(tensor.shape)}".encode())
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")


def tensors_digest(records: list[tuple]) -> str:
    """A hash of the calibration inputs (their shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for record in records:
        for x in record:
            if isinstance(x, torch.Tensor):
                hash_tensor(digest, x)
            else:
                digest.update(repr(x).encode())
    return digest.hexdigest()


class PackageCache:
    """Compiled packages in one folder: `load_or_build(name, key, export, settings)`."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, name: str, key: str) -> Path:
        return self.folder / f"{name}-{key}.pt2"

    def load_or_build(self, name: str, key: str, export: Callable[[], torch.export.ExportedProgram],
                      settings: dict) -> Callable:
        """The compiled callable for `key`: loaded from the folder, or built from `export()` with
        AOTInductor under Inductor `settings`, written to the folder (whole or not at all), then
        loaded."""
        path = self.path(name, key)
        if path.exists():
            start = time.perf_counter()
            try:
                compiled = load_package(path)
            except Exception as e:  # noqa: BLE001 - any failure to load means: compile again
                warnings.warn(f"compiled {name} in {path} could not be loaded ({type(e).__name__}: "
                              f"{str(e)[:200]}); compiling it again", stacklevel=3)
            else:
                log.info("loaded the compiled %s from %s in %.1f s", name, path, time.perf_counter() - start)
                return compiled
        start = time.perf_counter()
        log.info("compiling the %s (once for this model and size; kept in %s)", name, path)
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.pt2", dir=self.folder)  # .pt2: AOTI asks
        os.close(handle)
        try:
            with torch.no_grad(), einops_cache_as_found():
                program = export()
                torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs=settings)
            os.replace(tmp, path)  # a process compiling the same key at once writes an equal package
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("compiled the %s in %.0f s (%.2f GB on disk)", name, time.perf_counter() - start,
                 path.stat().st_size / 1e9)
        return load_package(path)


class CachedCall:
    """Stands in for a module's compiled call (`nn.Module._compiled_call_impl`, see compiling.py):
    for each new input shape, the module compiled ahead of time from the package cache; any
    other call (autograd on, other arguments, hooks on the module) goes to `fallback`, the
    in-process torch.compile. Subclasses say which calls a package serves (`plain_inputs`)."""

    name = "module"  # the packages' file name prefix

    def __init__(self, module: nn.Module, fallback: Callable, settings: dict, cache: PackageCache):
        self.module, self.fallback, self.settings, self.cache = module, fallback, settings, cache
        self.compiled: dict[tuple, Callable] = {}  # input shapes and dtypes -> loaded package

    def __call__(self, *args, **kwargs):
        inputs = self.plain_inputs(args, kwargs)
        # A package runs forward alone: hooks on the module need the in-process compile, which calls them.
        hooked = self.module._forward_hooks or self.module._forward_pre_hooks
        if inputs is None or torch.is_grad_enabled() or hooked:
            return self.fallback(*args, **kwargs)
        signature = tuple((tuple(x.shape), x.dtype) for x in inputs)
        compiled = self.compiled.get(signature)
        if compiled is None:
            compiled = self.compiled[signature] = self.load_or_build(inputs)
        return compiled(*inputs)

    def plain_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...] | None:
        """The call's tensors as the package takes them, or None for a call it cannot serve."""
        raise NotImplementedError

    def input_layout(self) -> torch.memory_format:
        """The layout of the module's first convolution: its input's layout in the package."""
        weight = self.module.conv_in.weight
        last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        return torch.channels_last if last else torch.contiguous_format

    def load_or_build(self, inputs: tuple[torch.Tensor, ...]) -> Callable:
        key = fingerprint(self.module, inputs, self.settings)

        def export() -> torch.export.ExportedProgram:
            # Export traces forward itself: the module's compiled call (this object) is set
            # aside meanwhile, so that tracing does not come back here.
            held, self.module._compiled_call_impl = self.module._compiled_call_impl, None
            try:
                return torch.export.export(self.module, inputs, strict=False)
            finally:
                self.module._compiled_call_impl = held

        try:
            with own_storages(self.module):
                return self.cache.load_or_build(self.name, key, export, self.settings)
        except OSError as e:  # a folder that cannot be written, a full disk: compile here instead
            warnings.warn(f"the compiled {self.name} cannot be kept in {self.cache.folder} ({e}); compiling it "
                          "in this process instead (set MINISD_COMPILE_CACHE to a writable folder, or off)",
                          stacklevel=3)
            return self.fallback


class CachedUNetCall(CachedCall):
    name = "unet"

    def plain_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...] | None:
        """(sample, timestep, context): the sample in the layout of the UNet's convolutions, the
        timestep a float32 tensor (a step's int, or one per sample), everything contiguous on
        the CPU; None for a call of another form."""
        names = ("sample", "timestep", "encoder_hidden_states")
        if len(args) > 3 or set(kwargs) - set(names[len(args):]):
            return None
        given = dict(zip(names, args), **kwargs)
        if set(given) != set(names):
            return None
        sample, timestep, context = (given[name] for name in names)
        if not (isinstance(sample, torch.Tensor) and isinstance(context, torch.Tensor)) or \
                sample.device.type != "cpu" or context.device.type != "cpu":
            return None
        if isinstance(timestep, torch.Tensor) and timestep.dim() > 1:
            return None
        timestep = torch.as_tensor(timestep, device="cpu").to(torch.float32).contiguous()
        return sample.contiguous(memory_format=self.input_layout()), timestep, context.contiguous()


class CachedDecoderCall(CachedCall):
    name = "vae-decoder"

    def plain_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...] | None:
        """(latents,) on the CPU in the layout of the decoder's first convolution; None else."""
        if set(kwargs) - {"z"} or len(args) + len(kwargs) != 1:
            return None
        (latents,) = (*args, *kwargs.values())
        if not isinstance(latents, torch.Tensor) or latents.device.type != "cpu":
            return None
        return (latents.contiguous(memory_format=self.input_layout()),)


@contextmanager
def einops_cache_as_found() -> Iterator[None]:
    """Within the block (an export), einops may meet new tensor types (export's fake and
    functional tensors) and add them to its table of backends by type; afterwards the table is
    as it was. torch.compile guards on that table's length wherever it traced einops, so an
    export between two calls of an already compiled model (the step-skipping UNets, compiled in
    process) would otherwise make that model compile again."""
    table = getattr(sys.modules.get("einops._backends"), "_type2backend", None)
    before = dict(table) if isinstance(table, dict) else None
    try:
        yield
    finally:
        if before is not None:
            table.clear()
            table.update(before)


@contextmanager
def own_storages(module: nn.Module) -> Iterator[None]:
    """Within the block, every tensor `module` holds that is a view into a larger storage (a
    weight in the memory-mapped checkpoint file, the fused q/k/v matrix of fast.py) is a copy
    of its own. AOTInductor writes each constant as its whole storage: a float32 UNet read from
    a memory-mapped file would be packaged once per weight (a 6 MB test model made 1.1 GB)."""
    swapped = compact_storages(module)
    try:
        yield
    finally:
        for table, name, value in reversed(swapped):
            table[name] = value


def compact_storages(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """Give every tensor of `module` that views a larger storage a copy of its own, in place;
    returns (table, name, original) of each one replaced."""
    swapped = []
    for layer in module.modules():
        for table in (layer._parameters, layer._buffers, layer.__dict__):
            for name, value in list(table.items()):
                if isinstance(value, torch.Tensor) and \
                        value.untyped_storage().nbytes() > value.numel() * value.element_size():
                    copy = value.detach().clone()  # keeps a dense layout (channels-last stays so)
                    table[name] = nn.Parameter(copy, value.requires_grad) if isinstance(value, nn.Parameter) else copy
                    swapped.append((table, name, value))
    return swapped
