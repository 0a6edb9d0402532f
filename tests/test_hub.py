"""Loading by hub id from the local Hugging Face cache, diffusers' `torch_dtype`, and
`Pipeline.to(...)`.

The cache is built here, laid out as huggingface_hub writes it: blobs/ holds the files,
snapshots/<commit>/ holds relative symlinks to them, refs/<name> holds a commit hash. The
snapshots are the tiny fixture folders (tests/conftest.py), so a loaded pipeline is told apart
by its UNet weights, and images are compared with those of the folder loaded directly. Nothing
here downloads anything.
"""
import hashlib
import os
import re
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from minisd import CheckpointError, InputError, MinisdError, load_unet
from minisd.pipeline import Pipeline

REPO_ID = "OFA-Sys/small-stable-diffusion-v0"
ENTRY = "models--OFA-Sys--small-stable-diffusion-v0"
COMMIT_A = hashlib.sha1(b"main").hexdigest()  # 40 hex digits, as a git commit
COMMIT_B = hashlib.sha1(b"newer").hexdigest()
IMAGE_TOL = 2e-3
DOWNLOAD_HINT = re.compile(r"(huggingface-cli|hf) download")


# ------------------------------------------------------------------------------------------
# A local Hugging Face cache
# ------------------------------------------------------------------------------------------

def add_snapshot(hub: Path, commit: str, source: Path, mtime: float | None = None,
                 leave_out: tuple[str, ...] = ()) -> Path:
    """Write `source` as snapshots/<commit> of the cache entry: blobs named by their sha256,
    snapshot files as relative symlinks to them. `leave_out`: relative paths not written (an
    interrupted download). `mtime`: the snapshot folder's modification time."""
    entry = hub / ENTRY
    snapshot = entry / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = file.relative_to(source).as_posix()
        if rel in leave_out:
            continue
        data = file.read_bytes()
        blob = entry / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if mtime is not None:
        os.utime(snapshot, (mtime, mtime))
    return snapshot


def set_ref(hub: Path, name: str, commit: str) -> None:
    ref = hub / ENTRY / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # huggingface_hub writes no trailing newline


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache named by $HF_HUB_CACHE; the working directory is elsewhere and empty,
    so "OFA-Sys/small-stable-diffusion-v0" cannot be read as a relative path."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return cache


@pytest.fixture(scope="module")
def tiny_other(make_tiny) -> Path:
    """Another revision of the model: same shapes, other weights."""
    return make_tiny("current", seed=1)


def loaded_from(pipe: Pipeline, folder: Path) -> bool:
    """Whether `pipe`'s UNet holds the weights of `folder`."""
    return torch.equal(pipe.unet.conv_in.weight.float(), load_unet(folder).conv_in.weight.float())


def seeded(pipe: Pipeline, steps: int = 10, output_type: str = "np"):
    return pipe("an apple, 4k", num_inference_steps=steps, output_type=output_type,
                generator=torch.Generator().manual_seed(0)).images


def first_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


# ------------------------------------------------------------------------------------------
# The model card's snippet, on the CPU
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_model_card_snippet(hub, tiny_current, dtype):
    add_snapshot(hub, COMMIT_A, tiny_current)
    set_ref(hub, "main", COMMIT_A)

    pipe = Pipeline.from_pretrained(REPO_ID, torch_dtype=dtype)
    pipe = pipe.to("cpu")
    image = pipe("an apple, 4k").images[0]
    assert image.size == (64, 64) and image.mode == "RGB"

    assert pipe.dtype == first_dtype(pipe.unet) == dtype
    assert first_dtype(pipe.vae) == dtype
    assert first_dtype(pipe.text_encoder) == torch.float32  # bf16 keeps the text encoder in fp32
    assert pipe.device == torch.device("cpu")
    direct = Pipeline.from_pretrained(tiny_current, dtype=dtype)
    got, expected = seeded(pipe, 25, "pil")[0], seeded(direct, 25, "pil")[0]
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert np.asarray(expected).std() > 1


def test_hf_home_names_the_cache(tmp_path, monkeypatch, tiny_current):
    home = tmp_path / "hf_home"
    add_snapshot(home / "hub", COMMIT_A, tiny_current)
    set_ref(home / "hub", "main", COMMIT_A)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert loaded_from(Pipeline.from_pretrained(REPO_ID, safety_checker=None), tiny_current)


def test_hf_hub_cache_wins_over_hf_home(hub, tmp_path, monkeypatch, tiny_current, tiny_other):
    add_snapshot(hub, COMMIT_A, tiny_current)
    set_ref(hub, "main", COMMIT_A)
    add_snapshot(tmp_path / "hf_home" / "hub", COMMIT_B, tiny_other)
    set_ref(tmp_path / "hf_home" / "hub", "main", COMMIT_B)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert loaded_from(Pipeline.from_pretrained(REPO_ID, safety_checker=None), tiny_current)


def test_default_cache_under_home(tmp_path, monkeypatch, tiny_current):
    add_snapshot(tmp_path / "home" / ".cache" / "huggingface" / "hub", COMMIT_A, tiny_current)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert loaded_from(Pipeline.from_pretrained(REPO_ID, safety_checker=None), tiny_current)


def test_cache_dir_argument(hub, tmp_path, tiny_current):
    elsewhere = tmp_path / "other_cache"
    add_snapshot(elsewhere, COMMIT_A, tiny_current)
    set_ref(elsewhere, "main", COMMIT_A)
    pipe = Pipeline.from_pretrained(REPO_ID, cache_dir=elsewhere, safety_checker=None)  # $HF_HUB_CACHE is empty
    assert loaded_from(pipe, tiny_current)
    assert loaded_from(Pipeline.from_pretrained(REPO_ID, cache_dir=str(elsewhere), safety_checker=None),
                       tiny_current)


def test_cache_entry_folder_and_local_files_only(hub, tiny_current):
    add_snapshot(hub, COMMIT_A, tiny_current)
    set_ref(hub, "main", COMMIT_A)
    assert loaded_from(Pipeline.from_pretrained(hub / ENTRY, safety_checker=None), tiny_current)
    assert loaded_from(Pipeline.from_pretrained(REPO_ID, local_files_only=True, safety_checker=None), tiny_current)


# ------------------------------------------------------------------------------------------
# Which snapshot
# ------------------------------------------------------------------------------------------

def test_refs_main_wins_over_a_newer_snapshot(hub, tiny_current, tiny_other):
    add_snapshot(hub, COMMIT_A, tiny_current, mtime=1_600_000_000)
    add_snapshot(hub, COMMIT_B, tiny_other, mtime=1_700_000_000)
    set_ref(hub, "main", COMMIT_A)
    assert loaded_from(Pipeline.from_pretrained(REPO_ID, safety_checker=None), tiny_current)


def test_without_refs_main_the_newest_complete_snapshot(hub, tiny_current, tiny_other):
    add_snapshot(hub, COMMIT_A, tiny_current, mtime=1_600_000_000)
    add_snapshot(hub, COMMIT_B, tiny_other, mtime=1_700_000_000)
    assert loaded_from(Pipeline.from_pretrained(REPO_ID, safety_checker=None), tiny_other)


def test_half_downloaded_snapshot_is_skipped(hub, tiny_current, tiny_other):
    add_snapshot(hub, COMMIT_A, tiny_current, mtime=1_600_000_000)
    add_snapshot(hub, COMMIT_B, tiny_other, mtime=1_700_000_000, leave_out=("model_index.json",))
    assert loaded_from(Pipeline.from_pretrained(REPO_ID, safety_checker=None), tiny_current)


@pytest.mark.parametrize("revision, expect", [
    (COMMIT_B, "other"),  # a commit hash: that snapshot
    ("dev", "other"),  # a ref name: refs/dev names COMMIT_B
    ("main", "current"),
    (None, "current"),
])
def test_revision(hub, tiny_current, tiny_other, revision, expect):
    add_snapshot(hub, COMMIT_A, tiny_current, mtime=1_700_000_000)  # main is also the newest
    add_snapshot(hub, COMMIT_B, tiny_other, mtime=1_600_000_000)
    set_ref(hub, "main", COMMIT_A)
    set_ref(hub, "dev", COMMIT_B)
    pipe = Pipeline.from_pretrained(REPO_ID, revision=revision, safety_checker=None)
    assert loaded_from(pipe, tiny_other if expect == "other" else tiny_current)


@pytest.mark.parametrize("revision", ["no-such-branch", "0" * 40])
def test_revision_not_in_the_cache(hub, tiny_current, revision):
    add_snapshot(hub, COMMIT_A, tiny_current)
    set_ref(hub, "main", COMMIT_A)
    with pytest.raises(CheckpointError, match=revision):
        Pipeline.from_pretrained(REPO_ID, revision=revision)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

def test_missing_hub_id_says_where_it_looked_and_how_to_download(hub):
    with pytest.raises(CheckpointError) as caught:
        Pipeline.from_pretrained(REPO_ID)
    message = str(caught.value)
    assert str(hub) in message  # where it looked
    assert DOWNLOAD_HINT.search(message) and REPO_ID in message  # how to fetch it


def test_missing_hub_id_with_cache_dir_names_that_dir(hub, tmp_path):
    elsewhere = tmp_path / "empty_cache"
    elsewhere.mkdir()
    with pytest.raises(CheckpointError) as caught:
        Pipeline.from_pretrained(REPO_ID, cache_dir=elsewhere)
    assert str(elsewhere) in str(caught.value) and DOWNLOAD_HINT.search(str(caught.value))


@pytest.mark.parametrize("name", [
    "OFA Sys/small sd?",  # characters no hub id has
    "org/name/extra/parts",  # neither an existing path nor an id's shape
    "./no-such-folder",
    "/definitely/not/here/model",
])
def test_neither_a_folder_nor_a_hub_id(hub, name):
    with pytest.raises(MinisdError) as caught:
        Pipeline.from_pretrained(name)
    assert isinstance(caught.value, (CheckpointError, InputError))
    assert name.lstrip("./") in str(caught.value)


def test_dtype_and_torch_dtype(hub, tiny_current):
    with pytest.raises(InputError, match="torch_dtype"):
        Pipeline.from_pretrained(tiny_current, dtype=torch.float32, torch_dtype=torch.bfloat16)
    pipe = Pipeline.from_pretrained(tiny_current, dtype=torch.bfloat16, torch_dtype=torch.bfloat16,
                                    safety_checker=None)
    assert pipe.dtype == torch.bfloat16
    assert Pipeline.from_pretrained(tiny_current, safety_checker=None).dtype == torch.float32  # the default


# ------------------------------------------------------------------------------------------
# Pipeline.to
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_rounded(tiny_current):
    """diffusers with the UNet and VAE weights rounded through bfloat16 and back (the text
    encoder untouched, as minisd keeps it in float32): what a bf16 -> fp32 round trip holds."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_current, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.unet, pipe.vae):
        model.to(torch.bfloat16).to(torch.float32)
    return pipe


def dtypes(pipe: Pipeline) -> dict[str, torch.dtype]:
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    if pipe.safety_checker is not None:
        parts["safety_checker"] = pipe.safety_checker
    return {name: first_dtype(part) for name, part in parts.items()}


def test_to_bfloat16_and_back(tiny_current, reference_rounded):
    pipe = Pipeline.from_pretrained(tiny_current)  # with its safety checker, which moves too
    assert pipe.to(torch.bfloat16) is pipe
    assert pipe.dtype == torch.bfloat16
    assert dtypes(pipe) == {"unet": torch.bfloat16, "vae": torch.bfloat16, "text_encoder": torch.float32,
                            "safety_checker": torch.bfloat16}
    bf16_image = seeded(pipe)
    assert pipe.to(torch.float32) is pipe
    assert dtypes(pipe) == dict.fromkeys(["unet", "vae", "text_encoder", "safety_checker"], torch.float32)
    assert pipe.dtype == torch.float32
    round_trip = seeded(pipe)
    assert round_trip.dtype == np.float32
    # The weights went through bf16, so the image is the fp32 image of bf16-rounded weights.
    expected = reference_rounded("an apple, 4k", num_inference_steps=10, output_type="np",
                                 generator=torch.Generator().manual_seed(0)).images
    assert np.abs(round_trip - expected).max() <= IMAGE_TOL
    assert np.abs(bf16_image - round_trip).max() > 0  # it did compute in bf16 in between


def test_to_bfloat16_matches_loading_in_bfloat16(tiny_current):
    moved = Pipeline.from_pretrained(tiny_current, safety_checker=None).to(torch.bfloat16)
    loaded = Pipeline.from_pretrained(tiny_current, dtype=torch.bfloat16, safety_checker=None)
    assert dtypes(moved) == dtypes(loaded)
    assert np.abs(seeded(moved, 5) - seeded(loaded, 5)).max() <= IMAGE_TOL


@pytest.mark.parametrize("args, kwargs, dtype", [
    (("cpu",), {}, torch.float32),
    ((torch.device("cpu"),), {}, torch.float32),
    (("cpu", torch.float32), {}, torch.float32),
    (("cpu", torch.bfloat16), {}, torch.bfloat16),
    ((), {"device": "cpu"}, torch.float32),
    ((), {"dtype": torch.bfloat16}, torch.bfloat16),
    ((), {"device": "cpu", "dtype": torch.float32}, torch.float32),
    ((), {"device": torch.device("cpu"), "dtype": torch.bfloat16}, torch.bfloat16),
])
def test_to_forms(tiny_current, args, kwargs, dtype):
    pipe = Pipeline.from_pretrained(tiny_current)
    assert pipe.to(*args, **kwargs) is pipe
    assert pipe.device == torch.device("cpu") and pipe.dtype == dtype
    expected = {"unet": dtype, "vae": dtype, "text_encoder": torch.float32, "safety_checker": dtype}
    assert dtypes(pipe) == expected


@pytest.mark.parametrize("args, kwargs", [
    (("banana",), {}),  # a string that is not a device
    (("cuda",), {}),  # not available here
    ((3.5,), {}),
    ((torch.int64,), {}),  # an integer dtype
    ((), {"dtype": torch.int32}),
    ((), {"dtype": "float32"}),  # not a torch.dtype
    ((), {"device": "banana"}),
    (("cpu", "cpu"), {}),
], ids=lambda v: repr(v))
def test_to_bad_arguments(tiny_current, args, kwargs):
    if torch.cuda.is_available() and args == ("cuda",):
        pytest.skip("CUDA is available on this machine")
    pipe = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    with pytest.raises(InputError):
        pipe.to(*args, **kwargs)
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")  # unchanged
