"""small-sd's own config files (tests/data/small-sd/, see tests/data/README.md) against everything
else the repository says about small-sd:

  * the files are the published ones: same byte counts where the reconstruction is claimed exact;
  * diffusers' and transformers' models built from them (on the meta device: no memory, no
    weights) have the published parameter counts and exactly the tensors of
    tests/data/small-sd-tensors.tsv, once the old key names are mapped to today's;
  * minisd's config classes parsed from them equal the presets `small_sd()` (and `sd_v1()`
    differs only in layers_per_block), and minisd's modules built from them have the same
    tensors; minisd's tokenizer and image preprocessing read the settings SD v1 uses.

docs/checkpoint-facts.md explains the files, the key forms and the formats.
"""
import dataclasses
import functools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from minisd import config as mc
from minisd.checkpoint import is_ignorable, rename_legacy_keys

DATA = Path(__file__).parent / "data"
SMALL_SD = DATA / "small-sd"
INVENTORY = DATA / "small-sd-tensors.tsv"
CLIP_VOCAB = Path(__file__).parents[1] / "weights" / "clip"
MODELS = ("unet", "vae", "text_encoder", "safety_checker")

# Byte counts of small-sd's files on its main branch (Hugging Face file listing).
PUBLISHED_BYTES = {
    "model_index.json": 560,
    "unet/config.json": 748,
    "vae/config.json": 581,  # 552 as uploaded; its PR #5 added the 29-byte scaling_factor line
    "text_encoder/config.json": 560,
    "scheduler/scheduler_config.json": 459,
    "tokenizer/special_tokens_map.json": 472,
    "feature_extractor/preprocessor_config.json": 518,
}
# The two files that cannot be byte-exact (tests/data/README.md says why).
RECONSTRUCTED_BYTES = {
    "tokenizer/tokenizer_config.json": 755,  # published 836: plus a name_or_path entry (81 bytes)
    "safety_checker/config.json": 4795,  # published "4.8 kB": about 4,795 to 4,804 bytes
}

# What 4 bytes per float32 parameter (8 per int64 buffer) must round to: the published sizes
# of the weight files, as the file listing shows them (three significant figures).
PUBLISHED_WEIGHT_SIZES = {"unet": 2.32e9, "vae": 335e6, "text_encoder": 492e6, "safety_checker": 1.22e9}


def config(component: str) -> dict:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((SMALL_SD / component / name).read_text())


def inventory() -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """component -> {key: (shape, dtype)} as the real files hold them (legacy key names)."""
    out: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for line in INVENTORY.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        component, key, shape, dtype = line.split("\t")
        out.setdefault(component, {})[key] = (tuple(int(d) for d in shape.split("x")), dtype)
    return out


def current_names(component: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Today's names (minisd.checkpoint's legacy renames), without the tensors a loader may ignore."""
    renamed = rename_legacy_keys(component, {k: torch.empty(s, device="meta") for k, s in shapes.items()})
    return {k: tuple(v.shape) for k, v in renamed.items() if not is_ignorable(component, k)}


def inventory_parameters(component: str) -> int:
    return sum(math.prod(shape) for shape, dtype in inventory()[component].values() if dtype == "float32")


@functools.cache
def library_model(component: str) -> torch.nn.Module:
    """diffusers'/transformers' own model class, built from small-sd's config file on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel

    build = {
        "unet": lambda c: UNet2DConditionModel.from_config(c),
        "vae": lambda c: AutoencoderKL.from_config(c),
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c)),
        "safety_checker": lambda c: StableDiffusionSafetyChecker(CLIPConfig.from_dict(c)),
    }[component]
    with torch.device("meta"):
        return build(config(component))


def parsed(component: str):
    """minisd's config class for the component, parsed from small-sd's file."""
    cls = {"unet": mc.UNetConfig, "vae": mc.VAEConfig, "text_encoder": mc.CLIPTextConfig,
           "safety_checker": mc.SafetyCheckerConfig, "scheduler": mc.SchedulerConfig}[component]
    return cls.from_dict(config(component), where=f"tests/data/small-sd/{component}")


# --- the files ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [*PUBLISHED_BYTES, *RECONSTRUCTED_BYTES])
def test_files_have_the_documented_sizes(path):
    """Serialised as the libraries of the day did (sorted keys, 2-space indent, final newline):
    a reformatted or edited file no longer matches the published byte count."""
    data = (SMALL_SD / path).read_bytes()
    expected = {**PUBLISHED_BYTES, **RECONSTRUCTED_BYTES}[path]
    assert len(data) == expected
    assert data == (json.dumps(json.loads(data), indent=2, sort_keys=True) + "\n").encode()


def test_model_index_names_every_folder():
    index = json.loads((SMALL_SD / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["_diffusers_version"] == "0.8.0.dev0"
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    assert set(components) == {p.name for p in SMALL_SD.iterdir() if p.is_dir()}
    assert components["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert components["feature_extractor"] == ["transformers", "CLIPImageProcessor"]


def test_scheduler_config_keys_as_published():
    assert config("scheduler") == {
        "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.8.0.dev0",
        "algorithm_type": "dpmsolver++", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "dynamic_thresholding_ratio": 0.995, "lower_order_final": True,
        "num_train_timesteps": 1000, "predict_epsilon": True, "sample_max_value": 1.0,
        "solver_order": 2, "solver_type": "midpoint", "thresholding": False, "trained_betas": None}


def test_inventory_header_states_its_own_counts():
    header = "\n".join(line for line in INVENTORY.read_text().splitlines() if line.startswith("#"))
    for component in MODELS:
        assert f"{component} {inventory_parameters(component):,}" in header


@pytest.mark.parametrize("component", MODELS)
def test_inventory_reproduces_published_file_sizes(component):
    size = sum(math.prod(shape) * (4 if dtype == "float32" else 8)
               for shape, dtype in inventory()[component].values())
    published = PUBLISHED_WEIGHT_SIZES[component]
    assert float(f"{size:.3g}") == published


# --- (a) the libraries' models built from the files ------------------------------------------

@pytest.mark.parametrize("component", MODELS)
def test_library_model_has_published_parameter_count(component):
    count = sum(p.numel() for p in library_model(component).parameters())
    assert count == inventory_parameters(component)
    if component == "unet":
        assert count == 579_384_964


@pytest.mark.parametrize("component", MODELS)
def test_library_model_has_exactly_the_inventory_tensors(component):
    model_state = {k: tuple(v.shape) for k, v in library_model(component).state_dict().items()}
    published = {k: shape for k, (shape, _) in inventory()[component].items()}
    assert current_names(component, model_state) == current_names(component, published)


def test_library_models_read_the_old_key_forms():
    """The safety checker's settings live in vision_config_dict in this old CLIPConfig layout;
    transformers must land on ViT-L/14 either way."""
    vision = library_model("safety_checker").config.vision_config
    settings = (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size)
    assert settings == (1024, 24, 16, 14)
    assert library_model("unet").config.layers_per_block == 1


# --- (b) minisd's configs parsed from the files ---------------------------------------------

@pytest.mark.parametrize("component", [*MODELS, "scheduler"])
def test_minisd_config_equals_small_sd_preset(component):
    assert parsed(component) == mc.small_sd()[component]


def test_sd_v1_preset_differs_only_in_layers_per_block():
    small, v1 = mc.small_sd(), mc.sd_v1()
    assert set(v1) == set(small)
    assert {c for c in small if v1[c] != small[c]} == {"unet"}
    assert v1["unet"] == dataclasses.replace(parsed("unet"), layers_per_block=2)


def test_scheduler_settings_minisd_reads():
    s = parsed("scheduler")
    solver = (s.prediction_type, s.algorithm_type, s.solver_order, s.solver_type)
    assert solver == ("epsilon", "dpmsolver++", 2, "midpoint")
    assert (s.beta_schedule, s.beta_start, s.beta_end) == ("scaled_linear", 0.00085, 0.012)
    # no steps_offset / timestep_spacing / final_sigmas_type in the file: today's defaults apply
    assert (s.steps_offset, s.timestep_spacing, s.final_sigmas_type) == (0, "linspace", "zero")


# --- (c) minisd's modules built from the parsed configs -------------------------------------

def minisd_model(component: str) -> torch.nn.Module:
    from minisd.clip import CLIPTextModel
    from minisd.safety import SafetyChecker
    from minisd.unet import UNet2DConditionModel
    from minisd.vae import AutoencoderKL

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
           "safety_checker": SafetyChecker}[component]
    with torch.device("meta"):
        return cls(parsed(component))


@pytest.mark.parametrize("component", MODELS)
def test_minisd_model_matches_the_files(component):
    model = minisd_model(component)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # counted over the state dict: minisd keeps the checker's fixed concept embeddings as buffers
    assert sum(math.prod(s) for s in state.values()) == inventory_parameters(component)
    published = {k: shape for k, (shape, _) in inventory()[component].items()}
    assert state == current_names(component, published)


def test_minisd_tokenizer_reads_the_published_settings(tmp_path):
    from minisd.tokenizer import CLIPTokenizer

    folder = tmp_path / "tokenizer"  # the published configs + the CLIP vocabulary kept at weights/clip
    shutil.copytree(SMALL_SD / "tokenizer", folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(CLIP_VOCAB / name, folder / name)
    tok = CLIPTokenizer.from_folder(folder)
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    ids = tok("A photo of an astronaut")[0].tolist()
    assert ids[:7] == [49406, 320, 1125, 539, 550, 18376, 49407] and set(ids[7:]) == {49407}


def test_minisd_preprocessing_reads_the_published_settings():
    from minisd.safety import CLIPPreprocess

    pre = CLIPPreprocess.from_folder(SMALL_SD)
    assert pre == CLIPPreprocess()  # SD v1's CLIP preprocessing, minisd's defaults
    assert (pre.shortest_edge, pre.crop, pre.resample) == (224, (224, 224), 3)
