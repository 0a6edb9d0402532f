"""tools/walkthrough_figures.py: its hand-written loop gives Pipeline's image, and it writes the
three figures of docs/walkthrough.md (at 3 steps here, to stay fast)."""
from pathlib import Path

import pytest
import torch
from PIL import Image

import walkthrough_figures as wf  # tools/ is on sys.path (setup.cfg's [tool:pytest] pythonpath)
from minisd import Pipeline

STEPS = 3
needs_model = pytest.mark.skipif(not (wf.MODEL / "model_index.json").is_file(),
                                 reason="weights/minisd-shapes not trained yet (tools/train_shapes.py)")


@needs_model
def test_the_strip_is_the_pipelines_image():
    gen = wf.generate(wf.MODEL, steps=STEPS)
    pipe = Pipeline.from_pretrained(wf.MODEL, safety_checker=None)
    image = pipe(wf.PROMPT, num_inference_steps=STEPS, guidance_scale=wf.GUIDANCE, output_type="pt",
                 generator=torch.Generator().manual_seed(wf.SEED)).images[0]
    assert (gen.frames[-1] - image).abs().max() <= wf.PARITY_TOL
    assert len(gen.frames) == STEPS + 1 and len(gen.x0s) == STEPS
    # The figure's note: the last step, to sigma 0, returns its x0 prediction as the image.
    assert (gen.frames[-1] - gen.x0s[-1]).abs().max() <= wf.PARITY_TOL
    # minisd-shapes has cross-attention at the 8x8 and 4x4 latent levels; each map is a
    # probability distribution over the 77 tokens at every pixel.
    assert sorted(gen.attention) == [4, 8]
    for maps in gen.attention.values():
        assert torch.allclose(maps.sum(0), torch.ones(()), atol=1e-4)


@needs_model
def test_writes_the_three_figures(tmp_path: Path):
    paths, diff = wf.write_figures(wf.MODEL, tmp_path, steps=STEPS)
    assert [p.name for p in paths] == ["denoising.png", "sigmas.png", "cross_attention.png"]
    assert diff <= wf.PARITY_TOL
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.width >= 400 and image.height >= 200


def test_refuses_to_replace_figures_without_overwrite(tmp_path: Path):
    (tmp_path / "sigmas.png").write_bytes(b"shipped")
    with pytest.raises(SystemExit):
        wf.main(["--out", str(tmp_path)])
    assert (tmp_path / "sigmas.png").read_bytes() == b"shipped"
