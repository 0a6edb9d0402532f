"""The figures of docs/walkthrough.md, drawn from the shipped model weights/minisd-shapes.

    python tools/walkthrough_figures.py                  # -> docs/figures/*.png (never replaces them)
    python tools/walkthrough_figures.py --out /tmp/figs  # elsewhere; --overwrite replaces the shipped ones

    denoising.png        x_t after each step, decoded; beneath, the model's x0 prediction at each step
    cross_attention.png  where the UNet looks when it reads a word (hooks on every `attn2`)
    sigmas.png           DPM-Solver++'s sigmas for 10 and 25 steps, and the 1000 training sigmas

The first two come from one generation (PROMPT, SEED, 10 steps, guidance 7.5; one CPU thread,
a second): Pipeline.__call__'s loop written out with the components. Before anything is
written, its final frame is checked against Pipeline's image: the strip is the pipeline's.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from minisd import Pipeline, load_scheduler, load_text_encoder, load_tokenizer, load_unet, load_vae
from minisd.unet import Attention

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "minisd-shapes"
# eval_shapes.judge finds this drawn right at seeds 0-5 (10 steps, 7.5); "small" came out orange.
PROMPT = "a large yellow triangle at the top on a purple background"
SEED, STEPS, GUIDANCE = 0, 10, 7.5
WORDS = ("yellow", "triangle", "top", "the", "purple")  # cross-attention maps; "the" is a control
FIGURES = ("denoising", "sigmas", "cross_attention")  # <out>/<name>.png
PARITY_TOL = 1e-4  # max |figure's final frame - Pipeline's image|, on [0, 1] images
# The heat maps' colours, low to high: black, purple, red, orange, pale yellow (like matplotlib's inferno).
HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
STRIP_CELL = 96  # px per frame of the strip: 1.5x, so that 11 frames fit a page (~1150 px)


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: ASCII only, so "sigma", not Greek


@dataclass
class Generation:  # what one generation leaves for the figures
    timesteps: list[int]
    frames: list[torch.Tensor]  # decoded x_t in [0, 1], [3, H, W]: the start, then after each step
    x0s: list[torch.Tensor]  # decoded x0 prediction at each step, [3, H, W]
    attention: dict[int, torch.Tensor]  # latent side of a level (8, 4) -> mean probs [77, h, w]
    ids: list[int]  # the prompt's token ids


def record_cross_attention(unet, size: tuple[int, int]) -> dict[int, list[torch.Tensor]]:
    """Hook every cross-attention layer of `unet` (for good: the UNet is the caller's own):
    each call appends, under its level's latent side, its attention probabilities for the
    conditional half of the CFG batch, averaged over heads and upsampled to `size`: [77, *size]."""
    maps: dict[int, list[torch.Tensor]] = {}

    def hook(attn: Attention, args):  # runs before the layer, which then runs as usual
        x, context = args  # [2, h*w, C] pixels (normed), [2, 77, D] text: [unconditional; conditional]
        q, k = (rearrange(t, "b n (h d) -> b h n d", h=attn.heads) for t in (attn.to_q(x), attn.to_k(context)))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [2, heads, h*w, 77]
        side = math.isqrt(x.shape[1])  # minisd-shapes' latents are square
        cond = rearrange(probs[1].mean(0), "(h w) k -> k h w", h=side)  # conditional half, heads averaged
        maps.setdefault(side, []).append(F.interpolate(cond[None], size=size, mode="bilinear")[0])

    layers = [m.attn2 for m in unet.modules() if hasattr(m, "attn2")]
    assert all(type(a) is Attention for a in layers), "the hook reads the plain Attention: load without levers"
    for attn in layers:
        attn.register_forward_pre_hook(hook)
    return maps


@torch.no_grad()
def generate(model: Path, prompt: str = PROMPT, seed: int = SEED, steps: int = STEPS,
             guidance: float = GUIDANCE) -> Generation:
    """Pipeline.__call__'s loop written out with the components (loaded without speed levers,
    so every attn2 is the plain Attention the hooks read), keeping what the figures show."""
    tokenizer, text_encoder, unet = load_tokenizer(model), load_text_encoder(model), load_unet(model)
    vae, scheduler = load_vae(model), load_scheduler(model)
    decode = lambda z: (vae.decode(z / vae.scaling_factor)[0] / 2 + 0.5).clamp(0, 1)  # noqa: E731
    ids = tokenizer(prompt)
    context = torch.cat([text_encoder(tokenizer("")), text_encoder(ids)])  # CFG: [unconditional; conditional]
    scheduler.set_timesteps(steps)
    side = unet.config.sample_size  # Pipeline's default size
    latents = torch.randn((1, unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(seed))
    latents = latents * scheduler.init_noise_sigma
    attention = record_cross_attention(unet, (side, side))
    frames, x0s = [decode(latents)], []
    for i, t in enumerate(scheduler.timesteps):
        uncond, cond = unet(scheduler.scale_model_input(torch.cat([latents] * 2), t), t, context).chunk(2)
        eps = uncond + guidance * (cond - uncond)
        # x_t = alpha_t x0 + sigma_t eps, and scheduler.sigmas holds sigma_t / alpha_t (VE):
        s = scheduler.sigmas[i]
        alpha_t, sigma_t = 1 / (s**2 + 1) ** 0.5, s / (s**2 + 1) ** 0.5
        x0s.append(decode((latents - sigma_t * eps) / alpha_t))
        latents = scheduler.step(eps, t, latents)
        frames.append(decode(latents))
    means = {level: torch.stack(maps).mean(0) for level, maps in attention.items()}  # over layers and steps
    return Generation(scheduler.timesteps.tolist(), frames, x0s, means, ids[0].tolist())


def to_pil(image: torch.Tensor, side: int) -> Image.Image:
    """[3, H, W] in [0, 1] -> a side x side PIL image, upscaled nearest (the pixels stay visible)."""
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array).resize((side, side), Image.NEAREST)


def text_centred(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, size: int, fill="black") -> None:
    draw.text((x, y), text, font=font(size), anchor="ma", fill=fill)


def denoising_figure(gen: Generation, prompt: str = PROMPT, seed: int = SEED,
                     guidance: float = GUIDANCE) -> Image.Image:
    """Two rows: decoded x_t at the start and after each step; below each, the x0 predicted from it."""
    cell, gap, pad, n = STRIP_CELL, 6, 14, len(gen.frames)
    fig = Image.new("RGB", (2 * pad + n * cell + (n - 1) * gap, 2 * cell + 186), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((pad, 10), f'"{prompt}"   seed {seed}, {n - 1} DPM-Solver++ steps, guidance {guidance:g}',
              font=font(19), fill="black")
    rows = ((("x_t: the latents at the start (pure noise) and after each step, decoded by the VAE",), gen.frames,
             [f"t = {t}" for t in gen.timesteps] + ["t = 0 (final)"]),
            # Checked: the conditional x0 alone keeps its colours from the first step on; the
            # swings are guidance multiplying (cond - uncond), which is large at high noise.
            (("predicted x0 = (x_t - sigma_t * eps) / alpha_t at each step, decoded: the shape and its place show "
              "from the first step;", f"the colours swing at high noise, where guidance {guidance:g} multiplies the "
              "difference between the conditional and the unconditional prediction"), gen.x0s,
             [f"from t = {t}" for t in gen.timesteps]))
    y = 44
    for lines, images, row_labels in rows:
        for line in lines:
            draw.text((pad, y), line, font=font(15), fill=(60, 60, 60))
            y += 19
        for j, (image, label) in enumerate(zip(images, row_labels)):
            x = pad + j * (cell + gap)
            fig.paste(to_pil(image, cell), (x, y + 3))
            text_centred(draw, x + cell / 2, y + 7 + cell, label, 14)
        y += cell + 42
    # Under the final frame: the last step goes to sigma 0, where DPM-Solver++'s first-order
    # update is x0 itself, so the image is the last prediction.
    for i, line in enumerate(("the last step", "(to sigma 0)", "returns its x0", "prediction as", "the image")):
        text_centred(draw, pad + (n - 1) * (cell + gap) + cell / 2, y - cell - 30 + 18 * i, line, 13, (90, 90, 90))
    return fig


def attention_map(gen: Generation, word: str, tokenizer, levels: list[int], side: int) -> np.ndarray:
    """The word's attention probability (summed over its tokens, averaged over `levels`),
    upsampled bilinear to side x side."""
    positions = [i for i, token in enumerate(gen.ids) if tokenizer.decode([token]).strip() == word]
    assert positions, f"{word!r} is not a token of the prompt"
    probs = sum(gen.attention[level][positions].sum(0) for level in levels) / len(levels)
    return F.interpolate(probs[None, None], size=(side, side), mode="bilinear")[0, 0].numpy()


def outline(image: torch.Tensor, side: int) -> np.ndarray:
    """Boolean [side, side]: the edge of the pixels that differ from the background (the median
    colour along the border), to mark the shape's place on the heat maps."""
    rgb = image.permute(1, 2, 0).numpy()
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    mask = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1) > 0.25
    mask = Image.fromarray(mask).convert("L").resize((side, side), Image.NEAREST)
    return np.array(mask.filter(ImageFilter.FIND_EDGES)) > 0


def attention_figure(gen: Generation, tokenizer, words=WORDS, prompt: str = PROMPT) -> Image.Image:
    """The final image, then one heat map per word with the shape's outline; a row with both
    resolution levels averaged and a row with the sharper 8x8 level alone."""
    cell, gap, pad = 160, 12, 14
    final, edge = gen.frames[-1], outline(gen.frames[-1], cell)
    rows = (("8x8 and 4x4 levels", sorted(gen.attention)), ("8x8 level only", [max(gen.attention)]))
    fig = Image.new("RGB", (2 * pad + (len(words) + 1) * (cell + gap) - gap, 96 + 2 * (cell + 48)), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((pad, 10), f'Cross-attention to the words of "{prompt}"', font=font(19), fill="black")
    for i, line in enumerate((
            "softmax(q k^T / sqrt(d)) for the word's token, conditional half of the CFG batch, averaged over heads, "
            "layers and the denoising steps;", "each map stretched from its lowest to its highest probability "
            "(the range under it). The text encoder is causal, so a later token such as", '"the" also carries '
            "the words before it and points at the shape too; the white line is the shape's outline.")):
        draw.text((pad, 34 + 17 * i), line, font=font(14), fill=(60, 60, 60))
    for r, (row_name, levels) in enumerate(rows):
        y = 96 + r * (cell + 48)
        fig.paste(to_pil(final, cell), (pad, y))
        text_centred(draw, pad + cell / 2, y + cell + 4, "the final image", 14)
        text_centred(draw, pad + cell / 2, y + cell + 22, f"row: {row_name}", 13, (90, 90, 90))
        for j, word in enumerate(words, start=1):
            probs = attention_map(gen, word, tokenizer, levels, cell)
            stretched = (probs - probs.min()) / (probs.max() - probs.min())
            hot = np.stack([np.interp(stretched, np.linspace(0, 1, len(HEAT)), c) for c in HEAT.T], -1).astype(np.uint8)
            hot[edge] = 255
            x = pad + j * (cell + gap)
            fig.paste(Image.fromarray(hot), (x, y))
            text_centred(draw, x + cell / 2, y + cell + 4, f'"{word}"', 15)
            text_centred(draw, x + cell / 2, y + cell + 22, f"p {probs.min():.3f} to {probs.max():.3f}", 13, "#5a5a5a")
    return fig


def log_plot(fig: Image.Image, box, series, title: str, xlabel: str, ylabel: str) -> None:
    """A line plot with a log y-axis inside `box` = (left, top, right, bottom) of `fig`, its
    legend top left. series: (label, xs, ys, colour, style), style "-" (line), "o" (dots) or "-o"."""
    draw, small = ImageDraw.Draw(fig), font(13)
    left, top, right, bottom = box[0] + 64, box[1] + 34, box[2] - 14, box[3] - 48
    xs, ys = [x for s in series for x in s[1]], [y for s in series for y in s[2]]
    x0, x1 = min(xs), max(xs)
    d0, d1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))  # decades
    X = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    Y = lambda y: bottom - (math.log10(y) - d0) / (d1 - d0) * (bottom - top)  # noqa: E731
    for d in range(d0, d1 + 1):  # decades labelled, 2..9 times them as light grid lines
        draw.line([(left, Y(10**d)), (right, Y(10**d))], fill=(200, 200, 200))
        draw.text((left - 6, Y(10**d)), f"{10**d:g}", font=small, anchor="rm", fill="black")
        for m in range(2, 10) if d < d1 else ():
            draw.line([(left, Y(m * 10**d)), (right, Y(m * 10**d))], fill=(236, 236, 236))
    power = 10 ** math.floor(math.log10((x1 - x0) / 6))  # x ticks: 1, 2 or 5 times a power of ten, ~6 of them
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= (x1 - x0) / 6)
    for k in range(math.ceil(x0 / step), math.floor(x1 / step) + 1):
        draw.line([(X(k * step), bottom), (X(k * step), bottom + 5)], fill="black")
        draw.text((X(k * step), bottom + 8), f"{k * step:g}", font=small, anchor="ma", fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    for i, (label, xs, ys, colour, style) in enumerate(series):
        points = [(X(x), Y(y)) for x, y in zip(xs, ys)]
        lx, ly = left + 12, top + 10 + 20 * i  # its legend entry
        if "-" in style:
            draw.line(points, fill=colour, width=2)
            draw.line([(lx, ly + 7), (lx + 24, ly + 7)], fill=colour, width=3)
        for px, py in (points + [(lx + 12, ly + 7)]) if "o" in style else ():
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((lx + 30, ly), label, font=small, fill="black")
    text_centred(draw, (left + right) / 2, box[1] + 6, title, 16)
    text_centred(draw, (left + right) / 2, bottom + 28, xlabel, 14)
    label = Image.new("L", (bottom - top, 20), 0)  # the y label: drawn flat, turned upright, used as a mask
    ImageDraw.Draw(label).text(((bottom - top) / 2, 2), ylabel, font=font(14), anchor="ma", fill=255)
    fig.paste((0, 0, 0), (box[0] + 4, top), label.rotate(90, expand=True))


def sigmas_figure(model: Path) -> Image.Image:
    """Left: DPM-Solver++'s sigmas for 10 and 25 steps by step index. Right: the 1000 training
    sigmas by timestep, with the 10-step schedule's timesteps marked on them."""
    scheduler = load_scheduler(model)
    schedules = {}  # steps -> (timesteps, sigmas), less the last sigma: 0, off a log axis
    for n in (10, 25):
        scheduler.set_timesteps(n)
        schedules[n] = (scheduler.timesteps.tolist(), scheduler.sigmas[:-1].tolist())
    fig = Image.new("RGB", (1140, 480), "white")
    text_centred(ImageDraw.Draw(fig), 570, 10, "The noise schedule of minisd-shapes: sigma = sigma_t / alpha_t, "
                 "so that x_t / alpha_t = x0 + sigma * eps", 18)
    blue, orange, train = (40, 90, 200), (230, 120, 20), scheduler.train_sigmas.tolist()
    log_plot(fig, (0, 40, 570, 480), [(f"{n} steps", list(range(n)), schedules[n][1], colour, "-o")
                                      for n, colour in ((10, blue), (25, orange))],
             "DPM-Solver++ sigmas (then 0 after the last step)", "step index i", "sigma (log scale)")
    log_plot(fig, (570, 40, 1140, 480), [("1000 training sigmas", list(range(len(train))), train, (90, 90, 90), "-"),
                                         ("the 10 steps' timesteps", *schedules[10], blue, "o")],
             "Training sigmas by timestep", "training timestep t", "sigma (log scale)")
    return fig


def write_figures(model: Path, out: Path, steps: int = STEPS) -> tuple[list[Path], float]:
    """Generate, check the final frame against Pipeline, write the three PNGs into `out`.
    Returns their paths and max |final frame - Pipeline's image| (at most PARITY_TOL)."""
    gen = generate(model, steps=steps)
    # First, the proof that the strip is the pipeline's: Pipeline's own image for the same inputs.
    pipe = Pipeline.from_pretrained(model, safety_checker=None)
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="pt",
                 generator=torch.Generator().manual_seed(SEED)).images[0]
    diff = (gen.frames[-1] - image).abs().max().item()
    assert diff <= PARITY_TOL, f"the figure's final frame differs from Pipeline's image by {diff:.2e}"
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png" for name in FIGURES]
    figures = denoising_figure(gen), sigmas_figure(model), attention_figure(gen, load_tokenizer(model))
    for fig, path in zip(figures, paths):
        fig.save(path)
    return paths, diff


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures", help="folder (default: docs/figures)")
    p.add_argument("--model", type=Path, default=MODEL, help="pipeline folder (default: weights/minisd-shapes)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs")
    args = p.parse_args(argv)
    existing = [str(args.out / f"{name}.png") for name in FIGURES if (args.out / f"{name}.png").exists()]
    if existing and not args.overwrite:
        p.error(f"{', '.join(existing)} exist(s); pass --overwrite to replace the shipped figures")

    torch.set_num_threads(1)  # one fixed order of float sums, and the model is tiny
    paths, diff = write_figures(args.model, args.out)
    print(f"final frame vs Pipeline: max |diff| {diff:.1e} (tolerance {PARITY_TOL:g})")
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
