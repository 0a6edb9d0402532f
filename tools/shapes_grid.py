"""A grid of minisd-shapes samples with their prompts, for the README and the model card.

    python tools/shapes_grid.py                          # weights/minisd-shapes -> ./samples.png
    python tools/shapes_grid.py --model DIR --out grid.png --n 12 --seed 7
    python tools/shapes_grid.py --out weights/minisd-shapes/samples.png --overwrite   # the shipped grid

Prompts are drawn from tools/shapes.py's grammar (seeded), one image each, 25 steps. An
existing file is never replaced without `--overwrite`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import eval_shapes
import shapes
from minisd.pipeline import Pipeline

MODEL = Path(__file__).resolve().parents[1] / "weights" / "minisd-shapes"


def write_samples(pipe: Pipeline, out: Path, n: int = 16, seed: int = 2024, steps: int = 25, cols: int = 4) -> None:
    """Draw n prompts from the grammar (seeded), generate one image each, save the grid."""
    texts = [text for text, _ in shapes.prompts(n, seed)]
    seeds = [seed * 1000 + i for i in range(n)]
    images = eval_shapes.generate(pipe, texts, seeds, steps, 7.5)
    shapes.grid(list(images), [f"{t} (seed {s})" for t, s in zip(texts, seeds)], cols).save(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=MODEL, help="pipeline folder (default: weights/minisd-shapes)")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG to write (default: ./samples.png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        p.error(f"--out: {args.out} exists; choose another name or pass --overwrite")

    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(args.model, safety_checker=None)
    write_samples(pipe, args.out, args.n, args.seed, args.steps, args.cols)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
