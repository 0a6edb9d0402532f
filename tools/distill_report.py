"""Gather tools/distill.py's ablation: the table, the plot of accuracy over training, and the timing.

    python tools/distill_report.py                      # print the table from .cache/distill/*/
    python tools/distill_report.py --write --overwrite  # also docs/distillation.json and the plot

Each arm's WORK/result.json holds its evaluations over training (50 prompts, seed 4321) and the
final one (the model card's 100 prompts, seed 1234, 25 steps, guidance 7.5). Beside the arms,
this evaluates the teacher and the shipped model (weights/minisd-shapes) on those same 100
prompts and seeds, and times one 25-step image of teacher and student (batch 1, one thread,
alternating runs in one process, median of --repeats): the parameters and s/image rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import eval_shapes
from minisd.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
ARMS_DIR = ROOT / ".cache" / "distill"
ARM_ORDER = ("scratch", "shrink", "soft", "features", "card")
SHIPPED = ROOT / "weights" / "minisd-shapes"
TEACHER = ROOT / ".cache" / "train_shapes-lpb2" / "minisd-shapes"
JSON_OUT, PLOT_OUT = ROOT / "docs" / "distillation.json", ROOT / "docs" / "figures" / "distillation.png"
COLOURS = {"scratch": (40, 40, 40), "shrink": (31, 119, 180), "soft": (44, 160, 44), "features": (214, 39, 40),
           "features+gram": (255, 127, 14), "card": (148, 103, 189)}
METRICS = (*eval_shapes.JUDGED, "size")


def mean_accuracy(result: dict) -> float:
    """The plot's and the table's one number: the mean of background, colour, shape, position."""
    return statistics.mean(result[k] for k in eval_shapes.JUDGED)


def final_eval(folder: Path, n: int) -> dict:
    accuracy, _ = eval_shapes.evaluate_model(folder, n=n, steps=25, seed=1234)
    return {"n": n, "steps": 25, "seed": 1234, **{k: round(v, 3) for k, v in accuracy.items()}}


def seconds_per_image(folders: dict[str, Path], repeats: int) -> dict[str, float]:
    """Median seconds of one 25-step image per pipeline, the pipelines taking turns."""
    pipes = {name: Pipeline.from_pretrained(folder, safety_checker=None) for name, folder in folders.items()}
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for r in range(repeats + 1):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe("a red circle on a blue background", num_inference_steps=25, generator=torch.Generator().manual_seed(r))
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t), 4) for name, t in times.items()}


def plot(arms: dict[str, dict], path: Path) -> None:
    """Accuracy (mean of the four judged facts, 50 prompts) against student steps, one line per arm."""
    W, H, LEFT, RIGHT, TOP, BOTTOM = 820, 480, 70, 150, 40, 60
    steps = max(e["step"] for a in arms.values() for e in a["evals"])

    def at(step, accuracy):
        return (LEFT + step / steps * (W - LEFT - RIGHT), H - BOTTOM - accuracy * (H - TOP - BOTTOM))

    image = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(image)
    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline=(0, 0, 0))
    for k in range(0, 101, 10):
        _, y = at(0, k / 100)
        d.line([LEFT - 5, y, LEFT, y], fill=(0, 0, 0))
        d.text((LEFT - 38, y - 6), f"{k}%", fill=(0, 0, 0))
    tick = next(s for s in (50, 100, 250, 500, 1000, 2500) if steps / s <= 10)
    for s in range(0, steps + 1, tick):
        x, _ = at(s, 0)
        d.line([x, H - BOTTOM, x, H - BOTTOM + 5], fill=(0, 0, 0))
        d.text((x - 12, H - BOTTOM + 8), str(s), fill=(0, 0, 0))
    d.text(((LEFT + W - RIGHT) / 2 - 40, H - 30), "student steps", fill=(0, 0, 0))
    d.text((10, 12), "eval_shapes accuracy during training (mean of background, colour, shape, position; "
                     "50 prompts, 25 steps)", fill=(0, 0, 0))
    for k, (name, arm) in enumerate(arms.items()):
        colour = COLOURS.get(name, (128, 128, 128))
        points = [at(e["step"], mean_accuracy(e)) for e in arm["evals"]]
        d.line(points, fill=colour, width=2)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        y = TOP + 10 + 20 * k
        d.line([W - RIGHT + 12, y + 5, W - RIGHT + 30, y + 5], fill=colour, width=3)
        d.text((W - RIGHT + 36, y - 1), name, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def table(report: dict) -> str:
    row = lambda r: " | ".join(f"{r[k]:.0%}" for k in METRICS) + f" | {mean_accuracy(r):.1%}"
    lines = ["| model | what | background | colour | shape | position | size | mean of 4 |",
             "|---|---|---|---|---|---|---|---|"]
    lines.append(f"| shipped | {report['shipped']['what']} | {row(report['shipped']['final'])} |")
    lines.append(f"| teacher | {report['teacher']['what']} | {row(report['teacher']['final'])} |")
    for name, arm in report["arms"].items():
        lines.append(f"| {name} | {arm['describe']}, {arm['train_seconds'] / 60:.0f} min | {row(arm['final'])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", type=Path, default=ARMS_DIR, help="the folder of the arms' work folders")
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--card-eval", type=int, default=100, help="prompts of the final evaluations (default 100, "
                   "as the arms' own)")
    p.add_argument("--repeats", type=int, default=5, help="timed images per model (default 5)")
    p.add_argument("--write", action="store_true", help=f"write {JSON_OUT.relative_to(ROOT)} and the plot")
    p.add_argument("--overwrite", action="store_true", help="with --write: replace those files if they exist")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.write and not args.overwrite and (JSON_OUT.exists() or PLOT_OUT.exists()):
        p.error(f"{JSON_OUT.relative_to(ROOT)} or {PLOT_OUT.relative_to(ROOT)} exists; pass --overwrite to replace them")
    names = [n for n in ARM_ORDER if (args.arms / n / "result.json").is_file()]
    names += sorted(d.name for d in args.arms.iterdir() if (d / "result.json").is_file() and d.name not in names) \
        if args.arms.is_dir() else []
    if not names:
        p.error(f"no finished arms (result.json) under {args.arms}; run tools/distill.py --arm ARM first")
    arms = {n: json.loads((args.arms / n / "result.json").read_text()) for n in names}
    print(f"evaluating the shipped model and the teacher on the same {args.card_eval} prompts ...", file=sys.stderr)
    student_folder = args.arms / names[0] / "student"
    timing = seconds_per_image({"teacher": args.teacher, "student": student_folder}, args.repeats)
    count = lambda folder: sum(x.numel() for x in Pipeline.from_pretrained(folder, safety_checker=None).unet.parameters())
    report = {
        "shipped": {"what": "layers_per_block 1, 6000 steps from scratch (its model card)", "final": final_eval(SHIPPED, args.card_eval)},
        "teacher": {"what": "layers_per_block 2, train_shapes --layers-per-block 2", "final": final_eval(args.teacher, args.card_eval),
                    "unet_parameters": count(args.teacher), "s_per_image": timing["teacher"]},
        "student": {"unet_parameters": count(student_folder), "s_per_image": timing["student"]},
        "arms": {n: {k: arms[n][k] for k in ("describe", "plan", "train_seconds", "evals", "final", "history")}
                 for n in names},
        "machine": f"{torch.__version__}, 1 thread",
    }
    print(table(report))
    print(f"\nteacher UNet {report['teacher']['unet_parameters']:,} parameters, {timing['teacher']:.3f} s/image; "
          f"student UNet {report['student']['unet_parameters']:,}, {timing['student']:.3f} s/image "
          f"({timing['student'] / timing['teacher']:.2f}x); 25 steps, 64x64, batch 1, one thread")
    if args.write:
        JSON_OUT.write_text(json.dumps(report, indent=2) + "\n")
        plot(report["arms"], PLOT_OUT)
        print(f"wrote {JSON_OUT.relative_to(ROOT)}, {PLOT_OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
