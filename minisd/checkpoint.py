"""Everything minisd knows about checkpoint files lives here.

A diffusers pipeline folder holds one sub-folder per component (`unet/`, `vae/`, ...), each
with a config json and weights in one of several formats. This module finds them, reads them
safely, renames the few legacy keys and copies tensors into minisd's modules strictly.
"""
from __future__ import annotations

import json
import pickle
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import safetensors
import torch
from torch import nn

from .errors import CheckpointError

M = TypeVar("M", bound=nn.Module)

CONFIG_NAMES = {"scheduler": "scheduler_config.json", "feature_extractor": "preprocessor_config.json"}


COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


def find_model_folder(folder: str | Path) -> Path:
    """Check that `folder` is a diffusers pipeline folder; a Hugging Face cache entry
    (`models--org--name`) resolves to its newest snapshot."""
    path = Path(folder).expanduser()
    if path.is_file():
        raise CheckpointError(f"{path} is a file; pass the model folder (the one that holds "
                              "model_index.json and the unet/, vae/, ... folders)")
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    snapshots = path / "snapshots"
    if not (path / "model_index.json").exists() and snapshots.is_dir():
        candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
        if candidates:
            path = candidates[-1]
    check_model_index(path)
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if len(missing) == len(COMPONENTS):
        raise CheckpointError(f"{path} is not a diffusers pipeline folder: it has none of the "
                              f"folders {', '.join(COMPONENTS)}")
    if missing:
        raise CheckpointError(f"{path}: component folder(s) missing: {', '.join(missing)} "
                              "(an interrupted download? fetch the checkpoint again)")
    return path


# What an SD v1 folder's model_index.json may name for each component (older and newer
# class names of the same models).
EXPECTED_CLASSES = {
    "_class_name": {"StableDiffusionPipeline", "OnnxStableDiffusionPipeline"},
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel"},
    "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"},
    "safety_checker": {"StableDiffusionSafetyChecker"},
}


def read_model_index(path: Path) -> dict[str, Any]:
    """`model_index.json` as a dict; {} when the folder has none (minisd needs only the
    component folders)."""
    index_path = path / "model_index.json"
    if not index_path.exists():
        return {}
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            raise ValueError(f"expected a JSON object, found {type(index).__name__}")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    return index


def check_model_index(path: Path) -> None:
    """Refuse, with a clear message, a folder whose model_index.json names a pipeline or a
    component minisd does not implement (SDXL, SD 3, Flux, ...). Scheduler classes are free:
    minisd runs DPM-Solver++ on any of them."""
    index = read_model_index(path)
    index_path = path / "model_index.json"
    for key, allowed in EXPECTED_CLASSES.items():
        value = index.get(key)
        name = value[-1] if isinstance(value, list) and len(value) == 2 else value
        if name is not None and name not in allowed:
            what = "pipeline" if key == "_class_name" else key
            raise CheckpointError(f"{index_path}: {what} is {name!r}; minisd runs Stable Diffusion v1 "
                                  f"({' or '.join(sorted(allowed))})")


def read_config(folder: str | Path, component: str) -> dict[str, Any]:
    """Read `<folder>/<component>/config.json` (or the component's own json name) as a dict."""
    path = Path(folder) / component / CONFIG_NAMES.get(component, "config.json")
    if not Path(folder).is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if not path.parent.is_dir():
        raise CheckpointError(f"{component}: folder missing: {path.parent}")
    if not path.is_file():
        raise CheckpointError(f"{component}: config file missing: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


# --- finding the weights ----------------------------------------------------------------

# diffusers names model weights `diffusion_pytorch_model.*`, transformers `model.*` (new) or
# `pytorch_model.*` (old). safetensors first: it is fast to map and cannot execute code.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_FORMATS = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def find_weights(folder: str | Path, component: str, variant: str | None = None) -> list[Path]:
    """The weight file(s) of one component, best format first; a sharded checkpoint gives
    its shards in index order. `variant="fp16"` looks for `*.fp16.safetensors` etc."""
    where = Path(folder) / component
    if not where.is_dir():
        raise CheckpointError(f"{component}: folder missing: {where}")
    tag = f".{variant}" if variant else ""
    for ext in WEIGHT_FORMATS:
        for stem in WEIGHT_STEMS:
            path = where / f"{stem}{tag}{ext}"
            if path.is_file():
                return _shards(path) if ext.endswith(".index.json") else [path]
    present = sorted(p.name for p in where.iterdir())
    wanted = f"variant '{variant}' " if variant else ""
    raise CheckpointError(f"{component}: no {wanted}weights in {where} (looked for "
                          f"{WEIGHT_STEMS[0]}{tag}.safetensors / .bin and the like; found: "
                          f"{', '.join(present) or 'nothing'})")


def _shards(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e!r})") from None
    shards = [index_path.parent / name for name in names]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: lists shard {shard.name}, which is missing")
    return shards


# --- reading tensors --------------------------------------------------------------------

# safetensors' dtype names: https://github.com/huggingface/safetensors#format
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class StoredTensor:
    """A tensor still in its .safetensors file. `mapped()` is the tensor as it lies in the file
    (no copy; pages are read on first touch and never written back); `read()` reads it
    straight into a tensor of another dtype or layout, through a reusable scratch buffer.
    Converting from the mapping instead (what `safetensors.torch.load_file` leads to) keeps
    every page it touched counted in the process's memory next to the converted copy:
    small-sd in fp32 peaked at 5.4 GB that way, 3.6 GB read as here."""

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


class Scratch:
    """A byte buffer reused across reads: fresh memory costs a page fault per 4 KB page, which
    on a virtual machine can take longer than reading the bytes."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer[:nbytes]


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file, in memory. Pickles go through `weights_only=True`: a file that
    holds anything but tensors and plain containers is refused, never executed."""
    if path.suffix == ".safetensors":
        return {key: stored.read() for key, stored in stored_tensors(path).items()}
    return _read_pickle(path)


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """Names, shapes and dtypes of a .safetensors file's tensors, checked, without reading them.
    The safetensors library validates the file (header, offsets, sizes) first."""
    try:
        with safetensors.safe_open(path, framework="pt"):
            pass
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
    except Exception as e:  # safetensors raises its own error types and OSError
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e}); "
                              "download it again") from None
    start = 8 + header_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)  # mapped
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


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise _unreadable(path, e) from None
        state = _torch_load_unmapped(path)  # pre-zip pickles (torch < 1.6) cannot be mapped
    except Exception as e:
        raise _unreadable(path, e) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: expected a dict of tensors, but {key!r:.80} holds a "
                                  f"{type(value).__name__}; is this a model weights file?")
    return state


def _torch_load_unmapped(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    # torch's first lines advise turning weights_only off, which would run the file's code: quote
    # only what stopped its unpickler.
    text = str(e) if isinstance(e, pickle.UnpicklingError) else ""
    wants = re.search(r"GLOBAL ([\w.]+)", text)  # a class or function to call: what code needs
    if wants:
        return CheckpointError(f"{path}: refused to load: the pickle asks for {wants[1]}, not just tensors, "
                               "and minisd never executes checkpoint code; use the model's .safetensors "
                               "weights or a copy from a trusted source")
    detail = re.search(r"Unsupported [^\n]*", text)
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                           f"({detail[0].strip() if detail else _first_line(e)}); the file is corrupt "
                           "or truncated, download it again")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --- legacy key names -------------------------------------------------------------------

# The only places where checkpoint keys differ from minisd's module paths: older saves of
# the same models. (pattern, replacement) pairs, applied in order, once per key.
LEGACY_RENAMES: dict[str, list[tuple[str, str]]] = {
    # diffusers < 0.15 named the VAE's single-head attention like the original LDM code.
    "vae": [
        (r"(attentions\.\d+)\.query\.", r"\1.to_q."),
        (r"(attentions\.\d+)\.key\.", r"\1.to_k."),
        (r"(attentions\.\d+)\.value\.", r"\1.to_v."),
        (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
    ],
    # transformers < 5 wrapped the text tower in `text_model.`.
    "text_encoder": [(r"^text_model\.", "")],
    # transformers < 5 nested CLIPVisionModel's `vision_model.` inside the checker's.
    "safety_checker": [(r"^vision_model\.vision_model\.", "vision_model.")],
}

# Tensors a checkpoint may carry that minisd derives instead of storing.
IGNORABLE_KEYS: dict[str, list[str]] = {
    # transformers < 4.31 saved the position index buffer arange(77) with the weights.
    "text_encoder": [r"^embeddings\.position_ids$"],
    "safety_checker": [r"^vision_model\.embeddings\.position_ids$"],
}


def rename_legacy_keys(component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = [(re.compile(p), r) for p, r in LEGACY_RENAMES.get(component, [])]
    renamed = {}
    for key, tensor in state.items():
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        renamed[key] = tensor
    return renamed


def is_ignorable(component: str, key: str) -> bool:
    return any(re.search(p, key) for p in IGNORABLE_KEYS.get(component, []))


# --- strict loading ---------------------------------------------------------------------

Tensor = torch.Tensor | StoredTensor


def load_state_strict(module: nn.Module, component: str, state: dict[str, Tensor], source: str,
                      device: torch.device | str, dtype: torch.dtype, channels_last: bool = False) -> None:
    """Fill every parameter of `module` from `state` (already renamed), or raise an error
    naming the file and the keys: missing, unexpected and mis-shaped tensors are all fatal,
    except the known-ignorable ones. Tensors arrive in `dtype` on `device`, and 4-D ones
    (convolution kernels) channels-last if asked."""
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not is_ignorable(component, k)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_some(unexpected)}")
    usable = {}
    for key, target in expected.items():
        tensor = state.get(key)
        if tensor is None:
            continue
        if tensor.shape != target.shape and len(tensor.shape) == 4 and tensor.shape[2:] == (1, 1) \
                and tensor.shape[:2] == target.shape:
            tensor = tensor.reshape(target.shape)  # a linear weight saved as a 1x1 convolution (LDM's VAE attention)
        if tensor.shape != target.shape:
            problems.append(f"shape of {key}: file has {tuple(tensor.shape)}, model needs {tuple(target.shape)}")
        elif not tensor.is_floating_point():
            problems.append(f"dtype of {key}: file has {tensor.dtype}, model needs floating point")
        else:
            usable[key] = tensor
    if problems:
        raise CheckpointError(f"{component}: {source} does not match the model ({len(problems)} "
                              "problem(s)):\n  " + "\n  ".join(problems))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    scratch = threading.local()

    def convert(tensor: Tensor) -> torch.Tensor:
        final_format = memory_format if len(tensor.shape) == 4 else torch.contiguous_format
        if isinstance(tensor, StoredTensor):
            unchanged = tensor.dtype == dtype and final_format == torch.contiguous_format
            mapped = tensor.mapped() if unchanged and torch.device(device).type == "cpu" else None
            if mapped is not None:
                return mapped
            if not hasattr(scratch, "buffer"):
                scratch.buffer = Scratch()
            tensor = tensor.read(dtype, final_format, scratch.buffer)
        return tensor.to(device=device, dtype=dtype, memory_format=final_format)

    # Reading and converting is bound by memory traffic and page faults, not arithmetic: one
    # thread per core halves the load time on two cores (file reads and `.to` release the GIL).
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        converted = pool.map(convert, usable.values())
        module.load_state_dict(dict(zip(usable, converted)), strict=True, assign=True)


def _some(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_component(folder: str | Path, component: str, build: Callable[[Any], M], config_cls,
                   device="cpu", dtype=torch.float32, variant: str | None = None,
                   channels_last: bool = False) -> M:
    """The one loading path every `load_X` shares: config -> module (on the meta device, so
    no memory is spent on random init) -> tensors -> legacy renames -> strict copy."""
    config = config_cls.from_dict(read_config(folder, component), f"{component}/config.json")
    with torch.device("meta"):
        module = build(config)
    files = find_weights(folder, component, variant)
    state: dict[str, Tensor] = {}
    for path in files:
        state.update(stored_tensors(path) if path.suffix == ".safetensors" else _read_pickle(path))
    source = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
    load_state_strict(module, component, rename_legacy_keys(component, state), source, device, dtype,
                      channels_last)
    return module.eval().requires_grad_(False)
