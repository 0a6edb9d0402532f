"""minisd-shapes, the embedded model: its data set, its judge, the shipped folder's format,
a small evaluation of what it draws, and parity with diffusers on it."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_shapes  # tools/ is on sys.path (setup.cfg's [tool:pytest] pythonpath)
import shapes
from minisd import cli
from minisd.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "minisd-shapes"
IMAGE_TOL = 2e-3  # max |minisd - diffusers| over 'np' images in [0, 1], as in test_pipeline.py
MAX_FOLDER_MB = 25
# The shipped model must reach background/colour 90%, shape/position 80% on 100 prompts at 25
# steps (tools/eval_shapes.py; its model card gives what it reached). This smaller run (12
# prompts, other seeds) has a lower bar: one miss in 12 is 92%.
SMALL_EVAL_BAR = {"background": 0.8, "colour": 0.8, "shape": 0.7, "position": 0.7}

needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(),
                                 reason="weights/minisd-shapes not trained yet (tools/train_shapes.py)")


def test_data_set_draws_what_the_caption_says():
    images, captions, scenes = shapes.batch(np.random.default_rng(123), 150)
    truths = [scene.attributes() for scene in scenes]
    for text, truth in zip(captions, truths):
        stated = shapes.parse_caption(text)
        assert {k: stated[k] for k in eval_shapes.JUDGED} == {k: truth[k] for k in eval_shapes.JUDGED}, text
        assert stated["size"] in (None, truth["size"]), text
    accuracy, _ = eval_shapes.score(images, truths)
    assert accuracy == {k: 1.0 for k in (*eval_shapes.JUDGED, "size")}


def test_data_set_is_seeded_and_varied():
    a, captions, scenes = shapes.batch(np.random.default_rng(5), 200)
    b, captions_b, _ = shapes.batch(np.random.default_rng(5), 200)
    assert np.array_equal(a, b) and captions == captions_b
    assert len(set(captions)) > 190
    for key, values in (("shape", shapes.SHAPES), ("colour", shapes.COLOURS), ("position", shapes.POSITIONS)):
        assert {getattr(s, key) for s in scenes} == set(values)
    assert all(s.colour != s.background for s in scenes)


def test_judge_sees_a_blank_image_as_no_shape():
    blank = np.full((64, 64, 3), shapes.COLOURS["green"], dtype=np.uint8)
    verdict = eval_shapes.judge(blank)
    assert verdict["background"] == "green" and verdict["shape"] is None and verdict["colour"] is None


@needs_model
def test_shipped_folder_format():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_FOLDER_MB * 1e6
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and not (MODEL / "safety_checker").exists()
    assert json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "DPMSolverMultistepScheduler"
    assert not list(MODEL.rglob("*.bin")) and (MODEL / "README.md").is_file()
    from safetensors import safe_open

    with safe_open(MODEL / "text_encoder" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.get_slice("embeddings.token_embedding.weight").get_shape()[0] == 49408
    assert not any(k.startswith("text_model.") for k in keys)  # transformers 5 names


@needs_model
def test_tokenizer_folder_matches_transformers():
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    ours = Pipeline.from_pretrained(MODEL, safety_checker=None).tokenizer
    prompts = ["blue background, large yellow triangle at the top", "", "a little purple circle in the centre"]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours(prompts).tolist() == expected


@needs_model
def test_shipped_model_draws_what_it_is_told():
    accuracy, rows = eval_shapes.evaluate_model(MODEL, n=12, steps=25, seed=777)
    wrong = [(text, verdict) for text, truth, verdict in rows
             if any(verdict[k] != truth[k] for k in eval_shapes.JUDGED)]
    for key, bar in SMALL_EVAL_BAR.items():
        assert accuracy[key] >= bar, (key, accuracy, wrong)


@needs_model
def test_diffusers_gives_the_same_images():
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(MODEL)
    reference.set_progress_bar_config(disable=True)
    assert reference.safety_checker is None
    ours = Pipeline.from_pretrained(MODEL, safety_checker=None)
    kwargs = dict(prompt=["a red circle on a blue background", "green background, small white square at the top"],
                  num_inference_steps=25, output_type="np")
    expected = reference(**kwargs, generator=torch.Generator().manual_seed(11)).images
    got = ours(**kwargs, generator=torch.Generator().manual_seed(11)).images
    assert got.shape == expected.shape == (2, 64, 64, 3)
    assert expected.std() > 0.05  # a picture, not a flat field
    assert np.abs(got - expected).max() <= IMAGE_TOL


@needs_model
def test_generate_uses_the_embedded_model_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MINISD_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert cli.find_model(None) == cli.EMBEDDED_MODEL == MODEL
