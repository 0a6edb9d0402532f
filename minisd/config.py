"""Typed, frozen configs for each component, read from the checkpoint's json files.

Each dataclass holds the keys minisd's code reads, with diffusers'/transformers' defaults (not
small-sd's: an old config that omits a key meant the library default of its day), and
`from_dict` is the one way in from json: every value type-checked, every key minisd does not
implement refused unless it holds the one value minisd runs (`NOT_IMPLEMENTED`), the keys that
cannot change the image ignored on purpose (`IGNORED`), unknown keys ignored.

Presets, with the json files they mirror:

    small_sd()       OFA-Sys/small-stable-diffusion-v0   tests/data/small-sd/*/config.json
    sd_v1()          CompVis SD v1-4 / v1-5              small-sd with layers_per_block=2
    minisd_shapes()  the embedded model                  weights/minisd-shapes/*/config.json

Tests shrink them with `dataclasses.replace`. `read_json` is the one reader of every json file
a model folder holds (configs, model_index.json, vocabularies, shard indexes).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import CheckpointError


def read_json(path: Path, optional: bool = False) -> dict[str, Any]:
    """A json file holding an object, as a dict; {} for a missing optional file."""
    if optional and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupt or truncated, "
                              "download it again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# Integer fields that may be 0; every other integer (channels, layers, heads, sizes) must be >= 1.
NON_NEGATIVE = {"freq_shift", "steps_offset", "downsample_padding"}


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _matches(value: Any, annotation: str) -> bool:
    """Does a json value fit a field annotation such as `int | tuple[int, ...] | None`?"""
    for option in (o.strip() for o in annotation.split("|")):
        if option == "None" and value is None:
            return True
        if option == "bool" and isinstance(value, bool):
            return True
        if option in ("int", "float") and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option == "float" and isinstance(value, float) and math.isfinite(value):
            return True
        if option == "str" and isinstance(value, str):
            return True
        if option.startswith("tuple[") and isinstance(value, tuple) and value:
            if all(_matches(v, option[len("tuple["):].split(",")[0]) for v in value):
                return True
    return False


def _check_value(key: str, value: Any, annotation: str, where: str) -> Any:
    if not _matches(value, annotation):
        raise CheckpointError(f"{where}: {key}={value!r:.80} is not a valid {annotation}")
    ints = [v for v in (value if isinstance(value, tuple) else (value,)) if type(v) is int]
    if any(v < (0 if key in NON_NEGATIVE else 1) for v in ints) and "float" not in annotation:
        raise CheckpointError(f"{where}: {key}={value!r} must be {'>= 0' if key in NON_NEGATIVE else 'positive'}")
    return float(value) if annotation == "float" else value


def _is_default(value: Any, default: Any) -> bool:
    """json null counts as the default where the default is off; a list of defaults (per-block
    settings) as the default itself."""
    if value is None:
        return default in (None, False)
    if isinstance(value, list):
        return bool(value) and all(_is_default(v, default) for v in value)
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default  # True is not 1 here
    return value == default


@dataclass(frozen=True)
class _Config:
    # key -> the only value minisd implements (the library default, which SD v1 uses).
    NOT_IMPLEMENTED: ClassVar[dict[str, Any]] = {}
    # keys that change nothing minisd computes, with why (documentation; never read).
    IGNORED: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json"):
        """Keep the keys minisd uses, each checked against its field's type (a malformed
        config fails here, naming the key, not deep inside torch)."""
        unsupported = [f"{key}={raw[key]!r:.60} (minisd implements only {default!r})"
                       for key, default in cls.NOT_IMPLEMENTED.items()
                       if key in raw and not _is_default(raw[key], default)]
        if unsupported:
            raise CheckpointError(f"{where}: not supported by minisd: " + "; ".join(unsupported))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            field_ = fields.get(key)
            if field_ is not None and value is not None:
                values[key] = _check_value(key, _as_tuple(value), str(field_.type), where)
        config = cls(**values)
        config.validate(where)
        return config

    def validate(self, where: str) -> None:
        pass


@dataclass(frozen=True)
class UNetConfig(_Config):
    """diffusers `UNet2DConditionModel`, SD v1's block types. Defaults: diffusers' (SD v1-4's)."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64  # latent size of the default image, which is 8x larger
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2  # resnets per down block; up blocks have one more
    # Quirk: diffusers' `attention_head_dim` is really the number of heads (SD v1: 8 heads,
    # so 40..160 channels per head). An int applies to every block, a list is per down block.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None  # newer name; wins when given
    cross_attention_dim: int = 1280  # width of the text context (CLIP ViT-L: 768)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True  # timestep embedding as [cos, sin], not [sin, cos]
    freq_shift: int = 0
    downsample_padding: int = 1
    # Which levels attend to the text: CrossAttn* blocks do, plain ones do not.
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

    NOT_IMPLEMENTED: ClassVar[dict[str, Any]] = {
        "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_scale_factor": 1.0, "act_fn": "silu",
        "center_input_sample": False, "use_linear_projection": False,  # SD 2 projects with linears
        "only_cross_attention": False, "dual_cross_attention": False, "upcast_attention": False,
        "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None,
        "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
        "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
        "projection_class_embeddings_input_dim": None, "addition_embed_type": None,  # SDXL's extra inputs
        "addition_time_embed_dim": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "attention_type": "default", "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    }
    IGNORED: ClassVar[dict[str, str]] = {
        "dropout": "training only", "addition_embed_type_num_heads": "read only with addition_embed_type"}

    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads or self.attention_head_dim
        n = len(self.block_out_channels)
        return heads if isinstance(heads, tuple) else (heads,) * n

    def validate(self, where: str) -> None:
        n = len(self.block_out_channels)
        for key, allowed in (("down_block_types", {"CrossAttnDownBlock2D", "DownBlock2D"}),
                             ("up_block_types", {"CrossAttnUpBlock2D", "UpBlock2D"})):
            other = sorted(set(getattr(self, key)) - allowed)
            if other:
                raise CheckpointError(f"{where}: {key} {other} not supported by minisd "
                                      f"(SD v1 uses {' and '.join(sorted(allowed))})")
        if len(self.down_block_types) != n or len(self.up_block_types) != n or len(self.heads_per_block()) != n:
            raise CheckpointError(f"{where}: down_block_types, up_block_types and attention heads "
                                  f"need one entry per block_out_channels ({n})")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise CheckpointError(f"{where}: block_out_channels {c} not divisible by norm_num_groups {self.norm_num_groups}")


@dataclass(frozen=True)
class VAEConfig(_Config):
    """diffusers `AutoencoderKL`. Defaults: diffusers'."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)  # one down (and up) block each; all but the last halve
    layers_per_block: int = 1  # encoder resnets per block; the decoder has one more
    norm_num_groups: int = 32
    # Quirk: latents are scaled to unit variance by this constant, measured once on
    # SD's training set. Old configs (small-sd's) omit it: 0.18215 is what they meant.
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True

    NOT_IMPLEMENTED: ClassVar[dict[str, Any]] = {
        "down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D",  # every block's kind
        "act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
        "use_quant_conv": True, "use_post_quant_conv": True}
    IGNORED: ClassVar[dict[str, str]] = {
        "sample_size": "diffusers reads it only to tile images larger than it",
        "force_upcast": "a dtype hint to SDXL pipelines; minisd's dtype is the caller's choice"}

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class CLIPTransformerConfig(_Config):
    """The pre-norm transformer both CLIP towers are made of. Defaults: transformers' text tower."""

    hidden_size: int = 512  # token width (ViT-L/14: 768 text, 1024 vision)
    intermediate_size: int = 2048  # MLP width, 4x the token width
    num_hidden_layers: int = 12
    num_attention_heads: int = 8  # head width = hidden_size / heads = 64 in every CLIP
    hidden_act: str = "quick_gelu"  # or "gelu"
    layer_norm_eps: float = 1e-5

    IGNORED: ClassVar[dict[str, str]] = {
        "dropout": "training only", "attention_dropout": "training only",
        "projection_dim": "sizes CLIP's text projection, which SD does not use",
        "bos_token_id": "the tokenizer's folder says which ids are special",
        "eos_token_id": "read only by the pooled output, which SD does not use",
        "pad_token_id": "the tokenizer pads", "initializer_range": "training only",
        "initializer_factor": "training only"}

    def validate(self, where: str) -> None:
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"{where}: hidden_act={self.hidden_act!r} is not supported by minisd "
                                  "(quick_gelu, gelu)")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"{where}: hidden_size {self.hidden_size} not divisible by "
                                  f"num_attention_heads {self.num_attention_heads}")


@dataclass(frozen=True)
class CLIPTextConfig(CLIPTransformerConfig):
    """transformers `CLIPTextConfig` (SD v1 uses OpenAI's ViT-L/14 text tower)."""

    vocab_size: int = 49408  # CLIP's BPE: 256 bytes, 48,894 merges, 256 byte+</w>, 2 specials
    max_position_embeddings: int = 77  # 75 tokens between <|startoftext|> and <|endoftext|>


@dataclass(frozen=True)
class CLIPVisionConfig(CLIPTransformerConfig):
    """transformers `CLIPVisionConfig` (the safety checker uses ViT-L/14). Defaults: transformers'."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_channels: int = 3  # RGB
    image_size: int = 224  # the preprocessed image is image_size x image_size
    patch_size: int = 32  # ViT-L/14: 14, so 16 x 16 patches + a class token = 257 positions


@dataclass(frozen=True)
class SafetyCheckerConfig(_Config):
    """diffusers `StableDiffusionSafetyChecker`: a CLIPConfig of which only the vision half is used."""

    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json"):
        # Configs written before transformers 4.24 keep the user's overrides in
        # `vision_config_dict` and a full default dump in `vision_config`; prefer the former.
        vision = raw.get("vision_config_dict") or raw.get("vision_config") or {}
        if not isinstance(vision, dict):
            raise CheckpointError(f"{where}: vision_config must be an object, got {vision!r:.80}")
        projection = _check_value("projection_dim", raw.get("projection_dim", 512), "int", where)
        return cls(CLIPVisionConfig.from_dict(vision, where), projection)


@dataclass(frozen=True)
class SchedulerConfig(_Config):
    """diffusers `DPMSolverMultistepScheduler` options a SD v1 config can carry. Defaults: diffusers'."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    # Not a scheduler option: the `_class_name` the checkpoint named, so callers can say
    # when minisd runs DPM-Solver++ on another scheduler's betas.
    class_name: str = "DPMSolverMultistepScheduler"

    NOT_IMPLEMENTED: ClassVar[dict[str, Any]] = {
        "thresholding": False, "euler_at_final": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
        "lambda_min_clipped": -math.inf, "variance_type": None, "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False}
    IGNORED: ClassVar[dict[str, str]] = {
        "dynamic_thresholding_ratio": "read only with thresholding", "sample_max_value": "read only with thresholding",
        "predict_epsilon": "diffusers < 0.10's spelling of prediction_type, translated by from_dict",
        "flow_shift": "read only with use_flow_sigmas", "time_shift_type": "read only with use_dynamic_shifting"}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "scheduler_config.json"):
        raw = dict(raw)
        # diffusers < 0.10 wrote `predict_epsilon: true/false` instead of `prediction_type`.
        if "prediction_type" not in raw and "predict_epsilon" in raw:
            raw["prediction_type"] = "epsilon" if raw["predict_epsilon"] else "sample"
        raw["class_name"] = raw.get("_class_name", cls.class_name)
        return super().from_dict(raw, where)

    def validate(self, where: str) -> None:
        allowed = {
            "beta_schedule": ("linear", "scaled_linear"),
            "prediction_type": ("epsilon", "v_prediction"),
            "algorithm_type": ("dpmsolver++",),  # the deterministic DPM-Solver++
            "solver_type": ("midpoint", "heun"),
            "final_sigmas_type": ("zero", "sigma_min"),
            "timestep_spacing": ("linspace", "leading", "trailing"),
            "solver_order": (1, 2, 3),
        }
        for key, ok in allowed.items():
            if getattr(self, key) not in ok:
                raise CheckpointError(f"{where}: {key}={getattr(self, key)!r} is not supported "
                                      f"(minisd supports {', '.join(map(str, ok))})")
        # Each beta is the variance of one noising step: outside (0, 1) the schedule's
        # sigmas turn to 0, inf or NaN and every image comes out NaN.
        betas = ({f"trained_betas[{i}]": b for i, b in enumerate(self.trained_betas)} if self.trained_betas
                 else {"beta_start": self.beta_start, "beta_end": self.beta_end})
        bad = [f"{key}={b}" for key, b in betas.items() if not 0 < b < 1]
        if bad:
            raise CheckpointError(f"{where}: {', '.join(bad[:3])}: every beta must lie strictly between 0 and 1")
        if self.trained_betas and len(self.trained_betas) != self.num_train_timesteps:
            raise CheckpointError(f"{where}: {len(self.trained_betas)} trained_betas but "
                                  f"num_train_timesteps={self.num_train_timesteps}")
        # "leading" spacing adds steps_offset to timesteps up to T/2 even for one step.
        if self.steps_offset >= (self.num_train_timesteps + 1) // 2:
            raise CheckpointError(f"{where}: steps_offset={self.steps_offset} must be less than half of "
                                  f"num_train_timesteps={self.num_train_timesteps} (SD v1 uses 1)")


# --- presets ------------------------------------------------------------------------------

def small_sd() -> dict[str, _Config]:
    """OFA-Sys/small-stable-diffusion-v0: SD v1 with one resnet and attention per UNet level
    (tests/data/small-sd/ holds its config files; a test checks this preset against them)."""
    return {
        "unet": UNetConfig(layers_per_block=1, cross_attention_dim=768),
        "vae": VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        "text_encoder": CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        "safety_checker": SafetyCheckerConfig(
            CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, patch_size=14), projection_dim=768),
        "scheduler": SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    }


def sd_v1() -> dict[str, _Config]:
    """CompVis SD v1-4 / v1-5: small-sd with two layers per UNet level (the diffusers defaults)."""
    return small_sd() | {"unet": UNetConfig(layers_per_block=2, cross_attention_dim=768)}


def minisd_shapes() -> dict[str, _Config]:
    """The embedded model, weights/minisd-shapes: 64x64 images of coloured shapes, small-sd's
    layout at a tenth of its width; attention only at the two coarser levels (8x8, 4x4), the
    text encoder 64 wide and 3 layers deep. tools/train_shapes.py trains it."""
    return {
        "unet": UNetConfig(sample_size=16, block_out_channels=(64, 128, 128), layers_per_block=1,
                           down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                           up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                           attention_head_dim=4, cross_attention_dim=64),
        "vae": VAEConfig(block_out_channels=(16, 32, 64), norm_num_groups=8, scaling_factor=0.23508),
        "text_encoder": CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                       num_attention_heads=4),
        "scheduler": SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     steps_offset=1),
    }
