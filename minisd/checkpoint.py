"""Loading a component's weights into minisd's modules, strictly.

    <folder>/<component>/config.json        -> the config dataclass -> the module, on the meta device
    <folder>/<component>/<weights file(s)>  -> tensors (safetensors, or a pickle read safely)
                                            -> legacy key renames -> every parameter filled, once

A component folder holds its weights in one of several forms: `.safetensors` or a `.bin`
pickle, whole or sharded, optionally as an `fp16` variant. Loading is strict: a missing,
unexpected or mis-shaped tensor is an error that names the file and the keys. Pickles are only
ever opened with `torch.load(weights_only=True)`, which refuses anything but tensors.
"""
from __future__ import annotations

import pickle
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from .config import read_json
from .errors import CheckpointError
from .safetensors_reader import Scratch, StoredTensor, read_safetensors, stored_tensors

M = TypeVar("M", bound=nn.Module)
Weight = torch.Tensor | StoredTensor  # a tensor in memory, or one still in its file

CONFIG_NAMES = {"scheduler": "scheduler_config.json", "feature_extractor": "preprocessor_config.json"}


def read_config(folder: str | Path, component: str) -> dict[str, Any]:
    """Read `<folder>/<component>/config.json` (or the component's own json name) as a dict."""
    path = Path(folder) / component / CONFIG_NAMES.get(component, "config.json")
    if not Path(folder).is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if not path.parent.is_dir():
        raise CheckpointError(f"{component}: folder missing: {path.parent}")
    if not path.is_file():
        raise CheckpointError(f"{component}: config file missing: {path}")
    return read_json(path)


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
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: not a valid shard index (no weight_map of file names)")
    shards = [index_path.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: lists shard {shard.name}, which is missing")
    return shards


# --- reading tensors --------------------------------------------------------------------

def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file, in memory, for tools and tests (loading streams safetensors
    through `stored_tensors` instead). Pickles go through `weights_only=True`: a file that
    holds anything but tensors and plain containers is refused, never executed."""
    return read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)


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

def load_state_strict(module: nn.Module, component: str, state: dict[str, Weight], source: str,
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
    scratch = threading.local()  # one read buffer per thread

    def convert(tensor: Weight) -> torch.Tensor:
        if isinstance(tensor, StoredTensor):
            if not hasattr(scratch, "buffer"):
                scratch.buffer = Scratch()
            return tensor.to_tensor(dtype, device, memory_format, scratch.buffer)
        layout = memory_format if tensor.dim() == 4 else torch.contiguous_format
        return tensor.to(device=device, dtype=dtype, memory_format=layout)

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
    state: dict[str, Weight] = {}
    for path in files:
        state.update(stored_tensors(path) if path.suffix == ".safetensors" else _read_pickle(path))
    source = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
    load_state_strict(module, component, rename_legacy_keys(component, state), source, device, dtype,
                      channels_last)
    return module.eval().requires_grad_(False)
