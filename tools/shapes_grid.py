"""A grid of minisd-shapes samples with their prompts, for the README and the model card.

    python tools/shapes_grid.py                      # -> weights/minisd-shapes/samples.png
    python tools/shapes_grid.py --model DIR --out grid.png --n 12 --seed 7

Prompts are drawn from tools/shapes.py's grammar (seeded), one image each, 25 steps.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

MODEL = ROOT / "weights" / "minisd-shapes"


def grid(images: list[np.ndarray], captions: list[str], cols: int = 4, scale: int = 2) -> Image.Image:
    """Images (uint8 [H, W, 3]) upscaled `scale` times, each above its wrapped caption."""
    font = ImageFont.load_default()
    h, w = images[0].shape[:2]
    max_lines = 4  # the longest prompts and their seed
    cell_w, text_h, pad = w * scale, 12 * max_lines + 4, 6
    lines = [textwrap.wrap(c, width=max(cell_w // 6, 8))[:max_lines] for c in captions]
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (h * scale + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate(zip(images, lines)):
        x = pad + (i % cols) * (cell_w + pad)
        y = pad + (i // cols) * (h * scale + text_h + pad)
        sheet.paste(Image.fromarray(image).resize((cell_w, h * scale), Image.NEAREST), (x, y))
        for j, line in enumerate(text):
            draw.text((x, y + h * scale + 2 + 12 * j), line, fill="black", font=font)
    return sheet


def write_samples(pipe, out: Path, n: int = 16, seed: int = 2024, steps: int = 25, cols: int = 4) -> None:
    """Draw n prompts from the grammar (seeded), generate one image each, save the grid."""
    import eval_shapes

    texts = [text for text, _ in eval_shapes.prompts(n, seed)]
    seeds = [seed * 1000 + i for i in range(n)]
    images = eval_shapes.generate(pipe, texts, seeds, steps, 7.5)
    grid(list(images), [f"{t} (seed {s})" for t, s in zip(texts, seeds)], cols).save(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--out", type=Path, help="PNG to write (default: MODEL/samples.png)")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--cols", type=int, default=4)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args(argv)

    import torch

    from minisd.pipeline import Pipeline

    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(args.model, safety_checker=None)
    out = args.out or args.model / "samples.png"
    write_samples(pipe, out, args.n, args.seed, args.steps, args.cols)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
