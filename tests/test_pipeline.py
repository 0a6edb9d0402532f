"""End-to-end parity: minisd's Pipeline (loading either fixture format) against diffusers'
StableDiffusionPipeline (loading the current-format folder, the same weights), 10 steps,
fp32 CPU, compared on the 'np' images."""
import logging

import diffusers
import numpy as np
import pytest
import torch

from minisd.errors import InputError
from minisd.pipeline import Pipeline

IMAGE_TOL = 2e-3  # max |minisd - diffusers| over 'np' images in [0, 1]
STEPS = 10
LONG_PROMPT = "a very detailed painting of a lighthouse on a cliff at sunset, " * 8


@pytest.fixture(scope="module")
def reference(tiny_current):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_current, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["current", "legacy"])
def ours(request, make_tiny):
    return Pipeline.from_pretrained(make_tiny(request.param), safety_checker=None)


CASES = {
    "two prompts with negatives": dict(prompt=["a red cube", "a blue sphere on grass"],
                                       negative_prompt=["blurry", "low quality, text"]),
    "prompt over 77 tokens": dict(prompt=LONG_PROMPT, negative_prompt="ugly"),
    "two images per prompt": dict(prompt="a cat", num_images_per_prompt=2),
    "non-square": dict(prompt="a wide landscape", height=48, width=80),
    "no guidance": dict(prompt="a dog", guidance_scale=1.0),
    "guidance rescale": dict(prompt="a dog", guidance_scale=9.0, guidance_rescale=0.7),
}


def generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_parity(ours, reference, case):
    kwargs = dict(CASES[case], num_inference_steps=STEPS, output_type="np")
    expected = reference(**kwargs, generator=torch.Generator().manual_seed(7)).images
    got = ours(**kwargs, generator=torch.Generator().manual_seed(7)).images
    assert got.shape == expected.shape
    assert expected.std() > 1e-3  # not a blank image
    assert np.abs(got - expected).max() <= IMAGE_TOL


def test_pipeline_parity_with_generator_list_and_latents(ours, reference):
    kwargs = dict(prompt=["a house", "a tree"], num_inference_steps=STEPS, output_type="np")
    expected = reference(**kwargs, generator=generators(2)).images
    assert np.abs(ours(**kwargs, generator=generators(2)).images - expected).max() <= IMAGE_TOL
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = reference(**kwargs, latents=latents).images
    assert np.abs(ours(**kwargs, latents=latents).images - expected).max() <= IMAGE_TOL


def test_long_prompt_warns_with_the_cut_text(ours, caplog):
    with caplog.at_level(logging.WARNING, logger="minisd"):
        ours(LONG_PROMPT, num_inference_steps=1, output_type="latent")
    assert "truncated" in caplog.text and "lighthouse" in caplog.text


def test_output_types(ours):
    run = dict(prompt="a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pil = ours(**run, output_type="pil").images
    run["generator"] = torch.Generator().manual_seed(0)
    pt = ours(**run, output_type="pt").images
    run["generator"] = torch.Generator().manual_seed(0)
    latent = ours(**run, output_type="latent").images
    assert pil[0].size == (64, 64) and pil[0].mode == "RGB"
    assert pt.shape == (1, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    assert latent.shape == (1, 4, 8, 8)
    assert np.array_equal(np.asarray(pil[0]), (pt[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_same_seed_same_image_and_inputs_untouched(ours):
    latents = torch.randn(1, 4, 8, 8)
    before = latents.clone()
    a = ours("a cat", num_inference_steps=3, latents=latents, output_type="np").images
    b = ours("a cat", num_inference_steps=3, latents=latents, output_type="np").images
    assert np.array_equal(a, b) and torch.equal(latents, before)


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt=""), None),  # the empty prompt is valid
    (dict(prompt=None), "prompt: expected a string"),
    (dict(prompt=[]), "prompt: expected a string"),
    (dict(prompt=["ok", 3]), r"prompt\[1\]: expected a string, got int"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "3 negative prompt"),
    (dict(prompt="a", height=60), "height: must be a positive multiple of 8"),
    (dict(prompt="a", width=0), "width: must be a positive multiple of 8"),
    (dict(prompt="a", num_inference_steps=0), "num_inference_steps"),
    (dict(prompt="a", guidance_scale=float("nan")), "guidance_scale: must be a finite number"),
    (dict(prompt="a", output_type="jpeg"), "output_type"),
    (dict(prompt="a", latents=torch.randn(1, 4, 4, 4)), r"latents: expected shape \(1, 4, 8, 8\)"),
])
def test_bad_arguments(ours, kwargs, words):
    if words is None:
        ours(**kwargs, num_inference_steps=1, output_type="latent")
        return
    with pytest.raises(InputError, match=words):
        ours(**{"num_inference_steps": 1, **kwargs})


def test_callback_on_step_end_as_diffusers(ours, reference):
    """Called after each step with (pipe, i, t, {"latents": ...}); latents it returns replace the step's."""
    def callback(log):
        def on_step(pipe, i, t, tensors):
            log.append((i, int(t)))
            return {"latents": tensors["latents"] * 0.9} if i == 3 else tensors
        return on_step
    theirs, mine = [], []
    kwargs = dict(prompt="a cat", num_inference_steps=STEPS, output_type="np")
    expected = reference(**kwargs, generator=torch.Generator().manual_seed(1), callback_on_step_end=callback(theirs)).images
    got = ours(**kwargs, generator=torch.Generator().manual_seed(1), callback_on_step_end=callback(mine)).images
    assert mine == theirs and len(mine) == STEPS
    assert np.abs(got - expected).max() <= IMAGE_TOL
    plain = ours(**kwargs, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(got - plain).max() > 1e-3  # the returned latents were used
