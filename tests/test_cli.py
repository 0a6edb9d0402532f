"""The `minisd` command end to end on a fixture folder: PNG written atomically with a readable
`parameters` chunk, nothing overwritten, one-line errors with exit code 2 for bad input;
img2img, --clip-skip and --prompt-syntax give what the Pipeline gives for the same arguments."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minisd import __version__
from minisd.cli import find_model, generation_parameters, main, resolve_device
from minisd.errors import CheckpointError

FAST = ["--steps", "2", "--size", "64x64", "--quiet", "--dtype", "float32"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minisd", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, check=False)


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"minisd {__version__}"
    out = run("generate", "--help")
    assert out.returncode == 0 and "--negative" in out.stdout and "--overwrite" in out.stdout
    for option in ("--init-image", "--strength", "--clip-skip", "--prompt-syntax", "default auto"):
        assert option in " ".join(out.stdout.split()), option


def test_generate_writes_png_with_parameters(tiny_legacy, tmp_path):
    out = tmp_path / "apple.png"
    result = run("generate", "an apple, 4k", "-o", str(out), "--model", str(tiny_legacy),
                 "--negative", "blurry", "--seed", "42", "--guidance", "6.5", *FAST)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (64, 64)
    assert image.text["parameters"] == (
        "an apple, 4k\nNegative prompt: blurry\n"
        f"Steps: 2, Sampler: DPM++ 2M, CFG scale: 6.5, Seed: 42, Size: 64x64, Model: {tiny_legacy.name}")
    assert [p.name for p in tmp_path.iterdir()] == ["apple.png"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # permissions as any new file gets


def test_short_options_as_in_stable_diffusion_cpp(tiny_current, tmp_path, caplog):
    """-n negative prompt, -b image count, -s seed, -W/-H size, -m model; the long forms
    give the same images."""
    short = ["generate", "a cat", "-o", str(tmp_path / "s.png"), "-n", "a dog", "-b", "2", "-s", "7",
             "-W", "48", "-H", "64", "-m", str(tiny_current), "--steps", "2", "--quiet", "--dtype", "float32"]
    long = ["generate", "a cat", "-o", str(tmp_path / "l.png"), "--negative", "a dog", "--num-images", "2",
            "--seed", "7", "--width", "48", "--height", "64", "--model", str(tiny_current), "--steps", "2",
            "--quiet", "--dtype", "float32"]
    assert main(short) == 0 and main(long) == 0
    for i in range(2):
        s, l = Image.open(tmp_path / f"s-{i}.png"), Image.open(tmp_path / f"l-{i}.png")
        assert s.size == (48, 64) and np.array_equal(np.asarray(s), np.asarray(l))
        assert s.text["parameters"].startswith("a cat\nNegative prompt: a dog\nSteps: 2, ") and f"Seed: {7 + i}," in s.text["parameters"]
    assert "-n is the negative prompt" not in caplog.text
    assert main(["generate", "a cat", "-o", str(tmp_path / "n.png"), "-n", "2", "-m", str(tiny_current),
                 "--steps", "1", "--size", "64x64", "--quiet"]) == 0  # -n 2 meant as a count, once
    assert "the negative prompt is '2': -n is the negative prompt" in caplog.text
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "--size", "64x64", "-W", "64"]) == 2
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "--size", "64x64", "-W", "0"]) == 2


def test_debug_before_or_after_the_command(tmp_path):
    for args in (["--debug", "generate", "x"], ["generate", "x", "--debug"]):
        result = run(*args, "-o", str(tmp_path / "x.png"), "--model", str(tmp_path / "nope"))
        assert result.returncode == 1 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


def test_no_levers_gives_the_same_image(tiny_current, tmp_path):
    for name, extra in (("fast.png", []), ("plain.png", ["--no-levers"])):
        assert main(["generate", "a cat", "-o", str(tmp_path / name), "-s", "3", "-m", str(tiny_current),
                     *FAST, *extra]) == 0
    fast, plain = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("fast.png", "plain.png"))
    assert np.abs(fast - plain).max() <= 1  # 8-bit levels: a float sum in another order may round once


def test_seed_reproduces_and_n_images_use_consecutive_seeds(tiny_current, tmp_path):
    assert main(["generate", "a cat", "-o", str(tmp_path / "cats.png"), "-b", "2", "--seed", "5",
                 "--model", str(tiny_current), *FAST]) == 0
    assert main(["generate", "a cat", "-o", str(tmp_path / "one.png"), "--seed", "6",
                 "--model", str(tiny_current), *FAST]) == 0
    second = Image.open(tmp_path / "cats-1.png")
    assert "Seed: 6," in second.text["parameters"]
    # Same seed, same image; a batch of 2 may round a float differently than a batch of 1,
    # so allow one 8-bit level.
    diff = np.abs(np.asarray(second, dtype=np.int16) - np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16))
    assert diff.max() <= 1


def test_random_seed_is_printed(tiny_current, tmp_path):
    result = run("generate", "a cat", "-o", str(tmp_path / "a.png"), "--model", str(tiny_current), *FAST)
    assert result.returncode == 0, result.stderr
    seed = int(result.stderr.split("seed: ")[1].split()[0])
    assert f"Seed: {seed}," in Image.open(tmp_path / "a.png").text["parameters"]


def test_existing_file_is_not_overwritten(tiny_current, tmp_path):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    result = run("generate", "a cat", "-o", str(out), "--model", str(tiny_current), *FAST)
    assert result.returncode == 2
    assert "exists" in result.stderr and "--overwrite" in result.stderr
    assert out.read_bytes() == b"precious"
    assert main(["generate", "a cat", "-o", str(out), "--overwrite", "--model", str(tiny_current), *FAST]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("args, words", [
    (["generate", "x", "--steps", "many"], "invalid int value"),
    (["generate", "x", "--size", "64by64"], "expected WxH"),
    (["generate", "x", "--size", "60x64"], "width: must be a positive multiple of 8"),
    (["generate", "x", "--steps", "0"], "num_inference_steps"),
    (["generate", "x", "-b", "0"], "-b/--num-images: must be at least 1"),
    (["generate", "x", "--seed", "-1"], "--seed: must lie in"),
    (["generate", "x", "-o", "out.jpg"], "name a .png file"),
    (["generate", "x", "-o", "/no/such/folder/a.png"], "does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_one_line_exit_2(tiny_current, tmp_path, args, words):
    if "-o" not in args:
        args = [*args, "-o", str(tmp_path / "x.png")]
    result = run(*args, "--model", str(tiny_current)) if args[0] == "generate" else run(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minisd: error:") and words in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_missing_model_exit_1(tmp_path):
    result = run("generate", "x", "-o", str(tmp_path / "x.png"), "--model", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"minisd: error: model folder not found: {tmp_path / 'nope'}"


def test_model_lookup_order(tmp_path, monkeypatch):
    repo = "models--OFA-Sys--small-stable-diffusion-v0"
    snapshot = tmp_path / "home" / "hub" / repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    for var in ("MINISD_MODEL", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert find_model(None) == snapshot                      # HF_HOME/hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "home" / "hub"))
    assert find_model(None) == snapshot                      # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("MINISD_MODEL", str(tmp_path / "env"))
    assert find_model(None) == tmp_path / "env"              # $MINISD_MODEL before the cache
    assert find_model(Path("explicit")) == Path("explicit")  # --model before everything


def test_no_model_anywhere_says_how_to_get_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("MINISD_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("minisd.cli.EMBEDDED_MODEL", tmp_path / "none")
    with pytest.raises(CheckpointError, match="small-stable-diffusion-v0.*--model"):
        find_model(None)


def test_dtype_auto():
    import torch

    from minisd.cli import cpu_has_native_bf16, resolve_dtype
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_dtype("float32", "cuda") == torch.float32


def test_device_auto(monkeypatch):
    """CUDA when available, then MPS, else the CPU; a named device is kept as is."""
    import torch
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        assert resolve_device("auto") == "cpu"  # this machine
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert resolve_device("auto") == expected


def test_generation_parameters_img2img_and_clip_skip_fields():
    """A1111's field names and order: Denoising strength, then Clip skip, after Model."""
    head = "a cat\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 70x45, Model: m"
    args = ("a cat", "", 20, "DPM++ 2M", 7.0, 1, 70, 45, "m")
    assert generation_parameters(*args) == head
    assert generation_parameters(*args, clip_skip=1) == head  # 1 is the last layer: the default, not written
    assert generation_parameters(*args, denoising_strength=0.75, clip_skip=2) == \
        head + ", Denoising strength: 0.75, Clip skip: 2"
    assert generation_parameters(*args, denoising_strength=1.0) == head + ", Denoising strength: 1"
    assert generation_parameters(*args, clip_skip=3) == head + ", Clip skip: 3"


def test_default_strength_is_the_pipelines():
    from minisd import cli, img2img
    assert cli.DEFAULT_STRENGTH == img2img.DEFAULT_STRENGTH


def write_image(path: Path, size=(70, 45), mode="RGB", seed=0) -> Path:
    """A noise image of `size` (W, H), converted to `mode`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_img2img_keeps_the_init_image_size(tiny_current, tmp_path, mode):
    """An odd size (not a multiple of 8) comes back as it went in; the default strength is written."""
    init = write_image(tmp_path / "init.png", (70, 45), mode)
    out = tmp_path / "out.png"
    assert main(["generate", "a cat", "--init-image", str(init), "-o", str(out), "-s", "1", "-m", str(tiny_current),
                 "--steps", "2", "--quiet", "--dtype", "float32"]) == 0
    image = Image.open(out)
    assert image.size == (70, 45) and image.mode == "RGB"
    assert image.text["parameters"].endswith(f"Size: 70x45, Model: {tiny_current.name}, Denoising strength: 0.8")


def test_img2img_size_options_resize_the_init_image(tiny_current, tmp_path):
    init = write_image(tmp_path / "init.png", (70, 45))
    for name, size in (("a.png", ["--size", "48x64"]), ("b.png", ["-W", "48", "-H", "64"])):
        assert main(["generate", "a cat", "--init-image", str(init), "-o", str(tmp_path / name), *size,
                     "-m", str(tiny_current), "--steps", "2", "--quiet", "--strength", "0.5"]) == 0
        image = Image.open(tmp_path / name)
        assert image.size == (48, 64) and "Size: 48x64, " in image.text["parameters"]


def test_clip_skip_written_above_1_only(tiny_current, tmp_path):
    for n in (1, 2):
        assert main(["generate", "a cat", "-o", str(tmp_path / f"{n}.png"), "--clip-skip", str(n),
                     "-m", str(tiny_current), *FAST]) == 0
    assert "Clip skip" not in Image.open(tmp_path / "1.png").text["parameters"]
    assert Image.open(tmp_path / "2.png").text["parameters"].endswith(f"Model: {tiny_current.name}, Clip skip: 2")


def test_cli_gives_what_the_pipeline_gives(tiny_current, tmp_path):
    """img2img with --clip-skip 2 and each --prompt-syntax: the same pixels as Pipeline called
    with the same arguments (clip_skip counted from 0) and the generators the CLI builds (one
    CPU generator per image, seeds seed, seed+1, ...). The two syntaxes read "(red:1.5)"
    differently, so a syntax that did not reach the pipeline would show."""
    import torch

    from minisd import Pipeline

    init = write_image(tmp_path / "init.png", (70, 45), "RGBA")
    prompt, negative, seed = "a (red:1.5) cat BREAK a [blue] dog", "blurry", 11
    pipe = Pipeline.from_pretrained(tiny_current, dtype=torch.float32)
    images = {}
    for syntax in ("a1111", "plain", None):  # None: the default, a1111
        out = tmp_path / f"{syntax}.png"
        option = [] if syntax is None else ["--prompt-syntax", syntax]
        assert main(["generate", prompt, "-n", negative, "--init-image", str(init), "--strength", "0.6",
                     "--clip-skip", "2", "-b", "2", "-s", str(seed), "-o", str(out), "-m", str(tiny_current),
                     "--steps", "3", "--quiet", "--dtype", "float32", "--device", "cpu", *option]) == 0
        images[syntax] = [np.asarray(Image.open(tmp_path / f"{syntax}-{i}.png")) for i in range(2)]
        if syntax is None:
            continue
        expected = pipe(prompt, negative_prompt=negative, image=Image.open(init), strength=0.6, clip_skip=1,
                        prompt_syntax=syntax, num_images_per_prompt=2, num_inference_steps=3,
                        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(2)]).images
        for got, want in zip(images[syntax], expected):
            assert got.shape == (45, 70, 3) and np.array_equal(got, np.asarray(want))
    assert all(np.array_equal(a, b) for a, b in zip(images[None], images["a1111"]))
    assert not np.array_equal(images["a1111"][0], images["plain"][0])
    text = Image.open(tmp_path / "a1111-1.png").text["parameters"]
    assert text.startswith(f"{prompt}\nNegative prompt: {negative}\nSteps: 3, ") and f"Seed: {seed + 1}," in text
    assert text.endswith(", Denoising strength: 0.6, Clip skip: 2")


def test_model_as_a_hub_id_read_from_the_cache(tiny_current, tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(tiny_current, target_is_directory=True)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    result = run("generate", "a cat", "-o", str(tmp_path / "a.png"), "-m", "someone/tiny-sd", *FAST, env=env)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    result = run("generate", "a cat", "-o", str(tmp_path / "b.png"), "-m", "someone/not-cached", *FAST, env=env)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "someone/not-cached" in result.stderr and not (tmp_path / "b.png").exists()


def bad_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image\n")
    png = write_image(folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "a-folder.png").mkdir()
    return {"missing": folder / "nope.png", "text": folder / "notes.txt", "truncated": folder / "truncated.png",
            "folder": folder / "a-folder.png", "good": write_image(folder / "good.png")}


@pytest.mark.parametrize("args, words", [
    (["--init-image", "{missing}"], "--init-image: '{missing}' does not exist"),
    (["--init-image", "{text}"], "--init-image: '{text}' is not an image file"),
    (["--init-image", "{truncated}"], "--init-image: cannot read '{truncated}'"),
    (["--init-image", "{folder}"], "--init-image: '{folder}' is a folder"),
    (["--init-image", "{good}", "--strength", "0"], "--strength: must lie in (0, 1]"),
    (["--init-image", "{good}", "--strength", "1.5"], "--strength: must lie in (0, 1]"),
    (["--init-image", "{good}", "--strength", "nan"], "--strength: must lie in (0, 1]"),
    (["--init-image", "{good}", "--strength", "much"], "invalid float value"),
    (["--strength", "0.5"], "--strength: applies to img2img only; give --init-image"),
    (["--clip-skip", "0"], "--clip-skip: must be at least 1"),
    (["--clip-skip", "-1"], "--clip-skip: must be at least 1"),
    (["--clip-skip", "1.5"], "invalid int value"),
    (["--prompt-syntax", "comfy"], "invalid choice: 'comfy'"),
    (["--gate-step", "0"], "--gate-step: must be at least 1"),
    (["--cache-interval", "0"], "--cache-interval: must be at least 1"),
    (["--cache-interval", "2", "--cache-branch", "-1"], "--cache-branch: must be at least 0"),
    (["--cache-branch", "1"], "--cache-branch: applies with --cache-interval only"),
    (["--gate-step", "two"], "invalid int value"),
])
def test_bad_new_options_one_line_exit_2_before_loading(tmp_path, args, words):
    """Checked before the model loads: the model folder named here does not exist, which
    would be exit 1."""
    files = bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(**files) for a in args]
    result = run("generate", "x", *args, "-o", str(out / "x.png"), "--model", str(tmp_path / "no-model"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("minisd: error:") and words.format(**files) in lines[0], lines
    assert not list(out.iterdir())


def test_clip_skip_too_large_for_the_model(tiny_current, tmp_path):
    layers = json.loads((tiny_current / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    assert main(["generate", "x", "-o", str(tmp_path / "ok.png"), "--clip-skip", str(layers + 1),
                 "-m", str(tiny_current), *FAST]) == 0  # the token embeddings, before any layer
    (tmp_path / "ok.png").unlink()
    for n in (layers + 2, 10**30):
        result = run("generate", "x", "-o", str(tmp_path / "x.png"), "--clip-skip", str(n),
                     "-m", str(tiny_current), *FAST)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0] == (f"minisd: error: --clip-skip: must lie in [1, {layers + 1}] for this model "
                            f"(its text encoder has {layers} layers; 1 = the last), got {n}")
    assert not list(tmp_path.iterdir())


def test_step_skipping_options_give_what_the_pipeline_gives(tiny_current, tmp_path):
    """--gate-step, --cache-interval, --cache-branch reach the pipeline and the PNG says them
    (the branch as used, also when defaulted); --fast is 20 steps, the gate at 60% of the
    steps and --cache-interval 2, and what is given explicitly wins."""
    import torch

    from minisd import Pipeline

    pipe = Pipeline.from_pretrained(tiny_current, dtype=torch.float32)

    def expected(steps, **kwargs):
        return np.asarray(pipe("a cat", num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(5),
                               **kwargs).images[0])

    common = ["-s", "5", "-m", str(tiny_current), "--size", "64x64", "--quiet", "--dtype", "float32",
              "--device", "cpu"]
    cases = [(["--steps", "6", "--gate-step", "2", "--cache-interval", "3"], 6,
              dict(gate_step=2, cache_interval=3), "T-GATE gate step: 2, DeepCache interval: 3, DeepCache branch: 0"),
             (["--steps", "6", "--cache-interval", "2", "--cache-branch", "2"], 6,
              dict(cache_interval=2, cache_branch=2), "DeepCache interval: 2, DeepCache branch: 2"),
             (["--fast"], 20, dict(gate_step=12, cache_interval=2, cache_branch=1),
              "T-GATE gate step: 12, DeepCache interval: 2, DeepCache branch: 1"),
             (["--fast", "--steps", "10", "--cache-interval", "3", "--cache-branch", "0"], 10,
              dict(gate_step=6, cache_interval=3, cache_branch=0), "T-GATE gate step: 6, DeepCache interval: 3, "
                                                                   "DeepCache branch: 0")]
    for k, (options, steps, kwargs, fields) in enumerate(cases):
        out = tmp_path / f"{k}.png"
        assert main(["generate", "a cat", "-o", str(out), *common, *options]) == 0
        image = Image.open(out)
        assert np.array_equal(np.asarray(image), expected(steps, **kwargs)), options
        assert f"Steps: {steps}," in image.text["parameters"] and fields in image.text["parameters"], options
    assert "T-GATE" not in Image.open(tmp_path / "1.png").text["parameters"]

