"""Distil a layers_per_block=2 minisd-shapes teacher into small-sd's layout, as small-sd was made.

    python tools/distill.py --arm features --steps 1000    # -> .cache/distill/features/
    python tools/distill.py --init shrink --stages task:300,soft:300,features:400 --work DIR
    python tools/distill.py --arm card --smoke             # a few steps, in a temporary folder

small-stable-diffusion-v0's model card: a UNet with one layer per block, initialised from SD
v1-4's by taking the first layer of each block, trained with only the UNet learning in three
stages: (1) plain training; (2) with a teacher's predicted noise as soft labels; (3) with
block features matched as well. Here, at the size of the embedded model, on its data:

  teacher   `tools/train_shapes.py --layers-per-block 2`: SD v1-4/v1-5's layout, trained on the
            shipped model's text encoder and VAE (--teacher, the exported folder), frozen here.
  init      `shrink`: the teacher's first layers (tools/shrink_unet.py's recipe, the card's);
            `scratch`: PyTorch's default initialisation, as train_shapes starts.
  losses    each stage adds one term to the one before:
              task      the epsilon loss of train_shapes (same timestep weights, same data stream)
              soft      + soft_weight * the same weighted MSE between the student's and the
                        teacher's predicted noise on the same noisy latents and timesteps
              features  + feature_weight * the sum over blocks of the MSE between student and
                        teacher block outputs, paired by block (every down block, the mid block,
                        every up block; same widths, as in BK-SDM, arXiv 2305.15798), and
                        + gram_weight * the same over their spatial similarity (Gram) matrices
                        (the similarity-based matching of arXiv 2206.14366; 0 unless asked)
  arms      the ablation at equal student steps: scratch, shrink (task only), soft, features,
            and card (the card's order: a third of the steps per stage).

Everything is resumable (WORK/state.pt every --save-every seconds, the plan in WORK/plan.json)
and logged (the EMA student is evaluated with tools/eval_shapes.py every eval_every steps). At
the end the EMA student is written as a pipeline folder (WORK/student, the teacher's other
components beside it) with a model card, and evaluated on the model card's 100 prompts
(WORK/result.json); tools/distill_report.py gathers the arms.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import eval_shapes
import shrink_unet
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from shapes_model import save_checkpoint
from train_phases import (
    Saver,
    cosine,
    loss_weights,
    noisy_batch,
    optimiser_step,
    progress_bar,
    sd_alphas_cumprod,
    update_ema,
    weighted_mse,
)

from minisd.checkpoint import read_config
from minisd.config import UNetConfig
from minisd.errors import CheckpointError
from minisd.pipeline import Pipeline
from minisd.unet import UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / ".cache" / "distill"
DEFAULT_TEACHER = ROOT / ".cache" / "train_shapes-lpb2" / "minisd-shapes"
LOSSES = ("task", "soft", "features")  # each stage's loss adds a term to the one before
ARMS = {"scratch": ("scratch", ("task",)), "shrink": ("shrink", ("task",)), "soft": ("shrink", ("soft",)),
        "features": ("shrink", ("features",)), "card": ("shrink", LOSSES)}


@dataclasses.dataclass(frozen=True)
class DistillPlan:
    """How the student trains; the data and optimiser settings are train_shapes' UNet phase's."""
    init: str = "shrink"  # "shrink" (the teacher's first layers) or "scratch"
    stages: tuple[tuple[str, int], ...] = (("task", 1000),)  # (loss, steps), in order
    seed: int = 0
    batch: int = 32
    lr: float = 8e-4
    warmup: int = 100
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    high_noise_cap: float = 20.0
    ema_decay: float = 0.999
    soft_weight: float = 1.0
    feature_weight: float = 1.0
    gram_weight: float = 0.0
    eval_every: int = 250
    eval_n: int = 50  # in-training evaluations: prompts (seed 4321, not the final 100's 1234) ...
    eval_steps: int = 25  # ... and DPM-Solver++ steps, guidance 7.5

    @property
    def steps(self) -> int:
        return sum(n for _, n in self.stages)

    def loss_at(self, step: int) -> str:
        for loss, n in self.stages:
            if step < n:
                return loss
            step -= n
        return self.stages[-1][0]

    def describe(self) -> str:
        gram = f" (Gram weight {self.gram_weight:g})" if self.gram_weight and any(
            loss == "features" for loss, _ in self.stages) else ""
        return f"init {self.init}; " + " then ".join(f"{loss} for {n} steps" for loss, n in self.stages) + gram


def parse_stages(text: str) -> tuple[tuple[str, int], ...]:
    """"task:300,soft:300,features:400" -> (("task", 300), ("soft", 300), ("features", 400))."""
    stages = []
    for part in text.split(","):
        loss, _, n = part.strip().partition(":")
        if loss not in LOSSES or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--stages: {part.strip()!r} is not LOSS:STEPS with LOSS one of {', '.join(LOSSES)}")
        stages.append((loss, int(n)))
    return tuple(stages)


def arm_stages(arm: str, steps: int) -> tuple[tuple[str, int], ...]:
    losses = ARMS[arm][1]
    share = steps // len(losses)
    return tuple((loss, share + (steps - share * len(losses) if i == len(losses) - 1 else 0))
                 for i, loss in enumerate(losses))


# --- the training state ------------------------------------------------------------------

class DistillState:
    """The frozen teacher pipeline (its text encoder, VAE and UNet) and the student being trained."""

    def __init__(self, plan: DistillPlan, teacher_folder: Path):
        self.plan, self.teacher_folder = plan, teacher_folder
        self.teacher_pipe = Pipeline.from_pretrained(teacher_folder, safety_checker=None)
        # A student from scratch that trains on the task loss alone needs no teacher: the folder
        # then only lends it the text encoder, VAE and UNet config (with one layer per block).
        needs_teacher = plan.init == "shrink" or any(loss != "task" for loss, _ in plan.stages)
        self.teacher = self.teacher_pipe.unet if needs_teacher else None  # eval, no gradients
        self.teacher_config = read_config(teacher_folder, "unet")
        self.vae, self.text_encoder = self.teacher_pipe.vae, self.teacher_pipe.text_encoder
        self.scaling_factor = self.vae.scaling_factor
        torch.manual_seed(plan.seed)
        self.student_config = shrink_unet.shrink_config(self.teacher_config)
        self.unet = UNet2DConditionModel(UNetConfig.from_dict(self.student_config, "the student's config"))
        if plan.init == "shrink":
            self.unet.load_state_dict(shrink_unet.shrink_state_dict(self.teacher.state_dict(), self.teacher_config))
        self.unet.train()
        self.ema_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=plan.lr, weight_decay=0.0)
        self.step, self.seconds, self.evals = 0, 0.0, []
        self.history: list[str] = []

    def save(self, path: Path) -> None:
        blob = {"unet": self.unet.state_dict(), "ema_unet": self.ema_unet.state_dict(), "opt": self.opt.state_dict(),
                "meta": json.dumps({"step": self.step, "seconds": self.seconds, "evals": self.evals,
                                    "history": self.history, "plan": plan_json(self.plan)})}
        save_checkpoint(blob, path)

    def load(self, path: Path) -> None:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        if meta["plan"]["init"] != self.plan.init or meta["plan"]["seed"] != self.plan.seed:
            raise SystemExit(f"{path} was started with init {meta['plan']['init']!r}, seed {meta['plan']['seed']}; "
                             f"this plan says init {self.plan.init!r}, seed {self.plan.seed}: use another --work")
        for name in ("unet", "ema_unet", "opt"):
            getattr(self, name).load_state_dict(blob[name])
        self.step, self.seconds, self.evals = meta["step"], meta["seconds"], meta["evals"]
        self.history = meta["history"]
        if meta["plan"] != plan_json(self.plan):
            self.history.append(f"plan changed at step {self.step}: {meta['plan']} -> {plan_json(self.plan)}")
            print(f"note: {self.history[-1]}", file=sys.stderr)

    def student_pipeline(self) -> Pipeline:
        pipe = copy.copy(self.teacher_pipe)
        pipe.unet = self.ema_unet
        return pipe


def plan_json(plan: DistillPlan) -> dict:
    return {**dataclasses.asdict(plan), "stages": [list(s) for s in plan.stages]}


# --- the losses ----------------------------------------------------------------------------

def blocks(unet: UNet2DConditionModel) -> list[torch.nn.Module]:
    """The modules whose outputs are matched, paired by position: down blocks, mid, up blocks."""
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def run_with_features(unet: UNet2DConditionModel, noisy, t, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(predicted noise, each block's output feature map)."""
    features: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda module, args, out: features.append(out[0] if isinstance(out, tuple) else out))
             for b in blocks(unet)]
    try:
        return unet(noisy, t, context), features
    finally:
        for hook in hooks:
            hook.remove()


def gram(feature: torch.Tensor) -> torch.Tensor:
    """Cosine similarities between all pairs of positions of a feature map: [B, HW, HW]."""
    flat = F.normalize(feature.flatten(2), dim=1)  # [B, C, HW], unit length along C
    return flat.transpose(1, 2) @ flat


def distill_loss(state: DistillState, tokenizer, alphas_cumprod, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    plan, stage = state.plan, state.plan.loss_at(step)
    noisy, t, context, noise = noisy_batch(state, tokenizer, alphas_cumprod, step, phase="distill")
    weights = loss_weights(alphas_cumprod, plan)[t]
    want_features = stage == "features"
    if want_features:
        predicted, features = run_with_features(state.unet, noisy, t, context)
    else:
        predicted, features = state.unet(noisy, t, context), []
    loss, raw = weighted_mse(predicted, noise, weights)
    parts = {"task": raw.item()}
    if stage in ("soft", "features"):
        with torch.no_grad():
            if want_features:
                taught, teacher_features = run_with_features(state.teacher, noisy, t, context)
            else:
                taught = state.teacher(noisy, t, context)
        soft, raw_soft = weighted_mse(predicted, taught, weights)
        parts["soft"] = raw_soft.item()
        loss = loss + plan.soft_weight * soft
    if want_features:
        feature = sum(F.mse_loss(s, te) for s, te in zip(features, teacher_features))
        loss = loss + plan.feature_weight * feature
        parts["features"] = feature.item()
        if plan.gram_weight:
            similarity = sum(F.mse_loss(gram(s), gram(te)) for s, te in zip(features, teacher_features))
            loss = loss + plan.gram_weight * similarity
            parts["gram"] = similarity.item()
    return loss, parts


# --- training ------------------------------------------------------------------------------

def evaluate(state: DistillState) -> dict:
    plan = state.plan
    accuracy, _ = eval_shapes.evaluate_model(state.student_pipeline(), n=plan.eval_n, steps=plan.eval_steps, seed=4321)
    return {"step": state.step, "n": plan.eval_n, "steps": plan.eval_steps, **{k: round(v, 3) for k, v in accuracy.items()}}


def train(state: DistillState, checkpoint: Path, save_every: float) -> None:
    plan, tokenizer = state.plan, state.teacher_pipe.tokenizer
    alphas_cumprod = sd_alphas_cumprod()
    bar = progress_bar("student", state.step, plan.steps)
    save, smooth = Saver(state, checkpoint, save_every), {}
    if state.step == 0 and plan.eval_every and not state.evals:
        state.evals.append(evaluate(state))  # where each init starts
        print(f"\neval at step 0: {state.evals[-1]}", file=sys.stderr, flush=True)
    while state.step < plan.steps:
        t0 = time.perf_counter()
        if state.step == 0 or plan.loss_at(state.step) != plan.loss_at(state.step - 1):
            print(f"\nstage {plan.loss_at(state.step)} from step {state.step}", file=sys.stderr, flush=True)
        loss, parts = distill_loss(state, tokenizer, alphas_cumprod, state.step)
        optimiser_step(state.opt, loss, plan.lr * cosine(state.step, plan.steps, plan.warmup),
                       clip=state.unet.parameters())
        update_ema(state.ema_unet, state.unet, min(plan.ema_decay, (1 + state.step) / (10 + state.step)))
        state.step += 1
        state.seconds += time.perf_counter() - t0
        smooth = {k: v if k not in smooth else 0.98 * smooth[k] + 0.02 * v for k, v in parts.items()}
        bar.update(state.step, **smooth)
        if plan.eval_every and (state.step % plan.eval_every == 0 or state.step == plan.steps):
            state.evals.append(evaluate(state))
            print(f"\neval at step {state.step}: {state.evals[-1]}", file=sys.stderr, flush=True)
        save(now=state.step == plan.steps)
    bar.close()


def export(state: DistillState, out: Path, card_eval: int) -> dict:
    """Write the EMA student as a pipeline folder beside the teacher's other components, evaluate
    it on the model card's prompts, and write its card. Returns the result."""
    teacher = state.teacher_folder
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(teacher, tmp, ignore=lambda folder, names: [
        n for n in names if (Path(folder) == teacher and n in ("README.md", "samples.png"))
        or (Path(folder) == teacher / "unet" and shrink_unet.is_weight_file(n))])
    (tmp / "unet" / "config.json").write_text(json.dumps(state.student_config, indent=2) + "\n")
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.ema_unet.state_dict().items()},
              tmp / "unet" / "diffusion_pytorch_model.safetensors")
    pipe = Pipeline.from_pretrained(tmp, safety_checker=None)
    accuracy, _ = eval_shapes.evaluate_model(pipe, n=card_eval, steps=25, seed=1234)
    result = {"plan": plan_json(state.plan), "describe": state.plan.describe(), "step": state.step,
              "train_seconds": round(state.seconds), "history": state.history, "evals": state.evals,
              "final": {"n": card_eval, "steps": 25, "seed": 1234, **{k: round(v, 3) for k, v in accuracy.items()}},
              "parameters": {"student": sum(p.numel() for p in pipe.unet.parameters()),
                             "teacher": state.teacher and sum(p.numel() for p in state.teacher.parameters())}}
    (tmp / "README.md").write_text(student_card(state, result))
    shutil.rmtree(out, ignore_errors=True)  # our own earlier export of this work folder
    tmp.rename(out)
    return result


def student_card(state: DistillState, result: dict) -> str:
    final = result["final"]
    row = " | ".join(f"{final[k]:.0%}" for k in (*eval_shapes.JUDGED, "size"))
    evals = "\n".join(f"| {e['step']} | " + " | ".join(f"{e[k]:.0%}" for k in eval_shapes.JUDGED) + " |"
                      for e in state.evals)
    p = state.plan
    return f"""# minisd-shapes student (tools/distill.py)

{about(state, result)} See docs/distillation.md.

Plan: {p.describe()}; batch {p.batch}, AdamW lr {p.lr:g} ({p.warmup} warm-up steps, cosine decay to a
tenth), soft-label weight {p.soft_weight:g}, feature weight {p.feature_weight:g}, Gram weight {p.gram_weight:g},
EMA decay {p.ema_decay} (exported). {result['train_seconds'] / 60:.0f} min of training steps, one thread.
Changes while resuming: {'; '.join(state.history) or 'none'}.

eval_shapes, {final['n']} prompts (seed 1234), 25 steps, guidance 7.5:

| background | colour | shape | position | size |
|---|---|---|---|---|
| {row} |

During training ({p.eval_n} prompts, seed 4321, {p.eval_steps} steps):

| step | background | colour | shape | position |
|---|---|---|---|---|
{evals}
"""


def about(state: DistillState, result: dict) -> str:
    student = f"A layers_per_block=1 UNet (small-sd's layout, {result['parameters']['student']:,} parameters)"
    if state.teacher is None:
        return (f"{student} trained without a teacher on the text encoder, VAE, tokenizer and scheduler of "
                f"`{state.teacher_folder}`, unchanged.")
    return (f"{student} distilled from `{state.teacher_folder}` (layers_per_block="
            f"{state.teacher_config['layers_per_block']}, {result['parameters']['teacher']:,} parameters), whose "
            "text encoder, VAE, tokenizer and scheduler it uses unchanged.")


SMOKE = {"batch": 4, "eval_every": 2, "eval_n": 2, "eval_steps": 2, "warmup": 1}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER,
                   help="the teacher pipeline folder (default: train_shapes --layers-per-block 2's export)")
    p.add_argument("--arm", choices=sorted(ARMS), help="an ablation arm: its init and stages (with --steps)")
    p.add_argument("--steps", type=int, default=1000, help="student steps of the arm (default 1000)")
    p.add_argument("--init", choices=("shrink", "scratch"), help="without --arm: the student's initialisation")
    p.add_argument("--stages", help="without --arm: LOSS:STEPS,... with LOSS one of task, soft, features")
    p.add_argument("--work", type=Path, help="checkpoints, results and the student (default .cache/distill/ARM)")
    p.add_argument("--card-eval", type=int, default=100, help="prompts of the final evaluation (default 100)")
    p.add_argument("--save-every", type=float, default=180, help="seconds between checkpoints (default 180)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--smoke", action="store_true", help="a few steps, in a temporary folder")
    for field in ("lr", "warmup", "batch", "soft_weight", "feature_weight", "gram_weight", "eval_every", "eval_n",
                  "eval_steps", "seed"):
        kind = type(getattr(DistillPlan, field))
        p.add_argument("--" + field.replace("_", "-"), type=kind, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.arm and (args.init or args.stages):
        p.error("--arm sets --init and --stages; give either --arm or those two")
    if not args.arm and not args.stages:
        p.error("give --arm ARM, or --stages (and --init)")
    if args.arm and args.steps < len(ARMS[args.arm][1]):
        p.error(f"--steps must be at least {len(ARMS[args.arm][1])} for arm {args.arm}, not {args.steps}")
    try:
        init, stages = (ARMS[args.arm][0], arm_stages(args.arm, args.steps)) if args.arm else \
            (args.init or "shrink", parse_stages(args.stages))
    except ValueError as e:
        p.error(str(e))
    overrides = {k: getattr(args, k) for k in ("lr", "warmup", "batch", "soft_weight", "feature_weight", "gram_weight",
                                               "eval_every", "eval_n", "eval_steps", "seed") if getattr(args, k) is not None}
    if args.smoke:
        overrides = SMOKE | overrides
        args.card_eval = min(args.card_eval, 2)
        if args.work is None:
            args.work = Path(tempfile.mkdtemp(prefix="minisd-distill-smoke-"))
            atexit.register(shutil.rmtree, args.work, ignore_errors=True)
    if not (args.teacher / "model_index.json").is_file():  # before any training starts
        p.error(f"--teacher {args.teacher}: not a pipeline folder; train one with "
                "`python tools/train_shapes.py --layers-per-block 2`")
    plan = DistillPlan(init=init, stages=stages, **overrides)
    work = args.work or WORK_DIR / (args.arm or "custom")
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(json.dumps({**plan_json(plan), "teacher": str(args.teacher),
                                                "describe": plan.describe()}, indent=2) + "\n")
    try:
        state = DistillState(plan, args.teacher)
    except CheckpointError as e:
        p.error(f"--teacher {args.teacher}: {e}")
    checkpoint = work / "state.pt"
    if checkpoint.exists():
        state.load(checkpoint)
        print(f"resuming from {checkpoint} at step {state.step}/{plan.steps}", file=sys.stderr)
    teacher = f"teacher {sum(x.numel() for x in state.teacher.parameters()):,}" if state.teacher else "no teacher"
    print(f"{plan.describe()}; student {sum(x.numel() for x in state.unet.parameters()):,} parameters, {teacher}",
          file=sys.stderr)
    train(state, checkpoint, args.save_every)
    result = export(state, work / "student", args.card_eval)
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"final ({args.card_eval} prompts, 25 steps): {result['final']}; wrote {work / 'student'}", file=sys.stderr)


if __name__ == "__main__":
    main()
