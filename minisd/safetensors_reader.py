"""A memory-frugal reader of .safetensors files: tensors that need no conversion stay in the
file's memory mapping, converted ones are read straight into their final dtype and layout.

Why not `safetensors.torch.load_file`: it maps the file and hands out tensors backed by the
mapping. Converting those (to bf16, or to channels-last) touches every page of the mapping,
and the touched pages stay counted in the process's memory next to the converted copies:
small-sd in fp32 peaked at 5.4 GB that way, 3.6 GB read as here.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
size, a json header {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw bytes,
offsets counted from the end of the header. The safetensors library validates a file before
we read it; this module only reads what the header describes.
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors
import torch

from .errors import CheckpointError

# safetensors' dtype names
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class StoredTensor:
    """A tensor still in its .safetensors file. `mapped()` is the tensor as it lies in the file
    (no copy; pages are read on first touch and never written back); `read()` reads it into a
    fresh tensor of any dtype and layout, through a reusable scratch buffer."""

    def __init__(self, path: Path, storage: torch.UntypedStorage, offset: int, shape: tuple[int, ...],
                 dtype: torch.dtype):
        self.path, self.storage, self.offset = path, storage, offset
        self.shape, self.dtype = torch.Size(shape), dtype
        self.nbytes = self.shape.numel() * dtype.itemsize

    def reshape(self, shape) -> "StoredTensor":  # same bytes, other shape (numel must match)
        assert torch.Size(shape).numel() == self.shape.numel()
        return StoredTensor(self.path, self.storage, self.offset, shape, self.dtype)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def mapped(self) -> torch.Tensor | None:
        """The tensor in the file's memory mapping, or None where the file does not align it
        to its element size (then `read()` it)."""
        if self.offset % self.dtype.itemsize:
            return None
        return torch.empty(0, dtype=self.dtype).set_(self.storage, self.offset // self.dtype.itemsize, self.shape)

    def read(self, dtype: torch.dtype | None = None, memory_format: torch.memory_format = torch.contiguous_format,
             scratch: "Scratch | None" = None) -> torch.Tensor:
        """A fresh tensor in `dtype` (default: the file's) and, if 4-D, `memory_format`."""
        if len(self.shape) != 4:
            memory_format = torch.contiguous_format
        out = torch.empty(self.shape, dtype=dtype or self.dtype, memory_format=memory_format)
        if out.dtype == self.dtype and out.is_contiguous():
            raw = out  # read in place
        else:  # read into scratch, then convert dtype and layout in one copy
            raw = (scratch or Scratch()).take(self.nbytes).view(self.dtype).view(self.shape)
        if self.nbytes:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                got = f.readinto(memoryview(raw.view(-1).view(torch.uint8).numpy()))
            if got != self.nbytes:
                raise CheckpointError(f"{self.path}: file ended inside a tensor; download it again")
        if raw is not out:
            out.copy_(raw)
        return out

    def to_tensor(self, dtype: torch.dtype, device: torch.device | str, memory_format: torch.memory_format,
                  scratch: "Scratch | None" = None) -> torch.Tensor:
        """The tensor as a model wants it: straight from the mapping when nothing changes on
        the CPU, else read and converted."""
        if len(self.shape) != 4:
            memory_format = torch.contiguous_format
        unchanged = dtype == self.dtype and memory_format == torch.contiguous_format
        tensor = self.mapped() if unchanged and torch.device(device).type == "cpu" else None
        if tensor is None:
            tensor = self.read(dtype, memory_format, scratch)
        return tensor.to(device=device)


class Scratch:
    """A byte buffer reused across reads: fresh memory costs a page fault per 4 KB page, which
    on a virtual machine can take longer than reading the bytes."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer[:nbytes]


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """Names, shapes and dtypes of a .safetensors file's tensors, checked, without reading them."""
    try:
        with safetensors.safe_open(path, framework="pt"):  # validates header, offsets and sizes
            pass
        # safetensors does not expose the offsets, so read the header once more ourselves.
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
    except Exception as e:  # safetensors raises its own error types and OSError
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e}); "
                              "download it again") from None
    start = 8 + header_size
    # A private (copy-on-write) mapping: pages are read on first touch, never written back.
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r:.80} has dtype {info['dtype']}, which minisd "
                                  f"does not read ({', '.join(SAFETENSORS_DTYPES)})")
        tensors[key] = StoredTensor(path, storage, start + info["data_offsets"][0], tuple(info["shape"]),
                                    SAFETENSORS_DTYPES[info["dtype"]])
    return tensors


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, read into memory."""
    return {key: stored.read() for key, stored in stored_tensors(path).items()}
