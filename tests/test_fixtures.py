"""The tiny fixture pipelines are what they claim to be.

current: loadable and runnable by diffusers, as today's save_pretrained writes it.
legacy:  the file names, key forms and configs of the real small-sd folder
         (see docs/checkpoint-facts.md), holding the same tensors as current.
"""
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

COMPONENT_FILES = {  # component -> weight file (legacy name, current name)
    "unet": ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
    "vae": ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("pytorch_model.bin", "model.safetensors"),
    "safety_checker": ("pytorch_model.bin", "model.safetensors"),
}

LEGACY_FILES = {
    "model_index.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.bin",
    "text_encoder/config.json", "text_encoder/pytorch_model.bin",
    "tokenizer/vocab.json", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "safety_checker/config.json", "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "feature_extractor/preprocessor_config.json",
}

LEGACY_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.8.0.dev0",
    "algorithm_type": "dpmsolver++", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "dynamic_thresholding_ratio": 0.995, "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_epsilon": True, "sample_max_value": 1.0, "solver_order": 2,
    "solver_type": "midpoint", "thresholding": False, "trained_betas": None,
}


def files_of(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def load_legacy(folder, component):
    return torch.load(folder / component / COMPONENT_FILES[component][0], map_location="cpu", weights_only=True)


def load_current(folder, component):
    return load_file(folder / component / COMPONENT_FILES[component][1])


def read_json(path):
    return json.loads(path.read_text())


# Undo the legacy renames, written out here independently of the tool that applies them.
def unrename(component, key):
    if component == "vae":
        m = re.fullmatch(r"(.*\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)(\..*)", key)
        if m:
            new = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}[m[2]]
            return m[1] + new + m[3]
    if component == "text_encoder":
        return key.removeprefix("text_model.")
    if component == "safety_checker" and key.startswith("vision_model.vision_model."):
        return key.removeprefix("vision_model.")
    return key


# ---------------------------------------------------------------------------------------------


# diffusers warns, as designed, about the legacy folder's steps_offset and unet sample_size < 64.
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_diffusers_runs_both_formats_to_the_same_image(tiny_current, tiny_legacy):
    """diffusers loads today's folder (and, as it happens, the legacy one too) and runs it."""
    from diffusers import StableDiffusionPipeline

    images = {}
    for name, folder in (("current", tiny_current), ("legacy", tiny_legacy)):
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        images[name] = out.images
        assert out.images.shape == (1, 64, 64, 3)
        assert np.isfinite(out.images).all()
        assert out.images.std() > 0.02, "random pipeline gave a flat image"
        assert out.nsfw_content_detected == [False], "default concept thresholds should let images pass"
    np.testing.assert_array_equal(images["current"], images["legacy"])


def test_current_layout(tiny_current):
    files = files_of(tiny_current)
    assert not any(f.endswith(".bin") for f in files)
    for component, (_, current_name) in COMPONENT_FILES.items():
        assert f"{component}/{current_name}" in files
    assert "tokenizer/tokenizer.json" in files
    index = read_json(tiny_current / "model_index.json")
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert index["requires_safety_checker"] is True
    sched = read_json(tiny_current / "scheduler/scheduler_config.json")
    for key, value in LEGACY_SCHEDULER.items():
        if not key.startswith("_") and key != "predict_epsilon":
            assert sched[key] == value, key
    assert sched["prediction_type"] == "epsilon"
    assert read_json(tiny_current / "vae/config.json")["scaling_factor"] == 0.18215


def test_legacy_layout_and_configs(tiny_legacy):
    assert files_of(tiny_legacy) == LEGACY_FILES  # so no safetensors, no tokenizer.json

    sched = read_json(tiny_legacy / "scheduler/scheduler_config.json")
    assert sched == LEGACY_SCHEDULER  # exact key set and values: no steps_offset, timestep_spacing, ...

    index = read_json(tiny_legacy / "model_index.json")
    assert index["_diffusers_version"] == "0.8.0.dev0"
    assert index["feature_extractor"] == ["transformers", "CLIPFeatureExtractor"]
    for name in ("unet", "vae"):
        assert read_json(tiny_legacy / name / "config.json")["_diffusers_version"] == "0.8.0.dev0"
    assert "scaling_factor" not in read_json(tiny_legacy / "vae/config.json")
    assert read_json(tiny_legacy / "text_encoder/config.json")["transformers_version"] == "4.25.1"
    safety = read_json(tiny_legacy / "safety_checker/config.json")
    assert safety["transformers_version"] == "4.25.1"
    assert safety["vision_config_dict"]["hidden_size"] == 32
    assert safety["vision_config_dict"]["patch_size"] == 32
    tok = read_json(tiny_legacy / "tokenizer/tokenizer_config.json")
    assert tok["model_max_length"] == 77 and tok["pad_token"] == "<|endoftext|>"
    vocab = read_json(tiny_legacy / "tokenizer/vocab.json")
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    fe = read_json(tiny_legacy / "feature_extractor/preprocessor_config.json")
    assert (fe["size"], fe["crop_size"], fe["resample"]) == (224, 224, 3)


def test_legacy_key_forms(tiny_legacy):
    vae = load_legacy(tiny_legacy, "vae")
    for part in ("encoder", "decoder"):
        prefix = f"{part}.mid_block.attentions.0."
        attn = sorted(k.removeprefix(prefix) for k in vae if k.startswith(prefix))
        assert attn == sorted(f"{n}.{p}" for n in ("group_norm", "query", "key", "value", "proj_attn")
                              for p in ("weight", "bias"))
        assert vae[prefix + "query.weight"].ndim == 2
    assert not any(".to_q." in k or ".to_out." in k for k in vae)

    text = load_legacy(tiny_legacy, "text_encoder")
    assert all(k.startswith("text_model.") for k in text)
    assert "text_model.final_layer_norm.weight" in text
    ids = text["text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])

    safety = load_legacy(tiny_legacy, "safety_checker")
    top = {"visual_projection.weight", "concept_embeds", "special_care_embeds",
           "concept_embeds_weights", "special_care_embeds_weights"}
    assert top <= safety.keys()
    vision = safety.keys() - top
    assert all(k.startswith("vision_model.vision_model.") for k in vision)
    parts = {k.split(".")[2] for k in vision}
    assert parts == {"embeddings", "pre_layrnorm", "encoder", "post_layernorm"}
    ids = safety["vision_model.vision_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange((224 // 32) ** 2 + 1)[None])
    assert safety["concept_embeds"].shape == (17, 16) and safety["special_care_embeds"].shape == (3, 16)
    assert safety["concept_embeds_weights"].shape == (17,)
    assert safety["special_care_embeds_weights"].shape == (3,)

    for component in COMPONENT_FILES:
        sd = load_legacy(tiny_legacy, component)
        assert all(t.dtype in (torch.float32, torch.int64) for t in sd.values())


@pytest.mark.parametrize("component", list(COMPONENT_FILES))
def test_legacy_holds_the_current_tensors(tiny_current, tiny_legacy, component):
    legacy, current = load_legacy(tiny_legacy, component), load_current(tiny_current, component)
    renamed = {unrename(component, k): t for k, t in legacy.items() if not k.endswith("position_ids")}
    assert renamed.keys() == current.keys()
    for key, t in current.items():
        assert torch.equal(renamed[key], t), key


def test_weights_are_random_everywhere(tiny_current):
    """No parameter left at a constant value by diffusers' default init (zeros, ones)."""
    for component in COMPONENT_FILES:
        for key, t in load_current(tiny_current, component).items():
            if t.numel() > 1:
                assert t.float().std() > 1e-3, f"{component}: {key} is constant"


def test_seed_and_overrides(make_tiny, tiny_current):
    """Same arguments give the same folder (cached); another seed or config gives other weights,
    and an override reaches both formats."""
    assert make_tiny("current") == tiny_current
    other = make_tiny("current", seed=1)
    a, b = load_current(tiny_current, "unet"), load_current(other, "unet")
    assert not torch.equal(a["conv_in.weight"], b["conv_in.weight"])

    legacy2 = make_tiny("legacy", unet={"layers_per_block": 2})
    assert read_json(legacy2 / "unet/config.json")["layers_per_block"] == 2
    assert "down_blocks.0.resnets.1.conv1.weight" in load_legacy(legacy2, "unet")
    # the other components do not depend on the UNet override
    assert torch.equal(load_legacy(legacy2, "vae")["decoder.conv_out.weight"],
                       load_current(tiny_current, "vae")["decoder.conv_out.weight"])
