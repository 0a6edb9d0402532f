"""The Pipeline in a few lines: several prompts, a negative prompt, one seed per image; then
the same images with every speed lever off, to see that the levers change speed, not pixels.

    python examples/generate.py            # -> shapes-0.png ... shapes-2.png
"""
import time
from pathlib import Path

import numpy as np
import torch

from minisd import Pipeline, SpeedLevers

MODEL = Path(__file__).resolve().parents[1] / "weights" / "minisd-shapes"
PROMPTS = ["a large red square on a blue background", "a small white circle on the left, black background",
           "purple background, big orange triangle at the bottom"]


def generate(pipe: Pipeline) -> list:
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(PROMPTS))]  # image i: seed i
    start = time.perf_counter()
    images = pipe(PROMPTS, negative_prompt="green", num_inference_steps=25, guidance_scale=7.5,
                  generator=generators).images
    print(f"{len(images)} images in {time.perf_counter() - start:.2f} s")
    return images


def main() -> None:
    fast = generate(Pipeline.from_pretrained(MODEL))
    for i, image in enumerate(fast):
        image.save(f"shapes-{i}.png")
        print(f"wrote shapes-{i}.png: {PROMPTS[i]!r}")

    plain = generate(Pipeline.from_pretrained(MODEL, levers=SpeedLevers.none()))
    diff = max(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() for a, b in zip(fast, plain))
    print(f"largest difference, levers on vs off: {diff} of 255 levels")


if __name__ == "__main__":
    main()
