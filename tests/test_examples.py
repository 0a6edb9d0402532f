"""Every example runs, and docs/walkthrough.md tells the truth: its shape table and its printed
blocks equal what examples/walkthrough.py prints, for minisd-shapes (a real run) and for small-sd
at 512x512 (the same code on the meta device, from small-sd's config files); the hand-written
loop gives the Pipeline's image."""
import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minisd import Pipeline, config, load_tokenizer
from minisd.clip import CLIPTextModel
from minisd.unet import UNet2DConditionModel
from minisd.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
DOC = (ROOT / "docs" / "walkthrough.md").read_text()
SHAPES_MODEL = ROOT / "weights" / "minisd-shapes"


def run_example(path: Path, cwd: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, str(path), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def shape_lines(text: str) -> list[str]:
    """The `stage   [shape]` lines of a printout, as printed."""
    return [line for line in text.splitlines() if re.fullmatch(r".+?\s+\[[\d, ]+\]", line)]


def doc_blocks() -> list[list[str]]:
    return [shape_lines(block) for block in re.findall(r"```\n(.*?)```", DOC, re.S) if shape_lines(block)]


def doc_table(column: int) -> dict[str, str]:
    """stage -> shape in one column of the walkthrough's table (2: small-sd, 3: minisd-shapes)."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in DOC.splitlines()
            if line.startswith("| ")]
    return {row[0]: row[column] for row in rows if len(row) == 4 and row[column].startswith("[")}


def as_table(lines: list[str]) -> dict[str, str]:
    return {line[:26].strip(): line[26:].strip() for line in lines}


def load_walkthrough():
    spec = importlib.util.spec_from_file_location("walkthrough", ROOT / "examples" / "walkthrough.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"walkthrough.py", "generate.py"}


@pytest.mark.parametrize("example", [p for p in EXAMPLES if p.name != "walkthrough.py"], ids=lambda p: p.name)
def test_example_runs(example, tmp_path):
    out = run_example(example, tmp_path)
    assert list(tmp_path.glob("*.png")), out
    if example.name == "generate.py":
        assert re.search(r"levers on vs off: [01] of 255 levels", out), out


def test_walkthrough_prints_the_documented_shapes_and_makes_the_pipelines_image(tmp_path):
    out = run_example(ROOT / "examples" / "walkthrough.py", tmp_path)
    printed = shape_lines(out)
    assert len(printed) == 14 and printed in doc_blocks()
    table = doc_table(3)
    assert table and all(as_table(printed)[stage] == shape for stage, shape in table.items())

    pipe = Pipeline.from_pretrained(SHAPES_MODEL)
    want = pipe("a large red square on a blue background", generator=torch.Generator().manual_seed(0)).images[0]
    got = Image.open(tmp_path / "walkthrough.png")
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1  # 8-bit levels


def test_small_sd_shapes_in_the_walkthrough_are_small_sds(capsys):
    """examples/walkthrough.py's steps on small-sd's modules, built from its config files on the
    meta device: shapes without weights or arithmetic."""
    walkthrough, data = load_walkthrough(), ROOT / "tests" / "data" / "small-sd"
    read = lambda component: json.loads((data / component / "config.json").read_text())  # noqa: E731
    with torch.device("meta"):
        text_encoder = CLIPTextModel(config.CLIPTextConfig.from_dict(read("text_encoder")))
        unet = UNet2DConditionModel(config.UNetConfig.from_dict(read("unet")))
        vae = AutoencoderKL(config.VAEConfig.from_dict(read("vae")))
    show = walkthrough.show
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()) as out:
        ids = load_tokenizer(SHAPES_MODEL)(["", "an apple, 4k"])  # the same CLIP tokenizer
        show("token ids", ids)
        # The text encoder checks its ids' values, which meta tensors lack: run its layers.
        context = text_encoder.final_layer_norm(text_encoder.encoder(text_encoder.embeddings(ids.to("meta")),
                                                                     causal=True))
        show("text context", context)
        latents = torch.empty(1, unet.config.in_channels, 64, 64, device="meta")
        show("latents", latents)
        show("UNet input, CFG batch", torch.cat([latents] * 2))
        walkthrough.show_unet_levels(unet)
        show("UNet output (noise)", unet(torch.cat([latents] * 2), 999, context))
        show("denoised latents", latents)
        show("image", vae.decode(latents))
    printed = shape_lines(out.getvalue())
    assert len(printed) == 16 and printed in doc_blocks()
    assert all(as_table(printed)[stage] == shape for stage, shape in doc_table(2).items())
