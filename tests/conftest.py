"""Shared pytest fixtures: tiny random SD v1 pipelines written by tools/make_tiny_checkpoint.py.

    tiny_current / tiny_legacy   the default tiny pipeline (seed 0) in each format, same weights
    tiny_formats                 parametrised: each of those two paths in turn
    make_tiny(fmt, seed=0, unet={...}, vae={...}, text_encoder={...}, safety_checker={...})
                                 a variant, built once per session per distinct arguments

Building needs diffusers + transformers (test dependencies); minisd itself never imports them.
"""
import json
import os
from pathlib import Path

import make_tiny_checkpoint  # tools/ is on sys.path: setup.cfg's [tool:pytest] pythonpath
import pytest
import torch

# The fixtures' models are tiny: a second thread costs more in synchronisation than it saves,
# and on a busy machine a thread that waits for a preempted partner slows every op badly.
torch.set_num_threads(1)

FORMATS = make_tiny_checkpoint.FORMATS  # ("current", "legacy")


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory) -> Path:
    """Compiled UNets (compile=True on the CPU, minisd/compile_cache.py) go to a folder of the
    session's, never to the user's ~/.cache; subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("compile_cache")
    os.environ["MINISD_COMPILE_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory):
    """Factory: make_tiny(fmt, seed=0, **overrides) -> Path of a tiny pipeline folder.

    Both formats are written from one build, so make_tiny("current", ...) and
    make_tiny("legacy", ...) with the same arguments hold identical weights. Results are
    cached for the session; treat the folders as read-only.
    """
    cache: dict[str, dict[str, Path]] = {}

    def make(fmt: str = "current", seed: int = 0, **overrides) -> Path:
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        key = json.dumps({"seed": seed, **overrides}, sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_seed{seed}")
            cache[key] = make_tiny_checkpoint.make_pipelines(out, seed=seed, **overrides)
        return cache[key][fmt]

    return make


@pytest.fixture(scope="session")
def tiny_current(make_tiny) -> Path:
    return make_tiny("current")


@pytest.fixture(scope="session")
def tiny_legacy(make_tiny) -> Path:
    return make_tiny("legacy")


@pytest.fixture(params=FORMATS)
def tiny_formats(request) -> Path:
    """Each format's folder in turn; tests using it run once per format (ids: current, legacy)."""
    return request.getfixturevalue(f"tiny_{request.param}")
