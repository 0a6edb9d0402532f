"""Train minisd-shapes, the small embedded model, with minisd's own modules, on the CPU.

    python tools/train_shapes.py                  # train (or resume) -> .cache/train_shapes/minisd-shapes/
    python tools/train_shapes.py --export-only    # write that folder from the last training checkpoint
    python tools/train_shapes.py --smoke          # a few steps of each phase, in a temporary folder
    python tools/train_shapes.py --export-only --out weights/minisd-shapes --overwrite
                                                  # to update the shipped model
    python tools/train_shapes.py --layers-per-block 2
                                                  # the teacher tools/distill.py distils (-> .cache/train_shapes-lpb2/)

What is trained (the architecture, the Plan, the checkpointed State) is in
tools/shapes_model.py; how, in three phases (the VAE, the text encoder as CLIP, the UNet), in
tools/train_phases.py; the exported pipeline folder and its model card, in
tools/export_shapes.py. Every Plan field is an option too (`--steps 3000`, `--lr 1e-3`).

A training checkpoint, WORK/state.pt (WORK: --work, default .cache/train_shapes/), is written
every --save-every seconds and at each phase's end; rerunning the command continues from it,
and a Plan changed on resuming is recorded for the model card. The folder goes to --out,
default WORK/minisd-shapes/. A folder that exists and is not empty is replaced only with
--overwrite, and that is checked before training starts, so hours of training never end in a
refusal.

A UNet with another layout (`--layers-per-block 2`, SD v1-4/v1-5's) trains the same way on the
same data, but on the VAE and text encoder of --encoders-from (default: the shipped
weights/minisd-shapes), which are not trained again: so a teacher and its students see the
same latents and text states. Its checkpoints go to .cache/train_shapes-lpb2/ unless --work.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import export_shapes
from minisd.tokenizer import CLIPTokenizer
from shapes_model import CLIP_VOCAB_DIR, Plan, State
from train_phases import measure_scaling_factor, train_clip, train_unet, train_vae, vae_report

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / ".cache" / "train_shapes"
SHIPPED_MODEL = ROOT / "weights" / "minisd-shapes"
SMOKE_PLAN = dict(vae_steps=3, vae_batch=4, clip_steps=3, clip_batch=8, steps=4, batch=4, warmup=2, eval_every=2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="training checkpoints (default .cache/train_shapes; "
                   "with --smoke, a new temporary folder)")
    p.add_argument("--out", type=Path, help="pipeline folder to write (default: WORK/minisd-shapes)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--export-only", action="store_true", help="write --out from the checkpoint and stop")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything, in a temporary folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--card-eval", type=int, default=100, help="prompts the model card's evaluation uses")
    p.add_argument("--encoders-from", type=Path, help="take the VAE and text encoder from this pipeline folder "
                   "instead of training them (default with --layers-per-block other than 1: weights/minisd-shapes)")
    p.add_argument("--save-every", type=float, default=180, help="seconds between checkpoints (default 180)")
    for field in dataclasses.fields(Plan):
        p.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Plan) if getattr(args, f.name) is not None}
    if args.smoke:
        args.card_eval = min(args.card_eval, 4)
        overrides = SMOKE_PLAN | overrides
        if args.work is None:  # its checkpoint is 160 MB: a smoke run in a folder of its own cleans up
            args.work = Path(tempfile.mkdtemp(prefix="minisd-shapes-smoke-"))
            # atexit runs these last first: the folder goes, then the note says so.
            atexit.register(print, f"removed {args.work} (pass --work DIR to keep a smoke run)", file=sys.stderr)
            atexit.register(shutil.rmtree, args.work, ignore_errors=True)
    layers = overrides.get("layers_per_block", 1)
    if layers < 1:
        p.error(f"--layers-per-block must be at least 1, not {layers}")
    if layers != 1:
        args.encoders_from = args.encoders_from or SHIPPED_MODEL
    args.work = args.work or (WORK_DIR if layers == 1 else WORK_DIR.with_name(f"{WORK_DIR.name}-lpb{layers}"))
    args.out = args.out or args.work / "minisd-shapes"
    try:
        export_shapes.refuse_to_replace(args.out, args.overwrite)
    except FileExistsError as e:
        p.error(str(e))

    plan = Plan(**overrides)
    checkpoint = args.work / "state.pt"
    state = State(plan)
    if checkpoint.exists():
        state.load(checkpoint)
        if args.encoders_from and state.encoders_from != str(args.encoders_from.resolve()):
            p.error(f"{checkpoint} was not trained on the encoders of {args.encoders_from}; use another --work")
        print(f"resuming from {checkpoint}: vae step {state.vae_step}/{plan.vae_steps}, "
              f"unet step {state.step}/{plan.steps}", file=sys.stderr)
    elif args.encoders_from:
        state.take_encoders(args.encoders_from)
    tokenizer = CLIPTokenizer.from_folder(CLIP_VOCAB_DIR)
    sizes = {name: sum(p.numel() for p in getattr(state, name).parameters()) for name in ("vae", "text_encoder", "unet")}
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sizes.items()), file=sys.stderr)

    if not args.export_only:
        if state.vae_step < plan.vae_steps:
            train_vae(state, checkpoint, args.save_every)
            state.scaling_factor = None
        if state.scaling_factor is None:
            state.vae.eval()
            state.scaling_factor = measure_scaling_factor(state)
            print(f"scaling_factor {state.scaling_factor:.5f}; vae {vae_report(state)}", file=sys.stderr)
            state.save(checkpoint)
        if state.clip_step < plan.clip_steps:
            train_clip(state, tokenizer, checkpoint, args.save_every)
        train_unet(state, tokenizer, checkpoint, args.save_every)
    elif state.scaling_factor is None:
        raise SystemExit(f"{checkpoint}: the VAE is not trained yet; nothing to export")
    state.vae.eval()
    export_shapes.export(state, args.out, args.card_eval, overwrite=args.overwrite)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
