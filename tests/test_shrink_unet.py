"""tools/shrink_unet.py: a layers_per_block=2 pipeline in, small-sd's layout out.

  * every student tensor is the teacher tensor the model card's recipe names (checked here with
    the mapping written out by hand, not the tool's), and every other component is unchanged;
  * diffusers and minisd both load the result, with no missing or unexpected keys, and agree;
  * the result is in today's format whatever the input's (the key names diffusers writes today);
  * with SD v1.5's UNet (built by diffusers on the meta device: shapes, no memory), the student has
    small-sd's parameter count and exactly small-sd's tensors (tests/data/small-sd-tensors.tsv);
    and once with real files of that size on disk;
  * bad teachers and destinations are refused with a message, before anything is written.
"""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import shrink_unet
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minisd.checkpoint import (
    find_weights,
    is_ignorable,
    read_tensors,
    rename_legacy_keys,
)
from minisd.pipeline import Pipeline
from minisd.unet import load_unet

DATA = Path(__file__).parent / "data"
SMALL_SD_UNET_PARAMETERS = 579_384_964  # small-sd's model card and docs/checkpoint-facts.md
SD15_UNET_PARAMETERS = 859_520_964  # SD v1-5's UNet


def teacher_tensors(folder: Path, component: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in find_weights(folder, component):
        tensors.update(read_tensors(path))
    return {k: v for k, v in rename_legacy_keys(component, tensors).items() if not is_ignorable(component, k)}


def expected_source(student_key: str) -> str:
    """The card's recipe, written out: down blocks keep layer 0; an up block's layer 0 is the
    teacher's 0 and its layer 1 the teacher's 2 (its last, for layers_per_block=2)."""
    match = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions)\.1\.", student_key)
    if match:
        return student_key.replace(f"up_blocks.{match[1]}.{match[2]}.1.", f"up_blocks.{match[1]}.{match[2]}.2.")
    return student_key


@pytest.fixture(scope="module", params=["current", "legacy"])
def shrunk(request, make_tiny, tmp_path_factory):
    """(teacher folder, student folder) for a tiny layers_per_block=2 pipeline in each format."""
    teacher = make_tiny(request.param, seed=3, unet={"layers_per_block": 2})
    student = tmp_path_factory.mktemp(f"student-{request.param}") / "student"
    shrink_unet.main([str(teacher), str(student)])
    return teacher, student


def test_every_student_tensor_is_the_teacher_tensor_it_was_taken_from(shrunk):
    teacher, student = shrunk
    taught = teacher_tensors(teacher, "unet")
    learnt = load_file(student / "unet" / "diffusion_pytorch_model.safetensors")
    assert json.loads((student / "unet" / "config.json").read_text())["layers_per_block"] == 1
    assert any(k.startswith("up_blocks.1.attentions.1.") for k in learnt)  # the recipe's up-block case is there
    for key, tensor in learnt.items():
        assert torch.equal(tensor, taught[expected_source(key)]), key
    dropped = {k for k in taught if re.search(r"down_blocks\.\d+\.(resnets|attentions)\.1\.|"
                                              r"up_blocks\.\d+\.(resnets|attentions)\.1\.", k)}
    taken = {expected_source(k) for k in learnt}
    assert taken == set(taught) - dropped  # nothing else left out, nothing used twice
    for component in ("vae", "text_encoder", "safety_checker"):
        before, after = teacher_tensors(teacher, component), teacher_tensors(student, component)
        assert before.keys() == after.keys(), component
        assert all(torch.equal(before[k], after[k]) for k in before), component


def test_diffusers_and_minisd_load_the_student_and_agree(shrunk):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    _, student = shrunk
    unet, info = UNet2DConditionModel.from_pretrained(student, subfolder="unet", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert unet.config.layers_per_block == 1
    _, info = CLIPTextModel.from_pretrained(student, subfolder="text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs = StableDiffusionPipeline.from_pretrained(student)
    ours = Pipeline.from_pretrained(student)
    assert sum(p.numel() for p in ours.unet.parameters()) == sum(p.numel() for p in theirs.unet.parameters())
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        expected = theirs.unet(sample, t, encoder_hidden_states=context).sample
        got = ours.unet(sample, t, context)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()


def test_the_student_is_written_in_todays_format(shrunk, make_tiny):
    _, student = shrunk
    reference = make_tiny("current", seed=3)  # the same tiny pipeline, layers_per_block=1, saved by diffusers
    for component in ("unet", "vae", "text_encoder", "safety_checker"):
        files = sorted(p.name for p in (student / component).iterdir() if p.name != "config.json")
        expected = sorted(p.name for p in (reference / component).iterdir() if p.name != "config.json")
        assert files == expected, component
        with safe_open(student / component / files[0], "pt") as ours, \
                safe_open(reference / component / expected[0], "pt") as theirs:
            assert set(ours.keys()) == set(theirs.keys()), component
            assert all(ours.get_slice(k).get_shape() == theirs.get_slice(k).get_shape() for k in ours.keys())  # noqa: SIM118 (safe_open is not iterable)


def sd15_unet_config() -> dict:
    """SD v1-5's UNet config: small-sd's (tests/data/small-sd) with two layers per block."""
    config = json.loads((DATA / "small-sd" / "unet" / "config.json").read_text())
    return {**config, "layers_per_block": 2}


def small_sd_unet_inventory() -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in (DATA / "small-sd-tensors.tsv").read_text().splitlines()
            if line.startswith("unet\t")]
    return {key: tuple(int(d) for d in shape.split("x")) for _, key, shape, _ in rows}


def test_sd15_shaped_teacher_gives_small_sds_unet_exactly():
    from diffusers import UNet2DConditionModel

    config = sd15_unet_config()
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    taught = teacher.state_dict()
    assert sum(t.numel() for t in taught.values()) == SD15_UNET_PARAMETERS
    student = shrink_unet.shrink_state_dict(taught, config)
    assert {k: tuple(v.shape) for k, v in student.items()} == small_sd_unet_inventory()
    assert sum(t.numel() for t in student.values()) == SMALL_SD_UNET_PARAMETERS


def test_sd15_shaped_files_on_disk(make_tiny, tmp_path):
    """The tool end to end at full size: an SD v1.5-shaped float16 UNet file (1.7 GB) in a pipeline
    folder -> a student file with small-sd's tensors, which minisd loads."""
    from diffusers import UNet2DConditionModel

    base = make_tiny("current", seed=0)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    shutil.copyfile(base / "model_index.json", teacher / "model_index.json")
    for name in ("scheduler", "tokenizer", "text_encoder", "vae"):
        shutil.copytree(base / name, teacher / name)
    config = sd15_unet_config()
    (teacher / "unet").mkdir()
    (teacher / "unet" / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet2DConditionModel.from_config(
            {k: v for k, v in config.items() if not k.startswith("_")}).state_dict().items()}
    # Random values, a different 4096-value stretch tiled over each tensor, so that a tensor
    # taken from the wrong place is seen (1.7 GB of fresh random numbers would take a while).
    pattern = torch.randn(len(shapes) + 4096, generator=torch.Generator().manual_seed(0)).to(torch.float16)

    def fill(index: int, shape) -> torch.Tensor:
        n = math.prod(shape)
        return pattern[index:index + 4096].repeat(math.ceil(n / 4096))[:n].reshape(shape)

    weights = {k: fill(i, s) for i, (k, s) in enumerate(shapes.items())}
    save_file(weights, teacher / "unet" / "diffusion_pytorch_model.safetensors")
    del weights
    student = tmp_path / "student"
    shrink_unet.main([str(teacher), str(student)])
    with safe_open(student / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        assert found == small_sd_unet_inventory()
        assert sum(math.prod(s) for s in found.values()) == SMALL_SD_UNET_PARAMETERS
        index = {k: i for i, k in enumerate(shapes)}
        for key in found:
            source = expected_source(key)
            assert torch.equal(f.get_tensor(key), fill(index[source], shapes[source])), key
    unet = load_unet(student, dtype=torch.float16)
    assert sum(p.numel() for p in unet.parameters()) == SMALL_SD_UNET_PARAMETERS


def refused(capsys, *argv) -> str:
    """The message shrink_unet stops with (its own, or argparse's on stderr)."""
    with pytest.raises(SystemExit) as stop:
        shrink_unet.main([str(a) for a in argv])
    return f"{stop.value} {capsys.readouterr().err}"


def test_refusals_name_what_is_wrong(make_tiny, tmp_path, capsys):
    small = make_tiny("current", seed=0)  # layers_per_block=1 already
    assert "nothing to shrink" in refused(capsys, small, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    teacher = make_tiny("legacy", seed=3, unet={"layers_per_block": 2})
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "exists and is not empty" in refused(capsys, teacher, busy)
    assert (busy / "keep.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1

    assert "outside the teacher's folder" in refused(capsys, teacher, teacher / "student")
    assert "no such folder" in refused(capsys, tmp_path / "nowhere", tmp_path / "x")
    assert "not a pipeline folder" in refused(capsys, tmp_path / "busy", tmp_path / "x")


def test_a_pickle_that_would_run_code_is_refused(make_tiny, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(make_tiny("legacy", seed=3, unet={"layers_per_block": 2}), teacher)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"conv_in.weight": Payload()}, teacher / "unet" / "diffusion_pytorch_model.bin")
    message = refused(capsys, teacher, tmp_path / "student")
    assert "refused to load" in message and "diffusion_pytorch_model.bin" in message
    assert "this must never run" not in message
    assert not (tmp_path / "student").exists()


def test_overwrite_replaces_an_earlier_student(shrunk, tmp_path):
    teacher, _ = shrunk
    out = tmp_path / "student"
    out.mkdir()
    (out / "old.txt").write_text("old")
    shrink_unet.main([str(teacher), str(out), "--overwrite"])
    assert not (out / "old.txt").exists() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
