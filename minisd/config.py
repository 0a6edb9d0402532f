"""Typed, frozen configs for each component, read from the checkpoint's `config.json` files.

Field names are the json keys minisd uses; unknown keys are ignored, missing ones take
diffusers'/transformers' defaults (not small-sd's: an old config that omits a key meant the
library default of its day). `from_dict` is the one way in from json. Presets `small_sd()`
and `sd_v1()` mirror the published configs; tests shrink them with `dataclasses.replace`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# Integer fields that may be 0; every other integer (channels, layers, heads, sizes) must be >= 1.
NON_NEGATIVE = {"freq_shift", "steps_offset", "downsample_padding"}


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


@dataclass(frozen=True)
class _Config:
    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json"):
        """Keep the keys minisd uses, each checked against its field's type (a malformed
        config fails here, naming the key, not deep inside torch)."""
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
    """diffusers `UNet2DConditionModel`, restricted to the SD v1 block types."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64  # latent size; the image is 8x larger
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2  # resnets per down block; up blocks have one more
    # Quirk: diffusers' `attention_head_dim` is really the number of heads (SD v1: 8 heads,
    # so 40..160 channels per head). An int applies to every block, a list is per down block.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None  # newer name; wins when given
    cross_attention_dim: int = 1280  # width of the text context (CLIP ViT-L: 768)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    act_fn: str = "silu"
    transformer_layers_per_block: int = 1
    center_input_sample: bool = False

    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads or self.attention_head_dim
        n = len(self.block_out_channels)
        return heads if isinstance(heads, tuple) else (heads,) * n

    def validate(self, where: str) -> None:
        n = len(self.block_out_channels)
        unsupported = {
            "down_block_types": not set(self.down_block_types) <= {"CrossAttnDownBlock2D", "DownBlock2D"},
            "up_block_types": not set(self.up_block_types) <= {"CrossAttnUpBlock2D", "UpBlock2D"},
            "mid_block_type": self.mid_block_type != "UNetMidBlock2DCrossAttn",
            "use_linear_projection": self.use_linear_projection,
            "only_cross_attention": self.only_cross_attention,
            "act_fn": self.act_fn != "silu",
            "transformer_layers_per_block": self.transformer_layers_per_block != 1,
            "center_input_sample": self.center_input_sample,
        }
        bad = [k for k, is_bad in unsupported.items() if is_bad]
        if bad:
            raise CheckpointError(f"{where}: minisd runs the SD v1 UNet; unsupported setting(s): "
                                  + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))
        if len(self.down_block_types) != n or len(self.up_block_types) != n or len(self.heads_per_block()) != n:
            raise CheckpointError(f"{where}: down_block_types, up_block_types and attention heads "
                                  f"need one entry per block_out_channels ({n})")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise CheckpointError(f"{where}: block_out_channels {c} not divisible by norm_num_groups {self.norm_num_groups}")


@dataclass(frozen=True)
class VAEConfig(_Config):
    """diffusers `AutoencoderKL`."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1  # encoder resnets per block; the decoder has one more
    norm_num_groups: int = 32
    sample_size: int = 512
    # Quirk: latents are scaled to unit variance by this constant, measured once on
    # SD's training set. Old configs (small-sd's) omit it: 0.18215 is what they meant.
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True
    act_fn: str = "silu"

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, where: str) -> None:
        if self.act_fn != "silu":
            raise CheckpointError(f"{where}: unsupported act_fn {self.act_fn!r}")


@dataclass(frozen=True)
class CLIPTextConfig(_Config):
    """transformers `CLIPTextConfig` (SD v1 uses OpenAI's ViT-L/14 text tower)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def validate(self, where: str) -> None:
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"{where}: unsupported hidden_act {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"{where}: hidden_size {self.hidden_size} not divisible by "
                                  f"num_attention_heads {self.num_attention_heads}")


@dataclass(frozen=True)
class CLIPVisionConfig(_Config):
    """transformers `CLIPVisionConfig` (the safety checker uses ViT-L/14)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    validate = CLIPTextConfig.validate


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
    """diffusers `DPMSolverMultistepScheduler` options a SD v1 config can carry."""

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
        # "leading" spacing adds steps_offset to timesteps up to T/2 even for one step.
        if self.steps_offset >= (self.num_train_timesteps + 1) // 2:
            raise CheckpointError(f"{where}: steps_offset={self.steps_offset} must be less than half of "
                                  f"num_train_timesteps={self.num_train_timesteps} (SD v1 uses 1)")


def small_sd() -> dict[str, _Config]:
    """OFA-Sys/small-stable-diffusion-v0, as its config.json files say."""
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
    """CompVis SD v1-4 / v1-5: small-sd with two layers per UNet block."""
    return small_sd() | {"unet": UNetConfig(layers_per_block=2, cross_attention_dim=768)}
