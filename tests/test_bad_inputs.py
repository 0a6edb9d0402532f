"""Bad input, broken checkpoints and hostile files: each case names the exception type it must
raise (exactly that class) and the key words its message must hold: what went wrong, where
(file, key, argument, value) and, where there is something to do, what to do.

  CHECKPOINT_CASES  a damaged copy of a tiny fixture folder -> Pipeline.from_pretrained
  NAN_CASES         NaN/inf in one component's weights -> the run stops, naming the component
  ARGUMENT_CASES    bad Pipeline.__call__ arguments -> InputError
  CLI_CASES         bad command lines -> one line on stderr, exit 2 (input) or 1 (anything else)
  ODD_PROMPTS       valid but unusual prompts (unicode, control characters, 10,000 characters)
                    -> an image, never an error
and, one test each: components that do not fit, a size or batch too big for the machine
(refused before allocating), a read-only output folder, a full disk, --debug, an unexpected
exception, Ctrl-C in the middle of a run and while saving (no partial file).
More bad inputs are covered next to the code they test: test_checkpoint.py, test_tokenizer.py,
test_dpm_solver.py, test_pipeline.py::test_bad_arguments, test_cli.py::test_bad_arguments_one_line_exit_2.
"""
import dataclasses
import errno
import json
import os
import pickle
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from minisd.checkpoint import find_weights, read_tensors
from minisd.cli import main, save_png_atomically
from minisd.clip import CLIPTextModel
from minisd.errors import CheckpointError, InputError, MinisdError, ResourceError
from minisd.pipeline import Pipeline
from minisd.runtime import available_memory

ROOT = Path(__file__).resolve().parents[1]
KNOWS_MEMORY = available_memory(torch.device("cpu")) is not None  # read from /proc/meminfo
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


@pytest.fixture(scope="module")
def pipe(tiny_current) -> Pipeline:
    return Pipeline.from_pretrained(tiny_current, safety_checker=None)


# --- damaged checkpoint folders ---------------------------------------------------------

def damaged_copy(src: Path, dst: Path, damaged: tuple[str, ...]) -> Path:
    """A model folder at dst: model_index.json and the `damaged` components copied (shutil.copytree)
    so a case may break them; every other entry a symlink to the read-only session fixture."""
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name in damaged or entry.is_file():
            (shutil.copytree if entry.is_dir() else shutil.copyfile)(entry, dst / entry.name)
        else:
            (dst / entry.name).symlink_to(entry, target_is_directory=True)
    return dst


def load_damaged(pipe: Pipeline, folder: Path, damaged: tuple[str, ...]) -> Pipeline:
    """from_pretrained on `folder`, loading only the damaged components (the others are the
    shared pipeline's)."""
    keep = {name: getattr(pipe, name) for name in COMPONENTS if name not in damaged}
    if "safety_checker" not in damaged:
        keep["safety_checker"] = None
    return Pipeline.from_pretrained(folder, **keep)


def weights(folder: Path, component: str) -> Path:
    return find_weights(folder, component)[0]


def edit_json(relative: str, **changes):
    def damage(d: Path) -> None:
        path = d / relative
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return damage


def drop_json_key(relative: str, key: str):
    def damage(d: Path) -> None:
        data = json.loads((d / relative).read_text())
        del data[key]
        (d / relative).write_text(json.dumps(data))
    return damage


def edit_tensors(component: str, change):
    """Read a component's weights, let `change(state)` alter the dict, write them back."""
    def damage(d: Path) -> None:
        path = weights(d, component)
        state = {k: v.clone() for k, v in read_tensors(path).items()}  # .bin loads are memory-mapped
        change(state)
        save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)
    return damage


def cut(component_or_file: str, size: int):
    """Keep the first `size` bytes of a component's weights (or of a file, given a path with a '/')."""
    def damage(d: Path) -> None:
        path = d / component_or_file if "/" in component_or_file else weights(d, component_or_file)
        path.write_bytes(path.read_bytes()[:size])
    return damage


def write_bytes(component_or_file: str, data: bytes):
    def damage(d: Path) -> None:
        path = d / component_or_file if "/" in component_or_file else weights(d, component_or_file)
        path.write_bytes(data)
    return damage


def remove(*names: str):
    def damage(d: Path) -> None:
        for name in names:
            path = d / name if "/" in name or (d / name).exists() else weights(d, name)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return damage


def save(component: str, obj):
    return lambda d: torch.save(obj, weights(d, component))


SYSTEM = f"{os.system.__module__}.system"  # posix.system, or nt.system on Windows


class RunsCode:
    """Unpickled without weights_only, this would run `touch <marker>` in a shell."""

    marker = "/nonexistent"

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_pickle(kind: str):
    def damage(d: Path) -> None:
        target = weights(d, "vae")
        RunsCode.marker = str(d.parent / "code-ran")
        payload = {"decoder.conv_in.weight": RunsCode()}
        if kind == "zip":  # torch.save's format since 1.6
            torch.save(payload, target)
        elif kind == "legacy":  # torch < 1.6's plain pickle format
            torch.save(payload, target, _use_new_zipfile_serialization=False)
        else:  # a bare pickle, no torch framing at all, of protocol 2 or 4
            target.write_bytes(pickle.dumps(payload, protocol=int(kind[-1])))
    return damage


def shard_index(content: dict):
    def damage(d: Path) -> None:
        weights(d, "unet").unlink()
        (d / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(content))
    return damage


def other_path(name: str, make: str | None = None):
    """Load `name` beside the copy instead: nothing there, an empty folder, or a snapshot-less cache."""
    def damage(d: Path) -> Path:
        if make:
            (d.parent / name / make).mkdir(parents=True)
        return d.parent / name
    return damage


RANDOM_BYTES = bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).tolist())
UNET, VAE, TEXT = "unet/config.json", "vae/config.json", "text_encoder/config.json"
SCHED = "scheduler/scheduler_config.json"

# (id, fixture format, components damaged (and so loaded from the copy), damage(copy) -> None or a
#  path to load instead, regex of the message's key words). All CheckpointError.
CHECKPOINT_CASES = [
    # the folder
    ("missing folder", "current", (), other_path("no-such-model"),
     r"model folder not found: .*no-such-model"),
    ("a file, not a folder", "current", (), lambda d: d / "model_index.json",
     r"model_index.json is a file; pass the model folder"),
    ("empty folder", "current", (), other_path("empty", make="."),
     r"empty is not a diffusers pipeline folder: it has none of the folders tokenizer, text_encoder"),
    ("hub cache entry without snapshots", "current", (), other_path("models--org--name", make="snapshots"),
     r"models--org--name is not a diffusers pipeline folder"),
    ("missing component", "current", ("unet",), remove("unet"),
     r"component folder\(s\) missing: unet \(an interrupted download\? fetch the checkpoint again\)"),
    ("two missing components", "legacy", ("vae", "text_encoder"), remove("vae", "text_encoder"),
     r"missing: text_encoder, vae"),
    # model_index.json
    ("model_index: SDXL pipeline", "current", (),
     edit_json("model_index.json", _class_name="StableDiffusionXLPipeline"),
     r"model_index.json: pipeline is 'StableDiffusionXLPipeline'; minisd runs Stable Diffusion v1"),
    ("model_index: unknown unet class", "current", (),
     edit_json("model_index.json", unet=["diffusers", "SD3Transformer2DModel"]),
     r"unet is 'SD3Transformer2DModel'; minisd runs Stable Diffusion v1 \(UNet2DConditionModel\)"),
    ("model_index: unknown vae class", "legacy", (),
     edit_json("model_index.json", vae=["diffusers", "AutoencoderTiny"]),
     r"vae is 'AutoencoderTiny'.*AutoencoderKL"),
    ("model_index: malformed JSON", "current", (), write_bytes("./model_index.json", b'{"_class_name": '),
     r"model_index.json: not valid JSON"),
    ("model_index: not an object", "current", (), write_bytes("./model_index.json", b"[]"),
     r"model_index.json: expected a JSON object, found list"),
    # component configs
    ("config missing", "current", ("unet",), remove(UNET),
     r"unet: config file missing: .*unet.config.json"),
    ("config truncated", "current", ("unet",), cut(UNET, 50),
     r"unet.config.json: not valid JSON \(Unterminated string"),
    ("config not UTF-8", "legacy", ("unet",), write_bytes(UNET, b"\xff\xfe\x00garbage"),
     r"unet.config.json: not valid JSON \('utf-8' codec can't decode"),
    ("config not an object", "current", ("vae",), write_bytes(VAE, b"[1, 2]"),
     r"vae.config.json: expected a JSON object, found list"),
    ("config value of wrong type", "current", ("unet",), edit_json(UNET, block_out_channels="abc"),
     r"unet/config.json: block_out_channels='abc' is not a valid tuple\[int, ...\]"),
    ("config float for int", "current", ("unet",), edit_json(UNET, in_channels=4.5),
     r"unet/config.json: in_channels=4.5 is not a valid int"),
    ("config negative count", "legacy", ("unet",), edit_json(UNET, layers_per_block=-1),
     r"unet/config.json: layers_per_block=-1 must be positive"),
    ("config NaN", "current", ("unet",), edit_json(UNET, norm_eps=float("nan")),
     r"unet/config.json: norm_eps=nan is not a valid float"),
    ("config key missing", "current", ("unet",), drop_json_key(UNET, "cross_attention_dim"),
     r"(?s)unet: .*does not match the model.*attn2.to_k.weight: file has \(32, 32\), model needs \(32, 1280\)"),
    ("config lists of unequal length", "current", ("unet",), edit_json(UNET, up_block_types=["UpBlock2D"]),
     r"unet/config.json: down_block_types, up_block_types .* need one entry per block_out_channels \(3\)"),
    ("config: unsupported unet block", "current", ("unet",),
     edit_json(UNET, mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
     r"unet/config.json: not supported by minisd: mid_block_type='UNetMidBlock2DSimpleCrossAttn' "
     r"\(minisd implements only 'UNetMidBlock2DCrossAttn'\)"),
    ("config: unsupported vae activation", "current", ("vae",), edit_json(VAE, act_fn="gelu"),
     r"vae/config.json: not supported by minisd: act_fn='gelu' \(minisd implements only 'silu'\)"),
    ("config: heads do not divide the width", "current", ("text_encoder",), edit_json(TEXT, num_attention_heads=5),
     r"text_encoder/config.json: hidden_size 32 not divisible by num_attention_heads 5"),
    ("config: unsupported text activation", "legacy", ("text_encoder",), edit_json(TEXT, hidden_act="relu"),
     r"text_encoder/config.json: hidden_act='relu' is not supported by minisd \(quick_gelu, gelu\)"),
    # scheduler config
    ("scheduler: unknown beta schedule", "current", ("scheduler",),
     edit_json(SCHED, beta_schedule="squaredcos_cap_v2"),
     r"scheduler_config.json: beta_schedule='squaredcos_cap_v2' is not supported \(minisd supports linear"),
    ("scheduler: beta above 1", "legacy", ("scheduler",), edit_json(SCHED, beta_end=1.5),
     r"scheduler_config.json: beta_end=1.5: every beta must lie strictly between 0 and 1"),
    ("scheduler: a trained beta of 0", "current", ("scheduler",),
     edit_json(SCHED, trained_betas=[0.0] + [0.01] * 999),
     r"scheduler_config.json: trained_betas\[0\]=0.0: every beta must lie strictly between 0 and 1"),
    ("scheduler: trained_betas of wrong length", "current", ("scheduler",),
     edit_json(SCHED, trained_betas=[0.001] * 10),
     r"scheduler_config.json: 10 trained_betas but num_train_timesteps=1000"),
    ("scheduler: unsupported option", "current", ("scheduler",), edit_json(SCHED, use_lu_lambdas=True),
     r"scheduler_config.json: not supported by minisd: use_lu_lambdas=True \(minisd implements only False\)"),
    ("scheduler: unsupported prediction type", "current", ("scheduler",), edit_json(SCHED, prediction_type="sample"),
     r"prediction_type='sample' is not supported \(minisd supports epsilon, v_prediction\)"),
    ("scheduler: zero training timesteps", "current", ("scheduler",), edit_json(SCHED, num_train_timesteps=0),
     r"num_train_timesteps=0 must be positive"),
    ("scheduler: steps_offset past half", "current", ("scheduler",), edit_json(SCHED, steps_offset=600),
     r"steps_offset=600 must be less than half of num_train_timesteps=1000"),
    # weight files
    ("weights missing", "current", ("vae",), remove("vae/diffusion_pytorch_model.safetensors"),
     r"vae: no weights in .*vae \(looked for .*found: config.json\)"),
    ("empty safetensors", "current", ("text_encoder",), cut("text_encoder", 0),
     r"model.safetensors: corrupt or truncated safetensors file \(.*header too small\); download it again"),
    ("safetensors cut inside its header", "current", ("text_encoder",), cut("text_encoder", 100),
     r"model.safetensors: corrupt or truncated safetensors file"),
    ("random bytes as .safetensors", "current", ("vae",), write_bytes("vae", RANDOM_BYTES),
     r"diffusion_pytorch_model.safetensors: corrupt or truncated safetensors file"),
    ("random bytes as .bin", "legacy", ("text_encoder",), write_bytes("text_encoder", RANDOM_BYTES),
     r"pytorch_model.bin: not a readable PyTorch checkpoint .*corrupt or truncated, download it again"),
    ("truncated .bin", "legacy", ("vae",), cut("vae", 3000),
     r"diffusion_pytorch_model.bin: not a readable PyTorch checkpoint \(PytorchStreamReader failed"),
    ("empty .bin", "legacy", ("vae",), cut("vae", 0),
     r"diffusion_pytorch_model.bin: not a readable PyTorch checkpoint \(EOFError\)"),
    ("code-running pickle (torch zip)", "legacy", ("vae",), hostile_pickle("zip"),
     rf"refused to load: the pickle asks for {SYSTEM}, not just tensors, and minisd never executes "
     r"checkpoint code; use the model's .safetensors weights"),
    ("code-running pickle (torch < 1.6 format)", "legacy", ("vae",), hostile_pickle("legacy"),
     rf"refused to load: the pickle asks for {SYSTEM}"),
    ("code-running pickle (bare, protocol 2)", "legacy", ("vae",), hostile_pickle("bare2"),
     rf"refused to load: the pickle asks for {SYSTEM}"),
    # protocol 4 frames stop torch's unpickler before it reaches the global: unreadable, never run
    ("code-running pickle (bare, protocol 4)", "legacy", ("vae",), hostile_pickle("bare4"),
     r"not a readable PyTorch checkpoint \(Unsupported operand 149\)"),
    ("pickle holding a string", "legacy", ("vae",), save("vae", {"note": "hello", "w": torch.zeros(1)}),
     r"expected a dict of tensors, but 'note' holds a str; is this a model weights file\?"),
    ("pickle of a bare tensor", "legacy", ("vae",), save("vae", torch.zeros(3)),
     r"expected a dict of tensors, found Tensor"),
    ("tensor of wrong shape", "current", ("vae",),
     edit_tensors("vae", lambda s: s.update({"decoder.conv_out.weight": torch.zeros(3, 16, 1, 1)})),
     r"shape of decoder.conv_out.weight: file has \(3, 16, 1, 1\), model needs \(3, 16, 3, 3\)"),
    ("tensor of wrong dtype", "current", ("text_encoder",),
     edit_tensors("text_encoder", lambda s: s.update({"final_layer_norm.bias": s["final_layer_norm.bias"] > 0})),
     r"dtype of final_layer_norm.bias: file has torch.bool, model needs floating point"),
    ("tensor missing", "legacy", ("vae",), edit_tensors("vae", lambda s: s.pop("decoder.conv_out.bias")),
     r"vae: .*diffusion_pytorch_model.bin does not match the model \(1 problem\(s\)\):\n"
     r"  1 missing: decoder.conv_out.bias"),
    ("unexpected tensor", "current", ("vae",),
     edit_tensors("vae", lambda s: s.update({"decoder.extra": torch.zeros(1)})),
     r"1 unexpected: decoder.extra"),
    ("shard index names a missing shard", "current", ("unet",),
     shard_index({"weight_map": {"conv_in.weight": "part-2.safetensors"}}),
     r"index.json: lists shard part-2.safetensors, which is missing"),
    ("shard index malformed", "current", ("unet",), shard_index({"no": "weight_map"}),
     r"index.json: not a valid shard index \(no weight_map of file names\)"),
    ("tokenizer vocabulary missing", "legacy", ("tokenizer",), remove("tokenizer/vocab.json"),
     r"tokenizer folder .*tokenizer has no tokenizer.json and lacks vocab.json"),
    ("tokenizer.json truncated", "current", ("tokenizer",), cut("tokenizer/tokenizer.json", 1),
     r"tokenizer.json: not valid JSON \(.*\); the file is corrupt or truncated, download it again"),
    ("safety checker weights missing", "current", ("safety_checker",), remove("safety_checker/model.safetensors"),
     r"safety_checker: no weights in"),
]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
@pytest.mark.parametrize("fmt, damaged, damage, words", [pytest.param(*c[1:], id=c[0]) for c in CHECKPOINT_CASES])
def test_damaged_checkpoint(pipe, make_tiny, tmp_path, fmt, damaged, damage, words):
    folder = damaged_copy(make_tiny(fmt), tmp_path / "model", damaged)
    target = damage(folder)  # a Path when the case loads another path
    with pytest.raises(MinisdError) as e:
        load_damaged(pipe, target if isinstance(target, Path) else folder, damaged)
    assert type(e.value) is CheckpointError and re.search(words, str(e.value)), str(e.value)
    assert not (tmp_path / "code-ran").exists()  # the code-running pickles: no code ran


# NaN/inf in weights: stopped where they first show, naming the component; never a black image.
NAN_CASES = [
    ("NaN in text encoder weights", "current", "text_encoder", "final_layer_norm.bias", float("nan"),
     r"the text encoder's output contains NaN or infinity \(text_encoder weights hold NaN/inf\)"),
    ("NaN in UNet weights", "legacy", "unet", "conv_in.bias", float("nan"),
     r"the UNet's first prediction contains NaN or infinity \(unet weights hold NaN/inf, or float16 overflowed\)"),
    ("inf in VAE weights", "current", "vae", "decoder.conv_out.bias", float("inf"),
     r"the VAE's decoded image contains NaN or infinity \(vae weights hold NaN/inf, or float16 overflowed\); "
     r"try dtype=torch.float32 \(--dtype float32\), or re-download the checkpoint"),
]


@pytest.mark.parametrize("fmt, component, key, value, words", [pytest.param(*c[1:], id=c[0]) for c in NAN_CASES])
def test_non_finite_weights(pipe, make_tiny, tmp_path, fmt, component, key, value, words):
    folder = damaged_copy(make_tiny(fmt), tmp_path / "model", (component,))
    edit_tensors(component, lambda s: s[key].__setitem__(0, value))(folder)
    loaded = load_damaged(pipe, folder, (component,))
    with pytest.raises(MinisdError) as e:
        loaded("a cat", num_inference_steps=2, output_type="np")
    assert type(e.value) is MinisdError and re.search(words, str(e.value)), str(e.value)


def test_components_that_do_not_fit(pipe):
    wide = dataclasses.replace(pipe.text_encoder.config, hidden_size=48, num_attention_heads=4)
    with torch.device("meta"):
        text_encoder = CLIPTextModel(wide)
    with pytest.raises(CheckpointError, match=r"components do not fit together: text_encoder hidden_size 48 != "
                                              r"unet cross_attention_dim 32"):
        Pipeline(pipe.tokenizer, text_encoder, pipe.unet, pipe.vae, pipe.scheduler)


# --- bad Pipeline arguments -------------------------------------------------------------

NAN, INF = float("nan"), float("inf")

# (id, keyword arguments over prompt="a cat", 1 step, latent output; regex of the key words). All InputError.
ARGUMENT_CASES = [
    ("prompt an int", dict(prompt=42), r"prompt: expected a string or a non-empty list of strings, got 42"),
    ("prompt bytes", dict(prompt=b"a cat"), r"prompt: expected a string .*got b'a cat'"),
    ("prompt a dict", dict(prompt={"text": "a cat"}), r"prompt: expected a string"),
    ("prompt an empty tuple", dict(prompt=()), r"prompt: expected a string or a non-empty list"),
    ("prompt list holding None", dict(prompt=["a cat", None]), r"prompt\[1\]: expected a string, got NoneType"),
    ("prompt nested list", dict(prompt=[["a cat"]]), r"prompt\[0\]: expected a string, got list"),
    ("prompt with a lone surrogate", dict(prompt="caf\udce9"),
     r"prompt\[0\]: not valid Unicode text \(surrogates not allowed: '\\udce9' at position 3, "
     r".*pass the prompt as UTF-8"),
    ("negative prompt an int", dict(negative_prompt=3), r"negative_prompt: expected a string .*got 3"),
    ("negative prompt empty list", dict(negative_prompt=[]),
     r"negative_prompt: expected a string or a non-empty list"),
    ("negative prompt list holding an int", dict(prompt=["a", "b"], negative_prompt=["x", 7]),
     r"negative_prompt\[1\]: expected a string, got int"),
    ("two negatives for one prompt", dict(negative_prompt=["x", "y"]),
     r"negative_prompt: 2 negative prompt\(s\) for 1 prompt\(s\)"),
    ("one negative (a list) for two prompts", dict(prompt=["a", "b"], negative_prompt=["x"]),
     r"negative_prompt: 1 negative prompt\(s\) for 2 prompt\(s\)"),
    ("negative prompt with a lone surrogate", dict(negative_prompt="\ud800"),
     r"negative_prompt\[0\]: not valid Unicode"),
    ("height not a multiple of 8", dict(height=63), r"height: must be a positive multiple of 8, got 63"),
    ("width negative", dict(width=-64), r"width: must be a positive multiple of 8, got -64"),
    ("height a float", dict(height=64.0), r"height: must be a positive multiple of 8, got 64.0"),
    ("width a string", dict(width="64"), r"width: must be a positive multiple of 8, got '64'"),
    ("height True", dict(height=True), r"height: must be a positive multiple of 8, got True"),
    ("steps negative", dict(num_inference_steps=-5), r"num_inference_steps: must be an integer from 1 to 1000, got -5"),
    ("steps huge", dict(num_inference_steps=10**9), r"num_inference_steps: .* from 1 to 1000, got 1000000000"),
    ("steps a float", dict(num_inference_steps=2.5), r"num_inference_steps: .*got 2.5"),
    ("steps None", dict(num_inference_steps=None), r"num_inference_steps: .*got None"),
    ("steps a string", dict(num_inference_steps="25"), r"num_inference_steps: .*got '25'"),
    ("steps that would repeat a timestep", dict(num_inference_steps=1000),
     r"num_inference_steps=1000 is too many for timestep_spacing='linspace' over 1000 training timesteps "
     r"\(steps would repeat a timestep or pass 999\); use at most 999"),
    ("guidance inf", dict(guidance_scale=INF), r"guidance_scale: must be a finite number, got inf"),
    ("guidance -inf", dict(guidance_scale=-INF), r"guidance_scale: must be a finite number, got -inf"),
    ("guidance a string", dict(guidance_scale="7.5"), r"guidance_scale: must be a finite number, got '7.5'"),
    ("guidance None", dict(guidance_scale=None), r"guidance_scale: must be a finite number, got None"),
    ("guidance True", dict(guidance_scale=True), r"guidance_scale: must be a finite number, got True"),
    ("guidance a NaN tensor", dict(guidance_scale=torch.tensor(NAN)), r"guidance_scale: must be a finite number"),
    ("guidance_rescale NaN", dict(guidance_rescale=NAN), r"guidance_rescale: must be a finite number, got nan"),
    ("guidance_rescale above 1", dict(guidance_rescale=1.5), r"guidance_rescale: must lie in \[0, 1\].*got 1.5"),
    ("guidance_rescale negative", dict(guidance_rescale=-0.1), r"guidance_rescale: must lie in \[0, 1\]"),
    ("images per prompt 0", dict(num_images_per_prompt=0),
     r"num_images_per_prompt: must be a positive integer, got 0"),
    ("images per prompt a float", dict(num_images_per_prompt=1.5), r"num_images_per_prompt: .*got 1.5"),
    ("output type None", dict(output_type=None), r"output_type: must be one of pil, np, pt, latent, got None"),
    ("latents not a tensor", dict(latents=[[0.0]]),
     r"latents: expected a torch.Tensor of shape \(1, 4, 8, 8\), got list"),
    ("latents for the wrong batch", dict(latents=torch.zeros(2, 4, 8, 8)),
     r"latents: expected shape \(1, 4, 8, 8\), got \(2, 4, 8, 8\)"),
    ("latents holding NaN", dict(latents=torch.full((1, 4, 8, 8), NAN)), r"latents: contain NaN or infinity"),
    ("latents holding inf", dict(latents=torch.full((1, 4, 8, 8), INF)), r"latents: contain NaN or infinity"),
    ("generator an int", dict(generator=42), r"generator: expected a torch.Generator or a list of them, got 42"),
    ("generator a list of seeds", dict(generator=[1]), r"generator: expected a torch.Generator"),
    ("generator list too short", dict(prompt=["a", "b"], generator=[torch.Generator()]),
     r"generator: a list of 1 generators for 2 images"),
]


@pytest.mark.parametrize("kwargs, words", [pytest.param(*c[1:], id=c[0]) for c in ARGUMENT_CASES])
def test_bad_argument(pipe, kwargs, words):
    with pytest.raises(InputError) as e:
        pipe(**{"prompt": "a cat", "num_inference_steps": 1, "output_type": "latent", **kwargs})
    assert type(e.value) is InputError and re.search(words, str(e.value)), str(e.value)


@pytest.mark.skipif(not KNOWS_MEMORY, reason="this OS does not say how much memory is available")
@pytest.mark.parametrize("size, per_prompt", [((100_000, 100_000), 1), ((64, 64), 10**6)],
                         ids=["100000x100000", "a million images"])
def test_too_big_for_the_machine_is_refused_before_allocating(pipe, monkeypatch, size, per_prompt):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the text encoder ran: the size was not refused first")
    monkeypatch.setattr(pipe, "encode_prompt", must_not_run)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ResourceError, match=rf"{per_prompt} image\(s\) of {size[0]}x{size[1]} need about .* GiB, "
                                            r"but cpu has .* GiB available; choose a smaller size or fewer images"):
        pipe("a cat", height=size[1], width=size[0], num_images_per_prompt=per_prompt)
    assert time.perf_counter() - start < 1.0
    # The latents alone would be 2.5 GB (100000x100000) or 1 GB (a million 64x64).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 256 * 1024


# --- valid but unusual prompts: an image, never an error --------------------------------

ODD_PROMPTS = {
    "empty": "",
    "whitespace only": " \t\n ",
    "emoji, CJK and right-to-left text": "🚀 宇宙飛行士 رائد فضاء 👩‍🚀",
    "combining marks and zero-width characters": "cafe\u0301 ze\u200bro\u200dwidth \ufeff",
    "control characters": "a cat\x00\x07\x1b[31m\x7f\u202e\r",
    "special token text": "<|endoftext|><|startoftext|> a cat",
    "10,000 characters": "a red cat " * 1000,
}


@pytest.mark.parametrize("case", list(ODD_PROMPTS))
def test_odd_prompt_makes_an_image(pipe, case):
    images = pipe(ODD_PROMPTS[case], num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 1 and images[0].size == (64, 64) and images[0].mode == "RGB"


def test_prompt_over_77_tokens_warns_naming_what_was_cut(pipe, caplog):
    prompt = "a lighthouse on a cliff, " * 20 + "in the style of zdzisław beksiński"
    with caplog.at_level("WARNING", logger="minisd"):
        pipe(prompt, num_inference_steps=1, output_type="latent")
    assert "truncated because CLIP can only handle sequences up to 77 tokens" in caplog.text
    assert "beksiński" in caplog.text  # the cut part is named


# --- the command line -------------------------------------------------------------------

# (id, arguments after "generate" ("{tmp}": the test's output folder, "{model}": the fixture),
#  exit code, regex of the one line printed). The cases before the last five fail before loading.
CLI_CASES = [
    ("no prompt", [], 2, r"minisd generate: the following arguments are required: prompt"),
    ("unknown option", ["x", "--frobnicate", "0.5"], 2, r"minisd: unrecognized arguments: --frobnicate 0.5"),
    ("steps not a number", ["x", "--steps", "ten"], 2, r"argument --steps: invalid int value: 'ten'"),
    ("guidance not a number", ["x", "--guidance", "high"], 2, r"argument --guidance: invalid float value: 'high'"),
    ("size with three numbers", ["x", "--size", "64x64x64"], 2,
     r"argument --size: expected WxH such as 512x512, got '64x64x64'"),
    ("unknown dtype", ["x", "--dtype", "float64"], 2, r"argument --dtype: invalid choice: 'float64'"),
    ("seed not an integer", ["x", "--seed", "1.5"], 2, r"argument -s/--seed: invalid int value: '1.5'"),
    ("seed above 2**64 - 1", ["x", "--seed", str(2**64)], 2,
     r"--seed: must lie in \[0, 18446744073709551614\], got 18446744073709551616"),
    ("seed + n past the range", ["x", "--seed", str(2**64 - 2), "-b", "2"], 2,
     r"--seed: must lie in \[0, 18446744073709551613\]"),
    ("negative image count", ["x", "-b", "-2"], 2, r"-b/--num-images: must be at least 1, got -2"),
    ("output without .png", ["x", "-o", "{tmp}/picture"], 2, r"--output: images are written as PNG; name a .png file"),
    ("output folder missing (nested)", ["x", "-o", "{tmp}/a/b/c.png"], 2, r"--output: folder '.*/a/b' does not exist"),
    ("output is a folder", ["x", "-o", "{tmp}/sub.png", "--overwrite"], 2,
     r"--output: '.*sub.png' is a folder; name a .png file"),
    ("one of several outputs exists", ["x", "-o", "{tmp}/cat.png", "-b", "2"], 2,
     r"--output: '.*cat-1.png' exists; choose another name or pass --overwrite"),
    ("device not a device", ["x", "--device", "banana"], 2, r"--device: 'banana' is not a device name \(cpu, cuda"),
    ("device this machine lacks", ["x", "--device", "cuda:99"], 2, r"--device: 'cuda:99'"),
    ("model is a file", ["x", "--model", "{model}/model_index.json"], 1,
     r"model_index.json is a file; pass the model folder"),
    ("model folder missing", ["x", "--model", "{tmp}/nowhere"], 1, r"model folder not found: .*nowhere"),
    ("guidance NaN", ["x", "--guidance", "nan"], 2, r"guidance_scale: must be a finite number, got nan"),
    ("size not a multiple of 8", ["x", "--size", "64x60"], 2, r"height: must be a positive multiple of 8, got 60"),
    ("too many steps", ["x", "--steps", "1001"], 2,
     r"num_inference_steps: must be an integer from 1 to 1000, got 1001"),
    ("prompt with an undecodable byte", ["caf\udce9"], 2, r"prompt\[0\]: not valid Unicode text"),
    ("size too big for the machine", ["x", "--size", "100000x100000"], 1,
     r"need about .* GiB, but cpu has .* GiB available; choose a smaller size or fewer images"),
]
FAST = ["--steps", "1", "--size", "64x64", "--quiet", "--dtype", "float32"]


@pytest.mark.parametrize("args, code, words", [pytest.param(*c[1:], id=c[0]) for c in CLI_CASES])
def test_bad_command_line(tiny_current, tmp_path, capsys, args, code, words):
    if "100000x100000" in args and not KNOWS_MEMORY:
        pytest.skip("this OS does not say how much memory is available")
    (tmp_path / "sub.png").mkdir()
    (tmp_path / "cat-1.png").write_bytes(b"keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_current)) for a in args]
    argv = ["generate", *FAST, *args]  # the case's options come last, so they win
    argv += [] if "-o" in args else ["-o", str(tmp_path / "out.png")]
    argv += [] if "--model" in args else ["--model", str(tiny_current)]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minisd: error: ") and re.search(words, err[0]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing replaced
    assert (tmp_path / "cat-1.png").read_bytes() == b"keep me"


def test_read_only_output_folder(tiny_current, tmp_path, monkeypatch, capsys):
    # The tests run as root, for whom permission bits do not stop writes: chmod would prove
    # nothing. So os.access, which the CLI's check asks, reports the folder as read-only.
    folder = tmp_path / "read-only"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == folder and mode & os.W_OK
                        else real_access(path, mode, **kw))
    assert main(["generate", "x", "-o", str(folder / "a.png"), "--model", str(tiny_current), *FAST]) == 2
    assert capsys.readouterr().err.strip() == f"minisd: error: --output: folder {str(folder)!r} is not writable"
    assert not list(folder.iterdir())


def test_full_disk_is_a_resource_error_and_leaves_no_file(tiny_current, tmp_path, monkeypatch, capsys):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Image.Image, "save", no_space)
    assert main(["generate", "x", "-o", str(tmp_path / "a.png"), "--model", str(tiny_current), *FAST]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"minisd: error: --output: no space left to write {str(tmp_path / 'a.png')!r} "
                       "(No space left on device); free some space or choose another folder")
    assert not list(tmp_path.iterdir())  # the temporary file is gone too


def test_debug_shows_the_exception_instead(tmp_path):
    with pytest.raises(InputError, match=r"--seed: must lie in"):
        main(["generate", "x", "--seed", "-1", "-o", str(tmp_path / "a.png"), "--debug"])


def test_unexpected_failure_exits_1_with_its_type(tiny_current, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(Pipeline, "from_pretrained", broken)
    assert main(["generate", "x", "-o", str(tmp_path / "a.png"), "--model", str(tiny_current), *FAST]) == 1
    assert capsys.readouterr().err.strip() == "minisd: error: RuntimeError: boom second line"


def test_interrupt_while_saving_leaves_no_file(tmp_path):
    class Interrupted:
        def save(self, f, **kwargs):
            f.write(b"\x89PNG half")
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        save_png_atomically(Interrupted(), tmp_path / "a.png", "params", overwrite=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_mid_run_exits_130_and_leaves_no_file(tiny_current, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # 400 steps at 256x256 take the tiny model tens of seconds: the signal lands mid-run even
    # when a busy machine delays this test's reads (at 64x64 the run could finish first).
    proc = subprocess.Popen(
        [sys.executable, "-m", "minisd", "generate", "a cat", "-o", str(out / "cat.png"), "--model",
         str(tiny_current), "--steps", "400", "--size", "256x256", "--dtype", "float32", "--seed", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # A shell without job control starts background jobs with SIGINT ignored, and Python
        # then installs no KeyboardInterrupt handler: give the child Ctrl-C's default back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr, deadline = b"", time.monotonic() + 120
    try:
        while b"/400 [" not in stderr:  # the progress bar has started: we are mid-run
            assert proc.poll() is None and time.monotonic() < deadline, stderr.decode()
            if select.select([proc.stderr], [], [], 1.0)[0]:
                stderr += os.read(proc.stderr.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        stderr += proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = stderr.decode()
    assert proc.returncode == 130, text
    assert text.rstrip().endswith("minisd: interrupted; no partial file was written"), text
    assert "Traceback" not in text and "/400 [" in text and "400/400" not in text  # stopped mid-run
    assert not list(out.iterdir())  # no image, no temporary file
