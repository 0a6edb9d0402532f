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


def cache_entry(repo_id: str) -> Path:
    """The cache folder of a hub repository: "OFA-Sys/small-stable-diffusion-v0" ->
    <hub cache>/models--OFA-Sys--small-stable-diffusion-v0."""
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


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
