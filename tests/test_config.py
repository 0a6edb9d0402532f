"""Config that means what it says: every key a real config file holds is one minisd reads, one
it refuses unless at the only value it implements, or one it ignores for a stated reason; the
refusal table's values are the reference libraries' own defaults; the presets equal the files
they mirror."""
import inspect
import json
import math
from pathlib import Path

import diffusers
import pytest
import transformers

from minisd import config as mc
from minisd.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"unet": mc.UNetConfig, "vae": mc.VAEConfig, "text_encoder": mc.CLIPTextConfig,
           "scheduler": mc.SchedulerConfig}
REFERENCE = {mc.UNetConfig: diffusers.UNet2DConditionModel, mc.VAEConfig: diffusers.AutoencoderKL,
             mc.SchedulerConfig: diffusers.DPMSolverMultistepScheduler}
# What every transformers config writes whatever the model (ids, labels, versions, dtypes).
GENERIC_TRANSFORMERS_KEYS = set(transformers.PretrainedConfig().to_dict()) | {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}


def config_files(folder: Path) -> dict[str, dict]:
    out = {}
    for component in CLASSES:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        out[component] = json.loads((folder / component / name).read_text())
    return out


def folders(make_tiny) -> dict[str, Path]:
    return {"small-sd (tests/data)": ROOT / "tests" / "data" / "small-sd",
            "minisd-shapes": ROOT / "weights" / "minisd-shapes",
            "diffusers/transformers save_pretrained": make_tiny("current"),
            "small-sd-like legacy fixture": make_tiny("legacy")}


def test_every_key_of_real_configs_is_read_refused_or_ignored_on_purpose(make_tiny):
    unaccounted = []
    for name, folder in folders(make_tiny).items():
        for component, raw in config_files(folder).items():
            cls = CLASSES[component]
            known = ({f.name for f in cls.__dataclass_fields__.values()} | set(cls.NOT_IMPLEMENTED)
                     | set(cls.IGNORED))
            if component == "text_encoder":
                known |= GENERIC_TRANSFORMERS_KEYS
            unaccounted += [f"{name}: {component}/{key}" for key in raw
                            if key not in known and not key.startswith("_")]
    assert not unaccounted


@pytest.mark.parametrize("cls", list(REFERENCE), ids=lambda c: c.__name__)
def test_refused_keys_hold_the_reference_defaults(cls):
    """The one value minisd runs is the reference library's default: a config written by
    today's diffusers with default settings passes, whatever it spells out."""
    defaults = {k: p.default for k, p in inspect.signature(REFERENCE[cls].__init__).parameters.items()}
    for key, value in cls.NOT_IMPLEMENTED.items():
        assert key in defaults, f"{key} is not a {REFERENCE[cls].__name__} argument"
        if isinstance(defaults[key], tuple):  # one entry per block: minisd implements one kind
            assert set(defaults[key]) == {value}, key
        else:
            assert defaults[key] == value, key


def _other_value(default):
    if default is False:
        return True
    if default is None:
        return "something"
    if isinstance(default, str):
        return default + "_other"
    if isinstance(default, (int, float)) and math.isinf(default):
        return -5.1
    return default + 1


@pytest.mark.parametrize("cls, key", [(cls, key) for cls in (*REFERENCE,) for key in cls.NOT_IMPLEMENTED],
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_a_key_minisd_does_not_implement_is_refused_by_name(cls, key):
    default = cls.NOT_IMPLEMENTED[key]
    cls.from_dict({key: default})  # at its default: accepted
    with pytest.raises(CheckpointError, match=rf"not supported by minisd: {key}=.*implements only"):
        cls.from_dict({key: _other_value(default)}, "x/config.json")


def test_per_block_lists_of_the_default_and_null_for_off_are_the_default():
    assert mc.UNetConfig.from_dict({"transformer_layers_per_block": [1, 1, 1, 1], "upcast_attention": None})
    with pytest.raises(CheckpointError, match="transformer_layers_per_block"):
        mc.UNetConfig.from_dict({"transformer_layers_per_block": [1, 2, 10]})
    with pytest.raises(CheckpointError, match="mid_block_type=None"):  # diffusers: no mid block at all
        mc.UNetConfig.from_dict({"mid_block_type": None})
    with pytest.raises(CheckpointError, match="use_linear_projection=1"):  # 1 is not False
        mc.UNetConfig.from_dict({"use_linear_projection": 1})


def test_minisd_shapes_preset_is_the_shipped_model():
    raw = config_files(ROOT / "weights" / "minisd-shapes")
    preset = mc.minisd_shapes()
    for component, cls in CLASSES.items():
        assert cls.from_dict(raw[component]) == preset[component], component
