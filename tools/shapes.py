"""An endless, seeded data set of captioned 64x64 images: one flat shape on a flat background.

Each sample is a `Scene` (the ground truth), the caption a small grammar says for it, and
the image drawn from it. The grammar varies the wording, never the facts: every caption
names the shape, its colour and the background colour; the size word is sometimes left
out (then either size is drawn), and a caption without a position means the centre.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> images, captions, scenes = batch(rng, 2)
    >>> images.shape, images.dtype
    ((2, 64, 64, 3), dtype('uint8'))
    >>> captions[0]                                            # doctest: +SKIP
    'blue background, large yellow triangle at the top'

Reading a caption back (`parse_caption`), drawing prompts with their truths (`prompts`) and
laying images out with their captions (`grid`) live here too, beside the grammar they
follow. tools/train_shapes.py trains minisd-shapes on this world; tools/eval_shapes.py
judges images against it; `python tools/shapes.py out.png` writes a sheet of samples.
"""
from __future__ import annotations

import argparse
import re
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 64  # image side in pixels
COLOURS = {  # well apart in RGB, so a pixel's nearest named colour is a fair judge
    "red": (220, 40, 40),
    "orange": (250, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 18, "large": 34}  # side / diameter in pixels, before jitter
POSITIONS = {  # centre of the shape's bounding box, as a fraction of the image side
    "centre": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}

# The grammar. {obj} is "[size] colour shape", {where} a position phrase (may be empty).
TEMPLATES = (
    "{a} {obj}{where} on {a_bg} {bg} background",
    "{bg} background, {obj}{where}",
    "{a} {obj}{where}, {bg} background",
    "{a_bg} {bg} background with {a} {obj}{where}",
    "{obj}{where} against {a_bg} {bg} background",
)
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
WHERE = {
    "centre": ("", " in the centre", " in the middle"),
    "left": (" on the left", " at the left"),
    "right": (" on the right", " at the right"),
    "top": (" at the top",),
    "bottom": (" at the bottom",),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str
    # Where exactly it is drawn (pixels): box centre and side, after jitter.
    cx: float = SIZE / 2
    cy: float = SIZE / 2
    side: float = SIZES["large"]

    def attributes(self) -> dict[str, str]:
        """The facts a caption states and tools/eval_shapes.py judges."""
        return {k: v for k, v in asdict(self).items() if k in ATTRIBUTES}


ATTRIBUTES = ("background", "colour", "shape", "position", "size")


def sample_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = ("small", "large")[rng.integers(2)]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    side = SIZES[size] + rng.uniform(-2, 2)
    fx, fy = POSITIONS[position]
    cx, cy = fx * SIZE + rng.uniform(-2.5, 2.5), fy * SIZE + rng.uniform(-2.5, 2.5)
    half = side / 2  # keep the whole shape inside the image
    cx, cy = float(np.clip(cx, half + 1, SIZE - half - 1)), float(np.clip(cy, half + 1, SIZE - half - 1))
    return Scene(shape, str(colour), str(background), size, position, cx, cy, side)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of the grammar's captions for `scene`, chosen by `rng`."""
    words = [scene.colour, scene.shape]
    if rng.random() < 0.75:  # sometimes leave the size out
        options = SIZE_WORDS[scene.size]
        words.insert(0, options[rng.integers(len(options))])
    obj = " ".join(words)
    wheres = WHERE[scene.position]
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return template.format(a=_article(obj), obj=obj, where=wheres[rng.integers(len(wheres))],
                           bg=scene.background, a_bg=_article(scene.background))


def shape_polygon(shape: str, cx: float, cy: float, w: float, h: float) -> list[tuple[float, float]] | None:
    """Outline of `shape` filling the box (cx, cy, w, h); None for a circle (an ellipse)."""
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":  # upright, apex at the top
        return [(cx, y0), (x1, y1), (x0, y1)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, w: float, h: float,
               fill, scale: int = 1) -> None:
    s = scale
    polygon = shape_polygon(shape, cx, cy, w, h)
    if polygon is None:
        draw.ellipse([(cx - w / 2) * s, (cy - h / 2) * s, (cx + w / 2) * s - 1, (cy + h / 2) * s - 1], fill=fill)
    else:
        draw.polygon([(x * s, y * s) for x, y in polygon], fill=fill)


def render(scene: Scene, supersample: int = 4) -> np.ndarray:
    """The scene as uint8 [64, 64, 3], anti-aliased by drawing 4x larger and averaging."""
    s = supersample
    image = Image.new("RGB", (SIZE * s, SIZE * s), COLOURS[scene.background])
    draw_shape(ImageDraw.Draw(image), scene.shape, scene.cx, scene.cy, scene.side, scene.side,
               COLOURS[scene.colour], scale=s)
    return np.asarray(image.resize((SIZE, SIZE), Image.BOX))


def sample(rng: np.random.Generator) -> tuple[str, Scene]:
    """A fresh (caption, scene) pair: what a prompt for the model is drawn from."""
    scene = sample_scene(rng)
    return caption(scene, rng), scene


def batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n samples: images uint8 [n, 64, 64, 3], their captions and their scenes."""
    pairs = [sample(rng) for _ in range(n)]
    images = np.stack([render(scene) for _, scene in pairs])
    return images, [c for c, _ in pairs], [s for _, s in pairs]


def parse_caption(text: str) -> dict[str, str | None]:
    """The facts a caption of the grammar states (size None when it names none).

    >>> parse_caption("blue background, large yellow triangle at the top")
    {'background': 'blue', 'colour': 'yellow', 'shape': 'triangle', 'position': 'top', 'size': 'large'}
    """
    words = re.findall(r"[a-z]+", text.lower())
    facts: dict[str, str | None] = {"background": None, "colour": None, "shape": None,
                                    "position": "centre", "size": None}
    for i, word in enumerate(words):
        before = words[i - 1] if i else ""
        if word == "background" and before in COLOURS:
            facts["background"] = before
        elif word in SHAPES:
            facts["shape"] = word
            if before in COLOURS:
                facts["colour"] = before
        elif word in ("left", "right", "top", "bottom"):
            facts["position"] = word
        for size, synonyms in SIZE_WORDS.items():
            if word in synonyms:
                facts["size"] = size
    return facts


def prompts(n: int, seed: int) -> list[tuple[str, dict]]:
    """n captions drawn from the grammar with their true attributes, size only where stated."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text, scene = sample(rng)
        truth = scene.attributes()
        truth["size"] = parse_caption(text)["size"]
        out.append((text, truth))
    return out


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a sheet of data set samples with their captions.")
    p.add_argument("output", type=Path, help="PNG to write")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    images, captions, _ = batch(np.random.default_rng(args.seed), args.n)
    grid(list(images), captions).save(args.output)
    for c in captions:
        print(c)


if __name__ == "__main__":
    main()
