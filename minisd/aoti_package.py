"""Loading an AOTInductor package with its weights on cache-line boundaries.

`torch._inductor.aoti_load_package` runs a package's code at the speed of the in-process
compile of the same graph, except for one thing: its loader copies all the weights into a
single block from `std::malloc` (`RAII_cpuMalloc` in AOTInductor's model_base.h), and glibc
serves a block that large with `mmap`, returning an address 16 bytes past a page boundary.
The weights sit at multiples of 64 bytes within the block, so every one of them starts 16
bytes off a 64-byte cache line and each vector load of a weight straddles two lines. Measured
on small-sd's int8 UNet at 256x256 (Intel Xeon with AMX, 2 threads, alternating calls):
244 ms a step from the package as loaded, 206 ms with its weights re-homed here, outputs
bit-identical (docs/cpu-floor.md).

So `load_package` opens the package's shared library with AOTInductor's container runner
(the object the package loader wraps), copies each weight into a tensor of torch's own
allocator (64-byte aligned, prepacked oneDNN weights included), hands the copies back as
user-managed constants (the runner keeps pointers to them, so they live as long as the
returned callable), and gives the pages of the old block that held only re-homed weights back
to the system (`madvise(MADV_DONTNEED)`: the block stays allocated, its pages read as zeros
if touched again, and nothing reads them). Constants the runner cannot name one by one stay
where they are: each quantized activation's scale and zero point is a scalar filed under one
shared name ("x_scale", "x_zp"), and a scalar gains nothing from alignment.
"""
from __future__ import annotations

import collections
import ctypes
import json
import logging
import mmap
import tempfile
import zipfile
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger("minisd")

MADV_DONTNEED = 4  # linux/mman.h


def load_package(path: str | Path):
    """A callable running the package at `path`, weights aligned; torch's own loader where the
    container runner's API is missing (another torch) or the package is not a single CPU model."""
    runner_class = getattr(getattr(torch._C, "_aoti", None), "AOTIModelContainerRunnerCpu", None)
    with zipfile.ZipFile(path) as archive:
        libraries = [name for name in archive.namelist() if name.endswith(".so")]
        devices = {json.loads(archive.read(name)).get("AOTI_DEVICE_KEY") for name in archive.namelist()
                   if name.endswith("wrapper_metadata.json")}
        if runner_class is None or len(libraries) != 1 or devices != {"cpu"}:
            return torch._inductor.aoti_load_package(str(path))
        with tempfile.TemporaryDirectory(prefix="minisd-package-") as folder:
            # Once loaded, the library stays mapped in the process: its file may go.
            runner = runner_class(archive.extract(libraries[0], folder), 1)
    return AlignedPackage(runner)


class AlignedPackage:
    """A package's compiled graph, called like the module it was exported from (positional
    tensors in, its output structure back), its weights re-homed (module docstring)."""

    def __init__(self, runner):
        self.runner = runner
        self.out_spec = pytree.treespec_loads(runner.get_call_spec()[1])
        self.constants = realign_constants(runner)  # the runner points into these: keep them

    def __call__(self, *inputs: torch.Tensor):
        return pytree.tree_unflatten(self.runner.run(list(inputs)), self.out_spec)


def realign_constants(runner) -> dict[str, torch.Tensor]:
    """Copy every uniquely named constant of `runner` into memory from torch's allocator, make
    the copies the runner's constants, release the old pages; returns the copies by name."""
    by_original_name = runner.extract_constants_map(False)
    original_names = runner.get_constant_names_to_original_fqns()  # internal name -> original
    uses = collections.Counter(original_names.values())
    copies, old_ranges = {}, []
    for name, original in original_names.items():
        if uses[original] == 1 and original in by_original_name:
            constant = by_original_name[original]
            copies[name] = constant.clone()  # keeps strides; a prepacked oneDNN tensor stays one
            old_ranges.append(byte_range(constant))
    # The active buffer, partly (the shared-name scalars stay), user-managed: no copy back.
    runner.update_constant_buffer(copies, False, False, True)
    released = release_pages(old_ranges)
    log.debug("re-homed %d constants, released %.2f GB", len(copies), released / 1e9)
    return copies


def byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the memory a constant occupies."""
    if tensor.layout == torch._mkldnn:  # opaque: its storage is oneDNN's
        return torch.ops.mkldnn.data_ptr(tensor), torch.ops.mkldnn._nbytes(tensor)
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def release_pages(ranges: list[tuple[int, int]]) -> int:
    """Give back to the system the whole pages inside `ranges` (address, bytes), joined where
    less than 64 bytes apart (the padding between neighbouring constants: a constant left in
    place takes a slot of 64 bytes or more, so its page is never released). Returns bytes."""
    spans: list[list[int]] = []
    for start, size in sorted(ranges):
        if spans and start - spans[-1][1] < 64:
            spans[-1][1] = max(spans[-1][1], start + size)
        else:
            spans.append([start, start + size])
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, TypeError, AttributeError):  # no C library to ask (Windows): the pages stay
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, released = mmap.PAGESIZE, 0
    for start, end in spans:
        first, last = -(-start // page) * page, end // page * page
        if last > first and madvise(first, last - first, MADV_DONTNEED) == 0:
            released += last - first
    return released
