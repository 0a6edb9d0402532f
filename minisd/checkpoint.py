"""Everything minisd knows about checkpoint files lives here.

A diffusers pipeline folder holds one sub-folder per component (`unet/`, `vae/`, ...), each
with a config json and weights in one of several formats. This module finds them, reads them
safely, renames the few legacy keys and copies tensors into minisd's modules strictly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError

CONFIG_NAMES = {"scheduler": "scheduler_config.json", "feature_extractor": "preprocessor_config.json"}


def read_config(folder: str | Path, component: str) -> dict[str, Any]:
    """Read `<folder>/<component>/config.json` (or the component's own json name) as a dict."""
    path = Path(folder) / component / CONFIG_NAMES.get(component, "config.json")
    if not Path(folder).is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if not path.is_file():
        raise CheckpointError(f"{component}: config file missing: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw
