"""Where a model lives: a diffusers pipeline folder, or an entry of the local Hugging Face cache.

    small-stable-diffusion-v0/            (a pipeline folder, as `save_pretrained` writes it)
      model_index.json                    which class each component is
      unet/ vae/ text_encoder/ tokenizer/ scheduler/ [safety_checker/ feature_extractor/]

    ~/.cache/huggingface/hub/models--OFA-Sys--small-stable-diffusion-v0/
      refs/main                           the commit hash `main` pointed to when downloaded
      snapshots/<hash>/                   a pipeline folder, one per downloaded revision

minisd reads the cache's layout directly (no huggingface_hub) and never downloads anything.
What is inside each component folder is checkpoint.py's business.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .config import read_json
from .errors import CheckpointError

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")  # the ones minisd needs

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


def hub_cache() -> Path:
    """The Hugging Face cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


# A hub repository id, "owner/name": letters, digits, "-", "_" and "." (the hub's own rule).
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def cache_entry(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of a hub repository: "OFA-Sys/small-stable-diffusion-v0" ->
    <hub cache>/models--OFA-Sys--small-stable-diffusion-v0."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache()
    return root / ("models--" + repo_id.replace("/", "--"))


def resolve_pretrained(name: str | Path, cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """What `from_pretrained` was given -> a folder: an existing folder as is, else a hub id
    ("OFA-Sys/small-stable-diffusion-v0") looked up in the local Hugging Face cache, the
    snapshot `revision` names (a branch or tag under refs/, or a commit hash; default main).
    Nothing is ever downloaded."""
    path = Path(name).expanduser()
    if path.exists() or not REPO_ID.fullmatch(str(name)):
        if revision is not None and not path.exists():
            raise CheckpointError(f"revision={revision!r} needs a hub id such as "
                                  f"'OFA-Sys/small-stable-diffusion-v0', got {str(name)!r}")
        return path  # find_model_folder says what is wrong with it, if anything
    entry = cache_entry(str(name), cache_dir)
    snapshot = newest_snapshot(entry) if revision is None else named_snapshot(entry, revision)
    if snapshot is None:
        wanted = "" if revision is None else f" at revision {revision!r}"
        raise CheckpointError(
            f"{name}{wanted}: no such folder, and not in the Hugging Face cache (looked in {entry}). "
            f"minisd never downloads; fetch it once with `huggingface-cli download {name}"
            f"{'' if revision is None else ' --revision ' + revision}` (or `hf download {name}`), "
            "or pass the model's folder")
    return snapshot


def named_snapshot(entry: Path, revision: str) -> Path | None:
    """The snapshot of a commit hash, or of the ref (branch, tag) `revision` names."""
    ref = entry / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = entry / "snapshots" / commit
    return snapshot if commit and "/" not in commit and snapshot.is_dir() else None


def model_name(folder: Path) -> str:
    """A name for the model in a folder: the repository's name for a cache snapshot
    (.../models--OFA-Sys--small-stable-diffusion-v0/snapshots/<hash> -> small-stable-diffusion-v0),
    else the folder's name."""
    entry = folder.parent.parent
    if folder.parent.name == "snapshots" and entry.name.startswith("models--"):
        return entry.name.split("--")[-1]
    return folder.name


def newest_snapshot(entry: Path, holding: str = "model_index.json") -> Path | None:
    """The snapshot `refs/main` names, else the most recently written one, of those that hold
    the file `holding` (a half-downloaded revision does not); None if there is none."""
    snapshots = entry / "snapshots"
    candidates = sorted((p for p in snapshots.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime,
                        reverse=True)
    main = entry / "refs" / "main"
    if main.is_file():
        named = snapshots / main.read_text().strip()
        candidates.sort(key=lambda p: p != named)  # stable: the named one first, then newest first
    return next((p for p in candidates if (p / holding).is_file()), None)


def find_model_folder(folder: str | Path) -> Path:
    """Check that `folder` is a diffusers pipeline folder minisd can run, and return it; a cache
    entry (`models--org--name`) resolves to its snapshot. Errors say what is wrong and where."""
    path = Path(folder).expanduser()
    if path.is_file():
        raise CheckpointError(f"{path} is a file; pass the model folder (the one that holds "
                              "model_index.json and the unet/, vae/, ... folders)")
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    if not (path / "model_index.json").exists() and (path / "snapshots").is_dir():
        path = newest_snapshot(path) or path
    check_model_index(path)
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if len(missing) == len(COMPONENTS):
        raise CheckpointError(f"{path} is not a diffusers pipeline folder: it has none of the "
                              f"folders {', '.join(COMPONENTS)}")
    if missing:
        raise CheckpointError(f"{path}: component folder(s) missing: {', '.join(missing)} "
                              "(an interrupted download? fetch the checkpoint again)")
    return path


def read_model_index(path: Path) -> dict[str, Any]:
    """`model_index.json` as a dict; {} when the folder has none (minisd needs only the
    component folders)."""
    return read_json(path / "model_index.json", optional=True)


def check_model_index(path: Path) -> None:
    """Refuse, with a clear message, a folder whose model_index.json names a pipeline or a
    component minisd does not implement (SDXL, SD 3, Flux, ...). Scheduler classes are free:
    minisd runs DPM-Solver++ on any of them."""
    index = read_model_index(path)
    for key, allowed in EXPECTED_CLASSES.items():
        value = index.get(key)
        name = value[-1] if isinstance(value, list) and len(value) == 2 else value
        if name is not None and name not in allowed:
            what = "pipeline" if key == "_class_name" else key
            raise CheckpointError(f"{path / 'model_index.json'}: {what} is {name!r}; minisd runs Stable "
                                  f"Diffusion v1 ({' or '.join(sorted(allowed))})")
