"""Everything minisd knows about checkpoint files lives here.

A diffusers pipeline folder holds one sub-folder per component (`unet/`, `vae/`, ...), each
with a config json and weights in one of several formats. This module finds them, reads them
safely, renames the few legacy keys and copies tensors into minisd's modules strictly.
"""
from __future__ import annotations

import json
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

import safetensors.torch
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

def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file. Pickles go through `weights_only=True`: a file that holds
    anything but tensors and plain containers is refused, never executed."""
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:  # safetensors raises its own error types and OSError
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e}); "
                                  "download it again") from None
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

def load_state_strict(module: nn.Module, component: str, state: dict[str, torch.Tensor],
                      source: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Fill every parameter of `module` from `state` (already renamed), or raise an error
    naming the file and the keys: missing, unexpected and mis-shaped tensors are all fatal,
    except the known-ignorable ones."""
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
        if tensor.shape != target.shape and tensor.dim() == 4 and tensor.shape[2:] == (1, 1) \
                and tensor.shape[:2] == target.shape:
            tensor = tensor[:, :, 0, 0]  # a linear weight saved as a 1x1 convolution (LDM's VAE attention)
        if tensor.shape != target.shape:
            problems.append(f"shape of {key}: file has {tuple(tensor.shape)}, model needs {tuple(target.shape)}")
        elif not tensor.is_floating_point():
            problems.append(f"dtype of {key}: file has {tensor.dtype}, model needs floating point")
        else:
            usable[key] = tensor
    if problems:
        raise CheckpointError(f"{component}: {source} does not match the model ({len(problems)} "
                              "problem(s)):\n  " + "\n  ".join(problems))
    # Casting (fp32 file -> bf16 model, say) is bound by reading the mapped file: one thread per
    # core halves the load time on two cores. torch releases the GIL inside `.to`.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        converted = pool.map(lambda t: t.to(device=device, dtype=dtype), usable.values())
        module.load_state_dict(dict(zip(usable, converted)), strict=True, assign=True)


def _some(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_component(folder: str | Path, component: str, build: Callable[[Any], M], config_cls,
                   device="cpu", dtype=torch.float32, variant: str | None = None) -> M:
    """The one loading path every `load_X` shares: config -> module (on the meta device, so
    no memory is spent on random init) -> tensors -> legacy renames -> strict copy."""
    config = config_cls.from_dict(read_config(folder, component), f"{component}/config.json")
    with torch.device("meta"):
        module = build(config)
    files = find_weights(folder, component, variant)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_tensors(path))
    source = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
    load_state_strict(module, component, rename_legacy_keys(component, state), source, device, dtype)
    return module.eval().requires_grad_(False)
