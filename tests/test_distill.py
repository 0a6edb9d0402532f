"""tools/distill.py and the teacher it distils (tools/train_shapes.py --layers-per-block 2), on tiny
models for a few steps each:

  * each stage runs; the student comes out as a small-sd-layout pipeline that minisd and diffusers
    load, holding the EMA weights, beside the teacher's unchanged components;
  * the losses are the sums the docstring states, each weight applied (recomputed here by hand);
  * a shrink-initialised student starts as the teacher's first layers; one from scratch needs no
    teacher at all;
  * a run that stops and resumes ends bit for bit where an uninterrupted one does;
  * the teacher trains on the shipped text encoder and VAE, unchanged, with two layers per block;
  * bad arguments are refused with a message before any training.
"""
import json
from pathlib import Path

import distill
import pytest
import shrink_unet
import torch
import torch.nn.functional as F
import train_phases
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "minisd-shapes"


@pytest.fixture(scope="module")
def teacher(make_tiny) -> Path:
    return make_tiny("current", seed=3, unet={"layers_per_block": 2})


def run(*argv):
    distill.main([str(a) for a in argv])


def test_every_stage_runs_and_the_student_is_a_small_sd_layout_pipeline(teacher, tmp_path):
    from diffusers import StableDiffusionPipeline

    work = tmp_path / "work"
    run("--teacher", teacher, "--stages", "task:2,soft:2,features:2", "--gram-weight", "0.5", "--smoke", "--work", work)
    result = json.loads((work / "result.json").read_text())
    assert result["plan"]["stages"] == [["task", 2], ["soft", 2], ["features", 2]]
    assert [e["step"] for e in result["evals"]] == [0, 2, 4, 6] and result["step"] == 6
    assert set(result["final"]) >= {"background", "colour", "shape", "position", "size"}
    student = work / "student"
    config = json.loads((student / "unet" / "config.json").read_text())
    assert config["layers_per_block"] == 1
    assert config == {**json.loads((teacher / "unet" / "config.json").read_text()), "layers_per_block": 1}
    ema = torch.load(work / "state.pt", weights_only=True)["ema_unet"]
    written = load_file(student / "unet" / "diffusion_pytorch_model.safetensors")
    assert written.keys() == ema.keys()
    assert all(torch.equal(written[k], ema[k].half()) for k in ema)
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for path in (teacher / component).iterdir():
            assert (student / component / path.name).read_bytes() == path.read_bytes(), path
    theirs = StableDiffusionPipeline.from_pretrained(student, safety_checker=None, requires_safety_checker=False)
    assert theirs.unet.config.layers_per_block == 1
    assert sum(p.numel() for p in theirs.unet.parameters()) == result["parameters"]["student"]
    assert "task for 2 steps then soft for 2 steps then features for 2 steps" in (student / "README.md").read_text()


def make_state(teacher: Path, **plan) -> distill.DistillState:
    return distill.DistillState(distill.DistillPlan(**{"batch": 2, **plan}), teacher)


def test_a_shrunk_student_starts_as_the_teachers_first_layers(teacher):
    state = make_state(teacher, init="shrink")
    taken = shrink_unet.shrink_state_dict(state.teacher.state_dict(), state.teacher_config)
    assert all(torch.equal(v, taken[k]) for k, v in state.unet.state_dict().items())
    assert torch.equal(state.unet.up_blocks[1].resnets[1].conv1.weight, state.teacher.up_blocks[1].resnets[2].conv1.weight)

    scratch = make_state(teacher, init="scratch", stages=(("task", 3),))
    assert scratch.teacher is None  # nothing to learn from it
    assert not torch.equal(scratch.unet.conv_in.weight, state.unet.conv_in.weight)


def block_outputs(unet, noisy, t, context) -> list[torch.Tensor]:
    """The outputs of every down block, the mid block and every up block, by hooks on each."""
    seen = {}
    modules = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    handles = [m.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out if torch.is_tensor(out) else out[0]))
               for i, m in enumerate(modules)]
    with torch.no_grad():
        unet(noisy, t, context)
    for h in handles:
        h.remove()
    return [seen[i] for i in range(len(modules))]


@pytest.mark.parametrize("stage", ["task", "soft", "features"])
def test_each_stage_adds_its_weighted_term(teacher, stage):
    weights = {"soft_weight": 0.5, "feature_weight": 2.0, "gram_weight": 3.0}
    state = make_state(teacher, stages=((stage, 5),), **weights)
    tokenizer, alphas = state.teacher_pipe.tokenizer, train_phases.sd_alphas_cumprod()
    with torch.no_grad():
        loss, parts = distill.distill_loss(state, tokenizer, alphas, step=3)
        noisy, t, context, noise = train_phases.noisy_batch(state, tokenizer, alphas, 3, phase="distill")
        w = train_phases.loss_weights(alphas, state.plan)[t]
        student, taught = state.unet(noisy, t, context), state.teacher(noisy, t, context)
        per_image = lambda a, b: ((a - b) ** 2).mean(dim=(1, 2, 3))
        expected = (w * per_image(student, noise)).mean()
        if stage != "task":
            expected = expected + 0.5 * (w * per_image(student, taught)).mean()
        if stage == "features":
            ours, theirs = block_outputs(state.unet, noisy, t, context), block_outputs(state.teacher, noisy, t, context)
            assert len(ours) == 7 and all(a.shape == b.shape for a, b in zip(ours, theirs))
            expected = expected + 2.0 * sum(F.mse_loss(a, b) for a, b in zip(ours, theirs))

            def similarity(x):
                flat = x.flatten(2)
                flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
                return flat.transpose(1, 2) @ flat
            expected = expected + 3.0 * sum(F.mse_loss(similarity(a), similarity(b)) for a, b in zip(ours, theirs))
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6), (loss, expected)
    assert set(parts) == {"task", "soft", "features", "gram"}.intersection(
        {"task": {"task"}, "soft": {"task", "soft"}, "features": {"task", "soft", "features", "gram"}}[stage])


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(teacher, tmp_path, monkeypatch):
    args = ("--teacher", teacher, "--stages", "task:2,features:2", "--smoke", "--eval-every", "0", "--card-eval", "1")
    run(*args, "--work", tmp_path / "whole")

    real_loss = distill.distill_loss

    def stop_at_step_3(state, tokenizer, alphas, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_loss(state, tokenizer, alphas, step)

    monkeypatch.setattr(distill, "distill_loss", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(*args, "--work", tmp_path / "cut", "--save-every", "0")
    assert torch.load(tmp_path / "cut" / "state.pt", weights_only=True)["meta"].count('"step": 3') == 1
    monkeypatch.setattr(distill, "distill_loss", real_loss)
    run(*args, "--work", tmp_path / "cut")
    whole = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    for name in ("unet", "ema_unet"):
        assert all(torch.equal(whole[name][k], cut[name][k]) for k in whole[name]), name
    assert json.loads(cut["meta"])["step"] == 4


def test_the_teacher_trains_on_the_shipped_encoders_with_two_layers_per_block(tmp_path):
    import train_shapes

    work = tmp_path / "teacher"
    train_shapes.main(["--layers-per-block", "2", "--smoke", "--work", str(work), "--card-eval", "2",
                       "--eval-every", "0"])
    out = work / "minisd-shapes"
    assert json.loads((out / "unet" / "config.json").read_text())["layers_per_block"] == 2
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == \
        json.loads((SHIPPED / "vae" / "config.json").read_text())["scaling_factor"]
    for component, name in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        ours, shipped = load_file(out / component / name), load_file(SHIPPED / component / name)
        assert ours.keys() == shipped.keys() and all(torch.equal(ours[k], shipped[k]) for k in ours), component
    assert "taken from" in (out / "README.md").read_text()
    with pytest.raises(SystemExit, match="layers_per_block=2, not 1"):
        train_shapes.main(["--smoke", "--work", str(work), "--layers-per-block", "1", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("argv, message", [
    (["--arm", "soft", "--stages", "task:3"], "either --arm or"),
    (["--stages", "task:3,polish:2"], "'polish:2' is not LOSS:STEPS"),
    (["--stages", "task:0"], "'task:0' is not LOSS:STEPS"),
    (["--arm", "card", "--steps", "2"], "at least 3 for arm card"),
    ([], "give --arm ARM, or --stages"),
])
def test_bad_arguments_are_refused(teacher, capsys, argv, message):
    with pytest.raises(SystemExit):
        run("--teacher", teacher, *argv)
    assert message in capsys.readouterr().err


def test_missing_or_unshrinkable_teachers_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run("--teacher", tmp_path / "nowhere", "--arm", "soft", "--work", tmp_path / "w")
    assert "not a pipeline folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("--teacher", SHIPPED, "--arm", "soft", "--work", tmp_path / "w")
    assert "nothing to shrink" in capsys.readouterr().err


def test_the_report_gathers_the_arms(teacher, tmp_path, capsys):
    import distill_report

    for arm in ("scratch", "features"):
        run("--teacher", teacher, "--arm", arm, "--steps", "2", "--smoke", "--work", tmp_path / "arms" / arm)
    capsys.readouterr()
    distill_report.main(["--arms", str(tmp_path / "arms"), "--teacher", str(teacher), "--card-eval", "2",
                         "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")]
    assert rows == ["| model", "| shipped", "| teacher", "| scratch", "| features"]
    assert "init shrink; features for 2 steps" in out
    report = {name: json.loads((tmp_path / "arms" / name / "result.json").read_text()) for name in ("scratch", "features")}
    distill_report.plot(report, tmp_path / "plot.png")
    from PIL import Image
    with Image.open(tmp_path / "plot.png") as image:
        assert image.size == (820, 480)
