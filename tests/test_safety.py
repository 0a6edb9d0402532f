"""The safety checker against its references.

    preprocessing   minisd's CLIPPreprocess vs transformers' CLIPImageProcessor (PIL backend)
    scoring         minisd's SafetyChecker (either fixture format) vs diffusers'
                    StableDiffusionSafetyChecker, on concept embeddings placed to flag chosen images
    pipeline        minisd's Pipeline with the checker on vs diffusers' StableDiffusionPipeline
    opt-out         safety_checker=None, a folder without safety_checker/, nothing leaks

The fixture's concept thresholds (0.85..0.95) flag nothing, so the tests that need flags write
a copy of a fixture folder whose concept embeddings are aimed at chosen images (`place_concepts`).
"""
import json
import logging
import re
import shutil

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from PIL import Image
from transformers import CLIPImageProcessor

from minisd.pipeline import Pipeline
from minisd.safety import CLIPPreprocess, load_safety_checker

PIXEL_TOL = 1e-2  # max |minisd - transformers| over CLIP pixel values (after normalisation)
SCORE_TOL = 1e-4  # max |minisd - diffusers| over special-care and concept scores
IMAGE_TOL = 2e-3  # max |minisd - diffusers| over pipeline 'np' images in [0, 1]
UNREACHABLE = 1.05  # a threshold no cosine (<= 1) reaches, even with the +0.01 adjustment

FORMATS = ("current", "legacy")
CONCEPT_KEYS = ("concept_embeds", "concept_embeds_weights", "special_care_embeds", "special_care_embeds_weights")


# --- images ------------------------------------------------------------------------------

def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [0,1] -> 8-bit PIL images, rounded as diffusers' pipeline does before its
    feature extractor (and as minisd does inside CLIPPreprocess)."""
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def sample_images(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[4,3,H,W] in [0,1]: a smooth gradient, flat shapes on a background, a blurry photo-like
    field and plain noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    gradient = torch.stack([x, y, 0.5 + 0.5 * torch.sin(6 * x + 4 * y)])

    shapes = torch.tensor([0.9, 0.85, 0.7])[:, None, None].expand(3, height, width).clone()
    disc = (x - 0.35) ** 2 * width / height + (y - 0.5) ** 2 * height / width < 0.05
    shapes[:, disc] = torch.tensor([0.8, 0.1, 0.1])[:, None]
    shapes[:, (x > 0.6) & (x < 0.9) & (y > 0.2) & (y < 0.7)] = torch.tensor([0.1, 0.3, 0.8])[:, None]

    coarse = torch.rand(1, 3, max(2, height // 16), max(2, width // 16), generator=g)
    field = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    noise = torch.rand(3, height, width, generator=g)
    return torch.stack([gradient, shapes, field, noise]).clamp(0, 1)


# --- 1. preprocessing --------------------------------------------------------------------

SIZES = [(64, 64), (512, 512), (512, 768), (768, 512), (300, 200), (224, 224), (50, 400)]  # width, height


@pytest.mark.parametrize("width, height", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_preprocess_matches_transformers(tiny_formats, width, height):
    images = sample_images(height, width)
    theirs = CLIPImageProcessor.from_pretrained(tiny_formats / "feature_extractor")
    expected = theirs(to_pil(images), return_tensors="pt").pixel_values
    got = CLIPPreprocess.from_folder(tiny_formats)(images)
    assert got.shape == expected.shape == (4, 3, 224, 224)
    assert (got - expected).abs().max() <= PIXEL_TOL


def test_both_config_forms_read_as_sd_defaults(tiny_current, tiny_legacy):
    # legacy: `size: 224, crop_size: 224` and no rescale keys; current: dicts and rescale_factor.
    assert CLIPPreprocess.from_folder(tiny_legacy) == CLIPPreprocess.from_folder(tiny_current) == CLIPPreprocess()


# Non-default settings, so that a field minisd ignored or misread would show.
CUSTOM_CONFIGS = {
    "current": dict(do_resize=True, size={"shortest_edge": 256}, resample=2, do_center_crop=True,
                    crop_size={"height": 240, "width": 200}, do_rescale=True, rescale_factor=1 / 255,
                    do_normalize=True, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25],
                    do_convert_rgb=True, image_processor_type="CLIPImageProcessor"),
    "legacy": dict(size=256, resample=2, do_center_crop=True, crop_size=240, do_resize=True,
                   do_normalize=True, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25],
                   do_convert_rgb=True, feature_extractor_type="CLIPFeatureExtractor"),
}


@pytest.mark.parametrize("form", list(CUSTOM_CONFIGS))
def test_preprocess_follows_the_config(tmp_path, form):
    (tmp_path / "feature_extractor").mkdir()
    (tmp_path / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(CUSTOM_CONFIGS[form]))
    theirs = CLIPImageProcessor.from_pretrained(tmp_path / "feature_extractor")
    ours = CLIPPreprocess.from_folder(tmp_path)
    for height, width in ((300, 500), (512, 256)):
        images = sample_images(height, width, seed=1)
        expected = theirs(to_pil(images), return_tensors="pt").pixel_values
        got = ours(images)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= PIXEL_TOL


# --- placing concept embeddings -----------------------------------------------------------

def read_checker_tensors(folder) -> dict[str, torch.Tensor]:
    where = folder / "safety_checker"
    if (where / "model.safetensors").is_file():
        return safetensors.torch.load_file(where / "model.safetensors")
    return torch.load(where / "pytorch_model.bin", map_location="cpu", weights_only=True)


def copy_with_concepts(src, dst, concepts: dict[str, torch.Tensor]):
    """Copy a pipeline folder, replacing the checker's concept tensors in its own file format."""
    shutil.copytree(src, dst)
    state = read_checker_tensors(dst)
    state.update({k: v.clone().contiguous() for k, v in concepts.items()})
    if (dst / "safety_checker" / "model.safetensors").is_file():
        safetensors.torch.save_file(state, dst / "safety_checker" / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(state, dst / "safety_checker" / "pytorch_model.bin")
    return dst


def place_concepts(embeds: torch.Tensor, base: dict[str, torch.Tensor], special_plan, concept_plan):
    """Concept tensors that flag chosen images. A plan is [(row, image, score)]: the row is
    aimed at that image alone (cosine 0 with every other image, through the pseudo-inverse of
    the normalised image embeddings) and its threshold makes the image score `score` before
    any special-care adjustment. Other rows keep the fixture's direction and can never hit."""
    e = F.normalize(embeds.double(), dim=-1)  # [N, D]
    aim = torch.linalg.pinv(e)  # [D, N]; e @ aim = identity
    out = {}
    for name, plan in (("special_care_embeds", special_plan), ("concept_embeds", concept_plan)):
        rows = base[name].double().clone()
        weights = torch.full((rows.shape[0],), UNREACHABLE, dtype=torch.float64)
        for row, image, score in plan:
            rows[row] = F.normalize(aim[:, image], dim=0)
            weights[row] = e[image] @ rows[row] - score
            # Every other image scores -weight here: keep that clear of the +0.01 adjustment.
            assert weights[row] > 0.02, "image embeddings too alike to aim a concept at one"
        out[name], out[f"{name}_weights"] = rows.float(), weights.float()
    return out


def reference_scores(ref: StableDiffusionSafetyChecker, clip_input: torch.Tensor):
    """diffusers' StableDiffusionSafetyChecker.forward up to its per-image `result` dicts,
    statement for statement (forward itself returns only the flags): (special [B,3], concept [B,17])."""
    with torch.no_grad():  # forward is @torch.no_grad()
        pooled_output = ref.vision_model(clip_input)[1]
        image_embeds = ref.visual_projection(pooled_output)
        special_cos_dist = cosine_distance(image_embeds, ref.special_care_embeds).cpu().float().numpy()
        cos_dist = cosine_distance(image_embeds, ref.concept_embeds).cpu().float().numpy()
    special = np.zeros(special_cos_dist.shape)
    concept = np.zeros(cos_dist.shape)
    for i in range(image_embeds.shape[0]):
        adjustment = 0.0
        for concept_idx in range(len(special_cos_dist[0])):
            concept_cos = special_cos_dist[i][concept_idx]
            concept_threshold = ref.special_care_embeds_weights[concept_idx].item()
            special[i, concept_idx] = round(concept_cos - concept_threshold + adjustment, 3)
            if special[i, concept_idx] > 0:
                adjustment = 0.01
        for concept_idx in range(len(cos_dist[0])):
            concept_cos = cos_dist[i][concept_idx]
            concept_threshold = ref.concept_embeds_weights[concept_idx].item()
            concept[i, concept_idx] = round(concept_cos - concept_threshold + adjustment, 3)
    return special, concept


def assert_all_three_cases(special: np.ndarray, concept: np.ndarray):
    """Some images flagged by a concept alone, some only through the +0.01 special-care
    adjustment (top concept score in (0, 0.01]: <= 0 before it), some not at all."""
    flagged = concept.max(1) > 0
    via_adjustment = flagged & (special > 0).any(1) & (concept.max(1) <= 0.01 + 1e-9)
    assert (flagged & ~via_adjustment).any(), "no image flagged through a plain concept"
    assert via_adjustment.any(), "no image flagged through the special-care adjustment"
    assert (~flagged).any(), "every image flagged"


def clip_embeddings(ref: StableDiffusionSafetyChecker, processor, images: torch.Tensor) -> torch.Tensor:
    clip_input = processor(to_pil(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        return ref.visual_projection(ref.vision_model(clip_input)[1])


# --- 2. the checker against diffusers' --------------------------------------------------

# Six 96x64 images (sample_images, then another blurry field and noise), and what the placed
# concepts do to each:
#   0  concept 0 scores +0.02                                  -> flagged (plain)
#   1  special 0 hits; concept 1 at -0.005, +0.01 -> +0.005    -> flagged (adjustment)
#   2  special 1 at -0.005 (before the hit, not adjusted), special 2 hits; no concept near
#                                                              -> not flagged
#   3  concept 2 at -0.005, no special hit                     -> not flagged (a near miss)
#   4  concepts 5 and 16 score +0.03, special 0 misses         -> flagged (plain)
#   5  nothing                                                 -> not flagged
CHECKER_SPECIAL_PLAN = [(0, 1, 0.02), (1, 2, -0.005), (2, 2, 0.02)]
CHECKER_CONCEPT_PLAN = [(0, 0, 0.02), (1, 1, -0.005), (2, 3, -0.005), (5, 4, 0.03), (16, 4, 0.03)]
CHECKER_FLAGS = [True, True, False, False, True, False]


@pytest.fixture(scope="module")
def checker_case(make_tiny, tmp_path_factory):
    """(images [6,3,64,96], {format: folder with placed concepts}, diffusers' checker, processor)."""
    images = torch.cat([sample_images(64, 96, seed=2), sample_images(64, 96, seed=3)[2:]])
    current = make_tiny("current")
    processor = CLIPImageProcessor.from_pretrained(current / "feature_extractor")
    ref = StableDiffusionSafetyChecker.from_pretrained(current / "safety_checker").eval()
    concepts = place_concepts(clip_embeddings(ref, processor, images), read_checker_tensors(current),
                              CHECKER_SPECIAL_PLAN, CHECKER_CONCEPT_PLAN)
    out = tmp_path_factory.mktemp("placed_checker")
    folders = {fmt: copy_with_concepts(make_tiny(fmt), out / fmt, concepts) for fmt in FORMATS}
    ref = StableDiffusionSafetyChecker.from_pretrained(folders["current"] / "safety_checker").eval()
    return images, folders, ref, processor


@pytest.mark.parametrize("fmt", FORMATS)
def test_checker_matches_diffusers(checker_case, fmt):
    images, folders, ref, processor = checker_case
    clip_input = processor(to_pil(images), return_tensors="pt").pixel_values
    ref_special, ref_concept = reference_scores(ref, clip_input)
    ref_images, ref_flags = ref(clip_input=clip_input, images=images.clone())
    assert ref_flags == list((ref_concept > 0).any(1)) == CHECKER_FLAGS  # the replica and the placement hold
    assert_all_three_cases(ref_special, ref_concept)

    checker = load_safety_checker(folders[fmt])
    special, concept = checker.scores(checker.preprocess(images))
    assert special.shape == (6, 3) and concept.shape == (6, 17)
    assert np.abs(special.numpy() - ref_special).max() <= SCORE_TOL
    assert np.abs(concept.numpy() - ref_concept).max() <= SCORE_TOL

    before = images.clone()
    got_images, flags = checker(images)
    assert flags == ref_flags
    assert torch.equal(images, before)  # the caller's batch is not blacked out in place
    assert torch.equal(got_images, ref_images)
    flagged = torch.tensor(flags)
    assert (got_images[flagged] == 0).all() and torch.equal(got_images[~flagged], images[~flagged])


# --- 3. the pipeline with the checker on ------------------------------------------------

PROMPTS = ["a red cube", "a blue sphere", "a green tree"]
RUN = dict(num_inference_steps=3, height=64, width=64)
# Image 0 flagged by concept 0; image 1 by concept 1 at -0.005 plus the adjustment from
# special 0; image 2 a near miss (concept 2 at -0.005, no special hit).
PIPE_SPECIAL_PLAN = [(0, 1, 0.02)]
PIPE_CONCEPT_PLAN = [(0, 0, 0.02), (1, 1, -0.005), (2, 2, -0.005)]
PIPE_FLAGS = [True, True, False]


def seed():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def flagging(make_tiny, tmp_path_factory):
    """({format: folder whose checker flags images 0 and 1 of PROMPTS}, diffusers' 'np' output
    for PROMPTS from the current one, checker on)."""
    current = make_tiny("current")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(current)  # checker on
    pipe.set_progress_bar_config(disable=True)
    checker = pipe.safety_checker
    pipe.safety_checker = None  # the plain images first, to aim the concepts at
    images = pipe(PROMPTS, **RUN, generator=seed(), output_type="pt").images
    concepts = place_concepts(clip_embeddings(checker, pipe.feature_extractor, images),
                              read_checker_tensors(current), PIPE_SPECIAL_PLAN, PIPE_CONCEPT_PLAN)
    out = tmp_path_factory.mktemp("placed_pipeline")
    folders = {fmt: copy_with_concepts(make_tiny(fmt), out / fmt, concepts) for fmt in FORMATS}

    # The same pipeline with the placed folder's checker: what from_pretrained(folders["current"])
    # would give, without loading the rest again.
    pipe.safety_checker = StableDiffusionSafetyChecker.from_pretrained(folders["current"] / "safety_checker").eval()
    expected = pipe(PROMPTS, **RUN, generator=seed(), output_type="np")
    return folders, expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_pipeline_with_checker_matches_diffusers(flagging, fmt):
    folders, expected = flagging
    ours = Pipeline.from_pretrained(folders[fmt])
    assert ours.safety_checker is not None
    got = ours(PROMPTS, **RUN, generator=seed(), output_type="np")
    assert expected.nsfw_content_detected == PIPE_FLAGS  # the placement holds
    assert got.nsfw_content_detected == PIPE_FLAGS
    assert np.abs(got.images - expected.images).max() <= IMAGE_TOL
    for i, flagged in enumerate(PIPE_FLAGS):
        if flagged:
            assert (got.images[i] == 0).all() and (expected.images[i] == 0).all()
        else:
            assert got.images[i].std() > 1e-3  # a real image came through

    # No images, no check (diffusers also returns None there).
    latent = ours(PROMPTS, num_inference_steps=1, height=64, width=64, generator=seed(), output_type="latent")
    assert latent.nsfw_content_detected is None


# --- 4. opting out, and nothing leaking --------------------------------------------------

def minisd_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("minisd") and r.levelno >= logging.WARNING]


def test_disabled_checker_warns_and_reports_none(tiny_current, caplog):
    with caplog.at_level(logging.WARNING, logger="minisd"):
        pipe = Pipeline.from_pretrained(tiny_current, safety_checker=None)
    assert pipe.safety_checker is None
    assert len([m for m in minisd_warnings(caplog) if "safety checker" in m.lower()]) == 1
    assert pipe("a cat", num_inference_steps=1, output_type="np").nsfw_content_detected is None


def test_folder_without_checker_loads_with_a_warning(tiny_formats, tmp_path, caplog):
    folder = shutil.copytree(tiny_formats, tmp_path / "no_checker", ignore=shutil.ignore_patterns("safety_checker"))
    with caplog.at_level(logging.WARNING, logger="minisd"):
        pipe = Pipeline.from_pretrained(folder)
    assert pipe.safety_checker is None
    assert any("safety_checker" in m for m in minisd_warnings(caplog))
    assert pipe("a cat", num_inference_steps=1, output_type="np").nsfw_content_detected is None


def test_concept_embeddings_stay_hidden(checker_case, caplog):
    images, folders, _, _ = checker_case
    with caplog.at_level(logging.DEBUG):  # every logger, every level
        checker = load_safety_checker(folders["legacy"])
        _, flags = checker(images)
        pipe = Pipeline.from_pretrained(folders["legacy"])
        pipe("a cat", num_inference_steps=1, output_type="np")
    assert any(flags)  # the hidden data was used
    assert "hidden" in repr(checker)
    assert not re.search(r"\d\.\d{4}", repr(checker))  # no tensor values at all
    text = repr(checker) + "\n" + caplog.text
    values = torch.cat([getattr(checker, k).flatten() for k in CONCEPT_KEYS]).tolist()
    leaked = [v for v in values if f"{v:.4f}" in text]
    assert not leaked
