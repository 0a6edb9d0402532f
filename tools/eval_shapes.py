"""Judge images of the shapes world with plain pixel analysis: does the image show what its
caption says?

    python tools/eval_shapes.py --model weights/minisd-shapes --n 100 --steps 25 --seed 1234
    python tools/eval_shapes.py --images out/        # PNGs written by `minisd generate`

The first form draws n captions from tools/shapes.py's grammar, generates one image each
with minisd's Pipeline (fresh seeds) and prints the accuracy of each judged attribute; the
second reads the prompt back from each PNG's `parameters` chunk.

How an image is judged (`judge`), for a 64x64 picture of one flat shape on a flat ground:
  background  every pixel is named by its nearest colour in shapes.COLOURS; the background
              is the commonest name along the image border.
  colour      the pixels not named as the background form the shape mask (its largest
              4-connected piece); the shape's colour is the commonest name inside it.
  shape       the mask's bounding box is filled with a circle, a square and a triangle in
              turn; the one that overlaps the mask best (intersection over union) wins.
  position    the bounding box's centre: within 11.5% of the side from the image centre is
              "centre", else the axis with the larger offset says left/right/top/bottom.
  size        the bounding box's longer side: over 26/64 of the image side is "large".
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import shapes
from minisd.pipeline import Pipeline

NAMES = list(shapes.COLOURS)
PALETTE = np.array([shapes.COLOURS[n] for n in NAMES], dtype=np.float32)
JUDGED = ("background", "colour", "shape", "position")  # what the model is judged on; size is extra
MIN_AREA = 12  # pixels (at 64x64): a smaller mask is noise, not a shape
CENTRE_RADIUS = 0.115  # of the image side; the positions lie 0.23 from the centre
LARGE_SIDE = 26 / 64  # of the image side; small shapes are 16..20 px, large 32..36


def colour_names(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> index of the nearest named colour per pixel, [H, W]."""
    d = ((image.astype(np.float32)[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a flood fill; images are small)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, region = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def shape_template(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Boolean mask of `shape` filling the pixel box (x0, y0, x1, y1), inclusive."""
    x0, y0, x1, y1 = box
    s = 4
    canvas = Image.new("L", (size[1] * s, size[0] * s), 0)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    shapes.draw_shape(ImageDraw.Draw(canvas), shape, x0 + w / 2, y0 + h / 2, w, h, 255, scale=s)
    return np.asarray(canvas.resize((size[1], size[0]), Image.BOX)) >= 128


def judge(image: np.ndarray) -> dict[str, str | None]:
    """What one image shows: background, colour, shape, position, size (None: no shape found)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:  # floats in [0, 1], as the pipeline's 'np' output
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    h, w = image.shape[:2]
    names = colour_names(image)
    border = np.concatenate([names[:2].ravel(), names[-2:].ravel(), names[:, :2].ravel(), names[:, -2:].ravel()])
    background = Counter(border.tolist()).most_common(1)[0][0]
    verdict: dict[str, str | None] = {"background": NAMES[background], "colour": None, "shape": None,
                                      "position": None, "size": None}
    mask = largest_component(names != background)
    if mask.sum() < MIN_AREA * (h * w) / 64**2:
        return verdict
    verdict["colour"] = NAMES[Counter(names[mask].tolist()).most_common(1)[0][0]]

    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    ious = {}
    for kind in shapes.SHAPES:
        template = shape_template(kind, box, (h, w))
        ious[kind] = (template & mask).sum() / max((template | mask).sum(), 1)
    verdict["shape"] = max(ious, key=ious.get)

    dx = ((box[0] + box[2] + 1) / 2 - w / 2) / w
    dy = ((box[1] + box[3] + 1) / 2 - h / 2) / h
    if max(abs(dx), abs(dy)) < CENTRE_RADIUS:
        verdict["position"] = "centre"
    elif abs(dx) > abs(dy):
        verdict["position"] = "left" if dx < 0 else "right"
    else:
        verdict["position"] = "top" if dy < 0 else "bottom"
    side = max(box[2] - box[0] + 1, box[3] - box[1] + 1) / max(h, w)
    verdict["size"] = "large" if side > LARGE_SIDE else "small"
    return verdict


def score(images, truths: list[dict]) -> tuple[dict[str, float], list[dict]]:
    """Accuracy per attribute over images and their true attributes (a fact that is None
    in the truth, like an unstated size, is not judged), and the verdicts."""
    verdicts = [judge(image) for image in images]
    accuracy = {}
    for key in (*JUDGED, "size"):
        pairs = [(v[key], t[key]) for v, t in zip(verdicts, truths) if t.get(key) is not None]
        accuracy[key] = sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")
    return accuracy, verdicts


def generate(pipe, texts: list[str], seeds: list[int], steps: int, guidance: float, batch: int = 10) -> np.ndarray:
    """One image per prompt, image i from its own CPU generator seeded seeds[i]: uint8 [n, H, W, 3]."""
    images = []
    for i in range(0, len(texts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        out = pipe(texts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="np").images
        images.append((out * 255).round().astype(np.uint8))
    return np.concatenate(images)


def evaluate_model(model, n: int = 100, steps: int = 25, seed: int = 1234, guidance: float = 7.5,
                   save_dir: Path | None = None) -> tuple[dict[str, float], list[tuple[str, dict, dict]]]:
    """Generate n grammar prompts with `model` (a folder or a minisd Pipeline) and score them.
    Prompts come from `seed`, the noise of image i from seed 10**6 + seed * 1000 + i."""
    pipe = model if isinstance(model, Pipeline) else Pipeline.from_pretrained(model, safety_checker=None)
    cases = shapes.prompts(n, seed)
    texts = [t for t, _ in cases]
    images = generate(pipe, texts, [10**6 + seed * 1000 + i for i in range(n)], steps, guidance)
    accuracy, verdicts = score(images, [t for _, t in cases])
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        for i, (image, text) in enumerate(zip(images, texts)):
            Image.fromarray(image).save(save_dir / f"{i:03d}.png")
        (save_dir / "prompts.txt").write_text("\n".join(texts) + "\n")
    return accuracy, [(text, truth, v) for (text, truth), v in zip(cases, verdicts)]


def model_name(folder: Path) -> str:
    """A model folder as reports and model cards name it: relative to the repository when inside
    it, so that what is committed does not name this machine's paths."""
    root = Path(__file__).resolve().parents[1]
    folder = Path(folder).resolve()
    return str(folder.relative_to(root)) if folder.is_relative_to(root) else str(folder)


def read_images(folder: Path) -> tuple[list[np.ndarray], list[dict], list[str]]:
    """PNGs with a `parameters` chunk (as `minisd generate` writes): images, truths, prompts."""
    images, truths, texts = [], [], []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as im:
            text = im.text.get("parameters", "").split("\n")[0]
            if not text:
                continue
            images.append(np.asarray(im.convert("RGB")))
        texts.append(text)
        truths.append(shapes.parse_caption(text))
    return images, truths, texts


def report(accuracy: dict[str, float], n: int) -> str:
    return "\n".join(f"{key:<11} {accuracy[key]:7.1%}" + ("" if key in JUDGED else "  (only where stated)")
                     for key in (*JUDGED, "size")) + f"\n({n} images)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "weights" / "minisd-shapes",
                     help="pipeline folder to generate with (default: weights/minisd-shapes)")
    src.add_argument("--images", type=Path, help="judge the PNGs in this folder instead of generating")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save", type=Path, help="also write the generated images (and prompts.txt) here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--int8", action="store_true", help="quantize the UNet to int8 (Pipeline quantize=\"int8\")")
    p.add_argument("--calibrate-on", choices=["default", "shapes"], default="default",
                   help="int8 calibration prompts: minisd's default ones, or 4 shapes prompts (seed 99, "
                        "none of the evaluated ones)")
    p.add_argument("--compile", action="store_true", help="Pipeline compile=True")
    p.add_argument("-v", "--verbose", action="store_true", help="print each wrong verdict")
    args = p.parse_args(argv)

    if args.images:
        images, truths, texts = read_images(args.images)
        if not images:
            p.error(f"no PNG with a 'parameters' chunk in {args.images}")
        accuracy, verdicts = score(images, truths)
        rows = list(zip(texts, truths, verdicts))
    else:
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        calibration = [t for t, _ in shapes.prompts(4, 99)] if args.calibrate_on == "shapes" else None
        pipe = Pipeline.from_pretrained(args.model, safety_checker=None, dtype=getattr(torch, args.dtype),
                                        quantize="int8" if args.int8 else None, calibration_prompts=calibration,
                                        compile=args.compile)
        accuracy, rows = evaluate_model(pipe, args.n, args.steps, args.seed, args.guidance, args.save)
        print(f"generated {args.n} images, {args.steps} steps, in {time.perf_counter() - start:.1f}s")
    if args.verbose:
        for text, truth, verdict in rows:
            wrong = [f"{k}: {verdict[k]} (wanted {truth[k]})" for k in JUDGED if verdict[k] != truth[k]]
            if wrong:
                print(f"{text!r}: " + "; ".join(wrong))
    print(report(accuracy, len(rows)))


if __name__ == "__main__":
    main()
