"""minisd's step skipping against the add-on packages diffusers users bolt on for the same
methods, on the same tiny random weights, in float32: `tgate` (T-GATE, its self-attention
caching switched off: sp_interval = fi_interval = 1, warm_up = 0) and `DeepCache`
(DeepCacheSDHelper), and tgate's loader that combines them. The same method must give the
same image, to float32 rounding: a test of what minisd's gate and cache do, step by step,
that does not rest on minisd's own reading of the papers."""
import diffusers
import numpy as np
import pytest
import torch

from minisd.pipeline import Pipeline

from DeepCache import DeepCacheSDHelper  # noqa: E402
from tgate import TgateSDDeepCacheLoader, TgateSDLoader  # noqa: E402

TOL = 1e-5  # max |difference| of images in [0, 1]; plain minisd vs diffusers measures ~1e-6 here
CALL = dict(prompt="a red square", num_inference_steps=8, height=64, width=64, output_type="np")
TGATE_ONLY_CROSS = dict(sp_interval=1, fi_interval=1, warm_up=0)


def seed():
    return torch.Generator().manual_seed(3)


def diffusers_pipeline(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diff(a, b) -> float:
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module", params=[1, 2], ids=["layers_per_block=1", "layers_per_block=2"])
def folder(request, make_tiny):
    return make_tiny("current", unet={"layers_per_block": request.param})


@pytest.fixture(scope="module")
def ours(folder):
    return Pipeline.from_pretrained(folder, safety_checker=None)


@pytest.fixture(scope="module")
def plain(folder):
    return diffusers_pipeline(folder)(**CALL, generator=seed()).images


@pytest.mark.parametrize("gate_step", [1, 3, 7])
def test_gate_equals_tgate(folder, ours, plain, gate_step):
    theirs = TgateSDLoader(diffusers_pipeline(folder))
    expected = theirs.tgate(**CALL, generator=seed(), gate_step=gate_step, **TGATE_ONLY_CROSS).images
    assert diff(expected, plain) > 100 * TOL  # the gate changes the image: the comparison below means something
    assert diff(ours(**CALL, generator=seed(), gate_step=gate_step).images, expected) < TOL


def deepcache_branches(ours) -> list[int]:
    """The branches both number alike: DeepCache's cache_branch_id counts three layers per
    block (layers_per_block=2's resnet, resnet, downsampler), minisd's every skip; with one layer
    per block they agree on branches 0 and 1 only."""
    lpb = ours.unet.config.layers_per_block
    return list(range(9)) if lpb == 2 else [0, 1]


@pytest.mark.parametrize("interval", [2, 3])
def test_cache_equals_deepcache(folder, ours, plain, interval):
    for branch in deepcache_branches(ours):
        theirs = diffusers_pipeline(folder)
        helper = DeepCacheSDHelper(pipe=theirs)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        expected = theirs(**CALL, generator=seed()).images
        assert diff(expected, plain) > 100 * TOL, branch
        got = ours(**CALL, generator=seed(), cache_interval=interval, cache_branch=branch).images
        assert diff(got, expected) < TOL, f"branch {branch}: {diff(got, expected)}"


@pytest.mark.parametrize("gate_step,interval", [(3, 2), (4, 3)])
def test_gate_and_cache_equal_tgate_with_deepcache(folder, ours, plain, gate_step, interval):
    theirs = TgateSDDeepCacheLoader(diffusers_pipeline(folder), cache_interval=interval, cache_branch_id=1)
    expected = theirs.tgate(**CALL, generator=seed(), gate_step=gate_step, **TGATE_ONLY_CROSS).images
    assert diff(expected, plain) > 100 * TOL
    got = ours(**CALL, generator=seed(), gate_step=gate_step, cache_interval=interval, cache_branch=1).images
    assert diff(got, expected) < TOL
