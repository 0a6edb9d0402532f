"""Write tiny, seeded, random Stable Diffusion v1 pipelines in the diffusers folder layout.

No machine here can download the real checkpoint, so tests run minisd and diffusers/transformers
side by side on small random pipelines instead. Each pipeline is written in one of two formats,
with identical weights for the same seed:

  current  what `StableDiffusionPipeline.save_pretrained` writes today: `*.safetensors`,
           current key names, `tokenizer.json`, today's configs.
  legacy   the shape of the real small-stable-diffusion-v0 folder (saved in 2023 by diffusers
           0.8.0.dev0 / transformers 4.25): fp32 `.bin` pickles of plain state dicts, the old
           VAE attention names (`query/key/value/proj_attn`), the `text_model.` prefix and an
           int64 `position_ids` buffer in the text encoder, `vision_model.vision_model.` in the
           safety checker, the exact old `scheduler_config.json` (with `predict_epsilon`),
           `vocab.json` + `merges.txt` tokenizer files and era-looking configs.
           See docs/checkpoint-facts.md for the facts this reproduces.

Every parameter is re-drawn from a seeded normal distribution after construction (diffusers
zero-initialises some output layers, which would make parity tests pass for the wrong reason).

    python tools/make_tiny_checkpoint.py /tmp/tiny --format both --seed 0
    python tools/make_tiny_checkpoint.py --check          # print activation scales, write nothing

From tests (setup.cfg's [tool:pytest] puts tools/ on sys.path):

    import make_tiny_checkpoint as mtc
    path = mtc.make_pipeline(tmp / "sd", fmt="legacy", seed=1, unet={"layers_per_block": 2})
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import shutil
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CLIP_VOCAB_DIR = ROOT / "weights" / "clip"  # the real 49,408-token CLIP BPE (vocab.json, merges.txt)

FORMATS = ("current", "legacy")
LEGACY_DIFFUSERS_VERSION = "0.8.0.dev0"
LEGACY_TRANSFORMERS_VERSION = "4.25.1"

# --------------------------------------------------------------------------------------------
# Tiny configs. Same structure as small-sd (one layer per UNet block, 4 VAE blocks so latents
# are 1/8 of the image), every width shrunk. Override any field through the dict arguments.
# --------------------------------------------------------------------------------------------

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,  # diffusers: really the number of heads
    norm_num_groups=8,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)

TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)

# Vision tower of the safety checker, plus `projection_dim` (the CLIPConfig field that sizes
# `visual_projection` and the concept embeddings).
TINY_SAFETY = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=32,
    projection_dim=16,
)

# The scheduler small-sd ships, key for key (legacy scheduler/scheduler_config.json).
LEGACY_SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": LEGACY_DIFFUSERS_VERSION,
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "dynamic_thresholding_ratio": 0.995,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_epsilon": True,  # deprecated spelling of prediction_type="epsilon"
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "thresholding": False,
    "trained_betas": None,
}

# The small-sd CLIP image preprocessing.
FEATURE_EXTRACTOR = dict(
    do_resize=True,
    size={"shortest_edge": 224},
    resample=3,  # PIL bicubic
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
    do_convert_rgb=True,
)

# The config.json keys diffusers 0.8 wrote for these two models (its __init__ arguments then).
LEGACY_UNET_KEYS = (
    "act_fn", "attention_head_dim", "block_out_channels", "center_input_sample",
    "cross_attention_dim", "down_block_types", "downsample_padding", "flip_sin_to_cos",
    "freq_shift", "in_channels", "layers_per_block", "mid_block_scale_factor", "norm_eps",
    "norm_num_groups", "out_channels", "sample_size", "up_block_types",
)
LEGACY_VAE_KEYS = (  # no scaling_factor: it did not exist yet (0.18215 was hard-coded)
    "act_fn", "block_out_channels", "down_block_types", "in_channels", "latent_channels",
    "layers_per_block", "norm_num_groups", "out_channels", "sample_size", "up_block_types",
)


# Overrides of the tiny configs that give small-sd's full shapes
# (docs/checkpoint-facts.md, "Configs").
SMALL_SD = {
    "unet": dict(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                norm_num_groups=32, sample_size=512),
    "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                         num_hidden_layers=12),  # vocab 49408, 77 positions, quick_gelu: as tiny
    "safety_checker": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                           num_hidden_layers=24, patch_size=14, image_size=224, projection_dim=768),
}


def tiny_unet_config(**overrides) -> dict:
    return {**TINY_UNET, **overrides}


def tiny_vae_config(**overrides) -> dict:
    return {**TINY_VAE, **overrides}


def tiny_text_config(**overrides) -> dict:
    return {**TINY_TEXT, **overrides}


def tiny_safety_config(**overrides) -> dict:
    return {**TINY_SAFETY, **overrides}


# --------------------------------------------------------------------------------------------
# Building and randomising the models
# --------------------------------------------------------------------------------------------

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def randomize_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every parameter from a seeded normal distribution, in module order.

    Scales keep activations O(1) through the random network: weights ~ N(0, 1/fan_in),
    norm scales ~ 1 + N(0, 0.1), biases and norm shifts small, embeddings N(0, 0.2).
    Buffers (e.g. position ids) are left alone.
    """
    def normal(p, std, mean=0.0):
        p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std + mean)

    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, NORM_TYPES):
                if name == "weight":
                    normal(p, 0.1, mean=1.0)
                else:
                    normal(p, 0.05)
            elif isinstance(module, nn.Embedding) or name == "class_embedding":
                normal(p, 0.2)
            elif name in ("concept_embeds", "special_care_embeds"):
                normal(p, 1.0)  # only their direction matters (cosine similarity)
            elif name in ("concept_embeds_weights", "special_care_embeds_weights"):
                # Per-concept thresholds on the cosine score. diffusers initialises these to 1
                # (never flags); the real ones are ~0.2, for cosines in 768-d. Random cosines in
                # 16-d spread far wider (std 0.25), so the defaults sit at 0.85..0.95 where
                # images pass; tests that want a flag lower them deliberately.
                p.copy_(0.85 + 0.1 * torch.rand(p.shape, generator=generator))
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                normal(p, 1.0 / math.sqrt(fan_in))
            else:
                normal(p, 0.02)  # biases
    return model


def build_components(seed: int = 0, unet: dict | None = None, vae: dict | None = None,
                     text_encoder: dict | None = None, safety_checker: dict | None = None) -> dict:
    """Construct the seven pipeline components with seeded random weights.

    Each model draws from its own generator (seed, index), so overriding one model's config does
    not change the weights of the others. The global torch RNG is left untouched.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def gen(index):
        return torch.Generator().manual_seed(seed * 1009 + index)

    text_cfg = tiny_text_config(**(text_encoder or {}))
    safety_cfg = tiny_safety_config(**(safety_checker or {}))
    projection_dim = safety_cfg.pop("projection_dim")
    with torch.random.fork_rng(devices=[]):  # default inits draw from the global RNG
        models = dict(
            unet=UNet2DConditionModel(**tiny_unet_config(**(unet or {}))),
            vae=AutoencoderKL(**tiny_vae_config(**(vae or {}))),
            text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
            safety_checker=StableDiffusionSafetyChecker(
                CLIPConfig(text_config=text_cfg, vision_config=safety_cfg, projection_dim=projection_dim)),
        )
    for index, model in enumerate(models.values()):
        randomize_(model, gen(index)).eval()

    # The pipeline patches a scheduler with steps_offset != 1 (and warns); pass 1 up front.
    # It changes nothing for the linspace spacing used here.
    settings = {k: v for k, v in LEGACY_SCHEDULER_CONFIG.items()
                if not k.startswith("_") and k != "predict_epsilon"}
    scheduler = DPMSolverMultistepScheduler(**settings, prediction_type="epsilon", steps_offset=1)
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_VOCAB_DIR, model_max_length=77, pad_token="<|endoftext|>")
    feature_extractor = CLIPImageProcessor(**FEATURE_EXTRACTOR)
    return dict(models, scheduler=scheduler, tokenizer=tokenizer, feature_extractor=feature_extractor)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_current(components: dict, out_dir: Path) -> Path:
    """Save through today's StableDiffusionPipeline.save_pretrained."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components, requires_safety_checker=True)
    pipe.save_pretrained(out_dir)
    # Without torchvision, transformers 5 builds its PIL fallback CLIPImageProcessorPil and
    # model_index.json would name that class; a normal install names CLIPImageProcessor.
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    _write_json(index_path, index)
    return out_dir


def legacy_vae_state_dict(sd: dict) -> dict:
    """diffusers < 0.14 named the VAE mid-block attention query/key/value/proj_attn (same 2-D shapes)."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, t in sd.items():
        if ".mid_block.attentions." in key:
            for new, legacy in old.items():
                key = key.replace(f".{new}.", f".{legacy}.")
        out[key] = t
    return out


def legacy_text_state_dict(sd: dict, num_positions: int) -> dict:
    """transformers 4.x: CLIPTextModel wrapped a `text_model` and saved its position_ids buffer."""
    out = {"text_model.embeddings.position_ids": torch.arange(num_positions, dtype=torch.int64)[None]}
    out.update({key if key.startswith("text_model.") else f"text_model.{key}": t for key, t in sd.items()})
    return out


def legacy_safety_state_dict(sd: dict, num_positions: int) -> dict:
    """transformers 4.x: the checker's CLIPVisionModel wrapped a `vision_model` of its own, hence
    `vision_model.vision_model.`, and saved its position_ids buffer."""
    out = {}
    for key, t in sd.items():
        if key.startswith("vision_model.") and not key.startswith("vision_model.vision_model."):
            key = "vision_model." + key
        out[key] = t
    out["vision_model.vision_model.embeddings.position_ids"] = torch.arange(num_positions, dtype=torch.int64)[None]
    return out


def write_legacy(components: dict, out_dir: Path) -> Path:
    """Write the small-sd folder shape by hand: .bin pickles, old names, old configs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    unet, vae, text, safety = (components[k] for k in ("unet", "vae", "text_encoder", "safety_checker"))

    _write_json(out_dir / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": LEGACY_DIFFUSERS_VERSION,
        "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })

    # unet / vae: diffusers-0.8 configs. A setting 0.8 did not know is written too when it is
    # not today's default (a caller's override), so the folder still describes its model.
    for name, model, legacy_keys in (("unet", unet, LEGACY_UNET_KEYS), ("vae", vae, LEGACY_VAE_KEYS)):
        defaults = {k: v.default for k, v in inspect.signature(type(model).__init__).parameters.items()}
        cfg = {k: _jsonable(v) for k, v in model.config.items() if not k.startswith("_")}
        keep = [k for k in sorted(cfg) if k in legacy_keys or _jsonable(defaults.get(k)) != cfg[k]]
        if name == "vae":
            keep = [k for k in keep if k != "scaling_factor" or cfg[k] != 0.18215]
        config = {"_class_name": type(model).__name__, "_diffusers_version": LEGACY_DIFFUSERS_VERSION}
        config.update({k: cfg[k] for k in keep})
        _write_json(out_dir / name / "config.json", config)
    sd = _plain(unet.state_dict())
    torch.save(sd, out_dir / "unet" / "diffusion_pytorch_model.bin")
    torch.save(legacy_vae_state_dict(_plain(vae.state_dict())), out_dir / "vae" / "diffusion_pytorch_model.bin")

    # text encoder
    tc = text.config
    _write_json(out_dir / "text_encoder" / "config.json", {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": tc.attention_dropout,
        # transformers 4.2x CLIPTextConfig defaults, as saved in SD v1 folders (not the CLIP ids;
        # only the pooled output reads eos_token_id, and SD uses last_hidden_state).
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": tc.hidden_act,
        "hidden_size": tc.hidden_size,
        "initializer_factor": tc.initializer_factor,
        "initializer_range": tc.initializer_range,
        "intermediate_size": tc.intermediate_size,
        "layer_norm_eps": tc.layer_norm_eps,
        "max_position_embeddings": tc.max_position_embeddings,
        "model_type": "clip_text_model",
        "num_attention_heads": tc.num_attention_heads,
        "num_hidden_layers": tc.num_hidden_layers,
        "pad_token_id": 1,
        "projection_dim": tc.projection_dim,
        "torch_dtype": "float32",
        "transformers_version": LEGACY_TRANSFORMERS_VERSION,
        "vocab_size": tc.vocab_size,
    })
    torch.save(legacy_text_state_dict(_plain(text.state_dict()), tc.max_position_embeddings),
               out_dir / "text_encoder" / "pytorch_model.bin")

    # safety checker: transformers 4.2x CLIPConfig json. The overrides live in
    # `*_config_dict`; `*_config` hold the full sub-config (every PretrainedConfig field).
    vc, stc = safety.config.vision_config, safety.config.text_config
    vision_overrides = {k: getattr(vc, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                    "num_hidden_layers", "patch_size", "image_size")}
    text_overrides = {k: getattr(stc, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_hidden_layers")}
    _write_json(out_dir / "safety_checker" / "config.json", {
        "architectures": ["StableDiffusionSafetyChecker"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": safety.config.projection_dim,
        "text_config": _legacy_sub_config(stc, "clip_text_model", bos_token_id=0, eos_token_id=2, pad_token_id=1),
        "text_config_dict": text_overrides,
        "torch_dtype": "float32",
        "transformers_version": LEGACY_TRANSFORMERS_VERSION,
        "vision_config": _legacy_sub_config(vc, "clip_vision_model"),
        "vision_config_dict": vision_overrides,
    })
    num_patches = (vc.image_size // vc.patch_size) ** 2
    torch.save(legacy_safety_state_dict(_plain(safety.state_dict()), num_patches + 1),
               out_dir / "safety_checker" / "pytorch_model.bin")

    _write_json(out_dir / "scheduler" / "scheduler_config.json", LEGACY_SCHEDULER_CONFIG)

    # tokenizer: the slow-tokenizer files only (no tokenizer.json), transformers 4.2x configs.
    tok_dir = out_dir / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(CLIP_VOCAB_DIR / f, tok_dir / f)
    token = lambda s: {"content": s, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    added = lambda s: {"__type": "AddedToken", **token(s)}
    _write_json(tok_dir / "special_tokens_map.json", {
        "bos_token": token("<|startoftext|>"),
        "eos_token": token("<|endoftext|>"),
        "pad_token": "<|endoftext|>",
        "unk_token": token("<|endoftext|>"),
    })
    _write_json(tok_dir / "tokenizer_config.json", {
        "add_prefix_space": False,
        "bos_token": added("<|startoftext|>"),
        "do_lower_case": True,
        "eos_token": added("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>"),
    })

    # feature extractor: pre-image-processor form (`size`/`crop_size` as plain ints, no rescale
    # keys: rescaling by 1/255 was implicit).
    fe = FEATURE_EXTRACTOR
    _write_json(out_dir / "feature_extractor" / "preprocessor_config.json", {
        "crop_size": fe["crop_size"]["height"],
        "do_center_crop": fe["do_center_crop"],
        "do_convert_rgb": fe["do_convert_rgb"],
        "do_normalize": fe["do_normalize"],
        "do_resize": fe["do_resize"],
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": fe["image_mean"],
        "image_std": fe["image_std"],
        "resample": fe["resample"],
        "size": fe["size"]["shortest_edge"],
    })
    return out_dir


def make_pipeline(out_dir, fmt: str = "current", seed: int = 0, unet: dict | None = None,
                  vae: dict | None = None, text_encoder: dict | None = None,
                  safety_checker: dict | None = None) -> Path:
    """Build a tiny random pipeline and write it to `out_dir` in format `fmt`; return the path.
    The dicts override fields of the tiny configs (TINY_UNET, TINY_VAE, TINY_TEXT, TINY_SAFETY)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    components = build_components(seed, unet=unet, vae=vae, text_encoder=text_encoder,
                                  safety_checker=safety_checker)
    return WRITERS[fmt](components, Path(out_dir))


def make_pipelines(out_dir, seed: int = 0, **overrides) -> dict[str, Path]:
    """Build once, write every format: {"current": out_dir/current, "legacy": out_dir/legacy}."""
    components = build_components(seed, **overrides)
    return {fmt: WRITERS[fmt](components, Path(out_dir) / fmt) for fmt in FORMATS}


WRITERS = {"current": write_current, "legacy": write_legacy}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

# Fields every transformers 4.25 PretrainedConfig.to_dict() wrote into a nested sub-config.
_LEGACY_PRETRAINED_FIELDS = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
    "begin_suppress_tokens": None, "bos_token_id": None, "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None, "decoder_start_token_id": None, "diversity_penalty": 0.0,
    "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "eos_token_id": None, "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False, "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0, "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0,
    "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1, "output_attentions": False,
    "output_hidden_states": False, "output_scores": False, "pad_token_id": None, "prefix": None,
    "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
    "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None,
    "torchscript": False, "transformers_version": LEGACY_TRANSFORMERS_VERSION, "typical_p": 1.0,
    "use_bfloat16": False,
}
_CLIP_SUB_FIELDS = ("attention_dropout", "hidden_act", "hidden_size", "image_size", "initializer_factor",
                    "initializer_range", "intermediate_size", "layer_norm_eps", "max_position_embeddings",
                    "num_attention_heads", "num_channels", "num_hidden_layers", "patch_size",
                    "projection_dim", "vocab_size")


def _legacy_sub_config(cfg, model_type: str, **token_ids) -> dict:
    out = dict(_LEGACY_PRETRAINED_FIELDS, dropout=0.0, model_type=model_type, **token_ids)
    out.update({k: getattr(cfg, k) for k in _CLIP_SUB_FIELDS if hasattr(cfg, k)})
    return dict(sorted(out.items()))


def _plain(sd: dict) -> dict:
    """A state dict of independent contiguous fp32 tensors (what torch.save pickled then)."""
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


@torch.no_grad()
def check(seed: int = 0) -> None:
    """Print output scales of each random model: none may be constant or blow up."""
    c = build_components(seed)
    g = torch.Generator().manual_seed(seed)
    ids = c["tokenizer"](["a photo of a cat", ""], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    context = c["text_encoder"](ids).last_hidden_state
    latents = torch.randn(2, 4, 8, 8, generator=g)
    eps = c["unet"](latents, 999, encoder_hidden_states=context).sample
    image = c["vae"].decode(latents / c["vae"].config.scaling_factor).sample
    clip_in = torch.randn(2, 3, 224, 224, generator=g)
    sc = c["safety_checker"]
    emb = sc.visual_projection(sc.vision_model(clip_in)[1])
    cos = nn.functional.normalize(emb, dim=-1) @ nn.functional.normalize(sc.concept_embeds, dim=-1).T
    print(f"text encoder  std {context.std():.3f}  (cond vs uncond differ by {(context[0] - context[1]).abs().max():.3f})")
    print(f"unet eps      std {eps.std():.3f}  mean {eps.mean():+.3f}")
    print(f"vae decode    std {image.std():.3f}  mean {image.mean():+.3f}  shape {tuple(image.shape)}")
    print(f"safety cos    max {cos.max():.3f}  vs thresholds min {sc.concept_embeds_weights.min():.3f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", type=Path)
    p.add_argument("--format", choices=[*FORMATS, "both"], default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="print activation scales of the random models")
    args = p.parse_args(argv)
    if args.check:
        check(args.seed)
        if args.out_dir is None:
            return
    if args.out_dir is None:
        p.error("out_dir is required (unless --check)")
    if args.format == "both":
        for path in make_pipelines(args.out_dir, args.seed).values():
            print(path)
    else:
        print(make_pipeline(args.out_dir, args.format, args.seed))


if __name__ == "__main__":
    main()
