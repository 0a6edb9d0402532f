"""tools/frontier.py's plot: eval_shapes accuracy against seconds per image, drawn with PIL
(no plotting library needed). Plain DPM-Solver++ is a line through its step counts; each
skipping setting has its own colour; points on the Pareto front are ringed."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"plain": (40, 40, 40), "gate": (214, 39, 40), "cache2-b1": (31, 119, 180), "cache3-b1": (23, 190, 207),
           "gate+cache2-b1": (148, 103, 189), "gate+cache3-b1": (255, 127, 14), "gate60": (140, 86, 75),
           "gate60+cache2-b1": (227, 119, 194), "guidance-stop": (150, 150, 150), "cache2-b0": (188, 189, 34),
           "gate+cache2-b0": (44, 160, 44)}
W, H, LEFT, RIGHT, TOP, BOTTOM = 900, 560, 80, 200, 40, 60


def plot_frontier(points: list[dict], path: Path) -> None:
    xs = [p["s_per_image"] * 1e3 for p in points]
    ys = [p["accuracy"] * 100 for p in points]
    x0, x1 = 0.0, max(xs) * 1.08
    y0, y1 = max(0.0, (min(ys) - 5) // 5 * 5), min(100.0, (max(ys) + 5) // 5 * 5)

    def at(x, y):
        return (LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT), H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM))

    image = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(image)
    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline=(0, 0, 0))
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if x1 / s <= 8)
    for k in range(int(x1 // step) + 1):  # ticks
        x = k * step
        px, _ = at(x, y0)
        d.line([px, H - BOTTOM, px, H - BOTTOM + 5], fill=(0, 0, 0))
        d.text((px - 12, H - BOTTOM + 8), f"{x:.0f}", fill=(0, 0, 0))
    for y in range(int(y0), int(y1) + 1, 5):
        _, py = at(x0, y)
        d.line([LEFT - 5, py, LEFT, py], fill=(0, 0, 0))
        d.text((LEFT - 32, py - 6), f"{y}%", fill=(0, 0, 0))
    d.text(((LEFT + W - RIGHT) / 2 - 60, H - 30), "ms per image (64x64)", fill=(0, 0, 0))
    d.text((10, 12), "eval_shapes accuracy (mean of background, colour, shape, position)", fill=(0, 0, 0))
    plain = sorted((p for p in points if p["setting"] == "plain"), key=lambda p: p["s_per_image"])
    d.line([at(p["s_per_image"] * 1e3, p["accuracy"] * 100) for p in plain], fill=COLOURS["plain"], width=1)
    for p in points:
        x, y = at(p["s_per_image"] * 1e3, p["accuracy"] * 100)
        colour = COLOURS.get(p["setting"], (128, 128, 128))
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        if p.get("pareto"):
            d.ellipse([x - 8, y - 8, x + 8, y + 8], outline=(0, 0, 0), width=2)
        d.text((x + 6, y - 14), str(p["steps"]), fill=colour)
    for k, (name, colour) in enumerate(COLOURS.items()):  # legend
        y = TOP + 10 + 20 * k
        d.ellipse([W - RIGHT + 15, y, W - RIGHT + 23, y + 8], fill=colour)
        d.text((W - RIGHT + 30, y - 2), name, fill=(0, 0, 0))
    y = TOP + 10 + 20 * len(COLOURS)
    d.ellipse([W - RIGHT + 11, y - 4, W - RIGHT + 27, y + 12], outline=(0, 0, 0), width=2)
    d.text((W - RIGHT + 30, y - 2), "Pareto front", fill=(0, 0, 0))
    d.text((W - RIGHT + 15, y + 22), "labels: steps", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
