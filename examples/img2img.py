"""Image-to-image: draw a shape, then redraw it in another colour at rising strengths, and read
the prompt in AUTOMATIC1111's syntax, where (word:1.5) weighs a word.

    python examples/img2img.py             # -> start.png, strength-0.4.png ... strength-1.0.png

Low strengths keep the picture (only the last few steps run, from the image lightly noised);
strength 1 starts from almost pure noise and keeps little but the seed.
"""
from pathlib import Path

import numpy as np
import torch

from minisd import Pipeline

MODEL = Path(__file__).resolve().parents[1] / "weights" / "minisd-shapes"


def main() -> None:
    pipe = Pipeline.from_pretrained(MODEL)
    start = pipe("a large red square on a blue background", generator=torch.Generator().manual_seed(0)).images[0]
    start.save("start.png")
    print("wrote start.png: a large red square on a blue background")
    for strength in (0.4, 0.7, 1.0):
        image = pipe("a large (yellow:1.5) square on a blue background", image=start, strength=strength,
                     prompt_syntax="a1111", generator=torch.Generator().manual_seed(1)).images[0]
        image.save(f"strength-{strength}.png")
        changed = np.abs(np.asarray(image, dtype=int) - np.asarray(start, dtype=int)).mean()
        print(f"wrote strength-{strength}.png: {int(25 * strength)} of 25 steps run, "
              f"mean change {changed:.0f} of 255 levels")


if __name__ == "__main__":
    main()
