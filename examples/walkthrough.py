"""One generation by hand: each component loaded on its own, the denoising loop written out,
the shape printed at every stage. docs/walkthrough.md follows these steps through the files.

    python examples/walkthrough.py                     # -> walkthrough.png, in a few seconds
    python examples/walkthrough.py "a small green circle on the left, white background" -o circle.png
"""
import argparse
from pathlib import Path

import torch
from PIL import Image

from minisd import load_scheduler, load_text_encoder, load_tokenizer, load_unet, load_vae

MODEL = Path(__file__).resolve().parents[1] / "weights" / "minisd-shapes"


def show(stage: str, tensor: torch.Tensor) -> None:
    print(f"{stage:<26} {list(tensor.shape)}")


def show_unet_levels(unet) -> list:
    """Forward hooks that print the UNet's working shape at each level; remove them when done."""
    n = len(unet.down_blocks)
    levels = [(f"UNet down level {i}", b.resnets[-1]) for i, b in enumerate(unet.down_blocks)]
    levels += [("UNet middle", unet.mid_block)]
    levels += [(f"UNet up level {n - 1 - i}", b.resnets[-1]) for i, b in enumerate(unet.up_blocks)]
    return [m.register_forward_hook(lambda m, i, out, stage=stage: show(stage, out)) for stage, m in levels]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", nargs="?", default="a large red square on a blue background")
    p.add_argument("-o", "--output", type=Path, default=Path("walkthrough.png"))
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    tokenizer, text_encoder = load_tokenizer(args.model), load_text_encoder(args.model)
    unet, vae, scheduler = load_unet(args.model), load_vae(args.model), load_scheduler(args.model)

    # 1. text -> ids -> context. Row 0 is the unconditional prompt "", row 1 the prompt.
    ids = tokenizer(["", args.prompt])
    show("token ids", ids)
    with torch.no_grad():
        context = text_encoder(ids)
    show("text context", context)

    # 2. noise: latents at 1/8 of the image size (minisd-shapes: 1/4), unit variance.
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=generator) * scheduler.init_noise_sigma
    show("latents", latents)

    hooks = show_unet_levels(unet)  # on the first step only

    # 3. denoise: predict the noise for both rows at once, guide, take a solver step.
    scheduler.set_timesteps(args.steps)
    with torch.no_grad():
        for step, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents] * 2)
            if step == 0:
                show("UNet input, CFG batch", model_input)
            noise_uncond, noise_text = unet(model_input, t, context).chunk(2)
            if step == 0:
                show("UNet output (noise)", torch.cat([noise_uncond, noise_text]))
                for hook in hooks:
                    hook.remove()
            noise = noise_uncond + args.guidance * (noise_text - noise_uncond)
            latents = scheduler.step(noise, t, latents)
        show("denoised latents", latents)

        # 4. latents -> image: undo the latent scaling, decode, map [-1, 1] to [0, 255].
        image = vae.decode(latents / vae.scaling_factor)
    show("image", image)
    pixels = ((image[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    Image.fromarray(pixels.numpy()).save(args.output)
    print(f"wrote {args.output} ({args.steps} steps, seed {args.seed}): {args.prompt!r}")


if __name__ == "__main__":
    main()
