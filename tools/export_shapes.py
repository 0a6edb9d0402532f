"""Write minisd-shapes as a diffusers pipeline folder, with its sample grid and model card.

The folder is in today's diffusers format: safetensors weights stored as float16 to fit
25 MB (minisd and diffusers load them as float32), a DPM-Solver++ scheduler, the real CLIP
tokenizer files from weights/clip, no safety checker, `samples.png` (tools/shapes_grid.py)
and a README.md model card whose numbers are measured on the written folder
(tools/eval_shapes.py), not claimed.

An existing folder is never replaced unless asked (`overwrite=True`, train_shapes'
`--overwrite`). The folder is written beside its destination under a temporary name and
renamed into place only when complete, so a failed export leaves the old one as it was.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import eval_shapes
import shapes
import shapes_grid
from minisd.pipeline import Pipeline
from shapes_model import CLIP_VOCAB_DIR, SCHEDULER, TEXT, VAE, State, unet_config

DIFFUSERS_VERSION = "0.42.1"  # the version whose config format this writes (and tests load it)
TRANSFORMERS_VERSION = "5.24.0"


def refuse_to_replace(out: Path, overwrite: bool) -> None:
    """Raise FileExistsError when `out` holds anything and `overwrite` is not set."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out, "
                              "or pass --overwrite to replace it")


def export(state: State, out: Path, card_eval: int = 100, overwrite: bool = False) -> None:
    """Write the pipeline folder, its samples and its model card (an evaluation of the written
    folder on `card_eval` prompts, 25 steps) to `out`, replacing it only if `overwrite`."""
    refuse_to_replace(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_pipeline(state, tmp)
        pipe = Pipeline.from_pretrained(tmp, safety_checker=None)
        shapes_grid.write_samples(pipe, tmp / "samples.png")
        (tmp / "README.md").write_text(model_card(state, tmp, card_eval, pipe, shown_as=out))
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(new: Path, out: Path) -> None:
    """Rename the finished folder `new` to `out`. An old `out` is first renamed aside and
    deleted last: an interruption between the two renames leaves it there, under `.NAME.old-PID`,
    never half of either."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _fp16(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}


def _listed(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def write_pipeline(state: State, out: Path) -> None:
    """The diffusers pipeline folder itself: configs, float16 safetensors, tokenizer files."""
    out.mkdir(parents=True)
    _json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    unet = _listed(unet_config(state.plan))
    unet.pop("num_attention_heads")  # None: diffusers reads attention_head_dim (the head count)
    _json(out / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                         "_diffusers_version": DIFFUSERS_VERSION, **unet})
    save_file(_fp16(state.ema_unet), out / "unet" / "diffusion_pytorch_model.safetensors")

    vae = _listed(dataclasses.replace(VAE, scaling_factor=round(state.scaling_factor, 5)))
    n = len(VAE.block_out_channels)
    _json(out / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **vae,
        "sample_size": shapes.SIZE,  # the image size; minisd ignores it, diffusers tiles above it
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "force_upcast": False})
    save_file(_fp16(state.vae), out / "vae" / "diffusion_pytorch_model.safetensors")

    _json(out / "text_encoder" / "config.json", {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **_listed(TEXT),
        "attention_dropout": 0.0, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
        "initializer_factor": 1.0, "initializer_range": 0.02, "projection_dim": TEXT.hidden_size,
        # float32: transformers 5 loads in the config's dtype, and the weights are float16 on disk.
        "dtype": "float32", "transformers_version": TRANSFORMERS_VERSION})
    save_file(_fp16(state.text_encoder), out / "text_encoder" / "model.safetensors")

    _json(out / "scheduler" / "scheduler_config.json", {
        "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        **{k: v for k, v in _listed(SCHEDULER).items() if k != "class_name"},
        "thresholding": False})

    tokenizer = out / "tokenizer"
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(CLIP_VOCAB_DIR / name, tokenizer / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    _json(tokenizer / "special_tokens_map.json", special)
    _json(tokenizer / "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                "do_lower_case": True, "errors": "replace", **special})


def model_card(state: State, out: Path, n_eval: int, pipe: Pipeline, shown_as: Path | None = None) -> str:
    """README.md of the exported folder `out` (loaded as `pipe`; its final place `shown_as`):
    what the model is and is not, measured, not claimed."""
    plan = state.plan
    accuracy, _ = eval_shapes.evaluate_model(pipe, n=n_eval, steps=25, seed=1234)
    # Fewer steps: the default guidance overshoots colours there; a lower one does not.
    few_steps = {g: eval_shapes.evaluate_model(pipe, n=n_eval, steps=10, seed=1234, guidance=g)[0] for g in (7.5, 3.0)}
    row = lambda a: " | ".join(f"{a[k]:.0%}" for k in eval_shapes.JUDGED)
    start = time.perf_counter()
    pipe("a red circle on a blue background", num_inference_steps=25, generator=torch.Generator().manual_seed(0))
    seconds_per_image = time.perf_counter() - start
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("text_encoder", "unet", "vae")}
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total_mb = sum(p.stat().st_size for p in files) / 1e6
    hours = lambda s: f"{s / 3600:.1f} h" if s > 5400 else f"{s / 60:.0f} min"
    colours = ", ".join(shapes.COLOURS)
    unet_config_ = unet_config(plan)
    layout = "small-sd's layout" if unet_config_.layers_per_block == 1 else "SD v1-4/v1-5's layout"
    if state.encoders_from:
        encoders = (f"* VAE and text encoder: taken from `{eval_shapes.model_name(state.encoders_from)}` as they are (not trained "
                    "again), so that this UNet\n  sees the same latents and text states as that model's.")
    else:
        encoders = (f"""* VAE: {plan.vae_steps} steps of batch {plan.vae_batch} ({plan.vae_steps * plan.vae_batch:,} images), AdamW lr {plan.vae_lr:g} with cosine
  decay, L1 + MSE reconstruction + {plan.kl_weight:g} x KL; {hours(state.seconds['vae'])}.
* Text encoder, as CLIP: {plan.clip_steps} steps of batch {plan.clip_batch} ({plan.clip_steps * plan.clip_batch:,} caption-image pairs),
  contrastive loss against a small CNN on the latents (discarded), AdamW lr {plan.clip_lr:g}; {hours(state.seconds['clip'])}.""")
    reproduce = "python tools/train_shapes.py" + (f" --layers-per-block {unet_config_.layers_per_block}"
                                                 if unet_config_.layers_per_block != 1 else "")
    evals = "\n".join(f"| {e['step']} | " + " | ".join(f"{e[k]:.0%}" for k in eval_shapes.JUDGED) + " |"
                      for e in state.evals)
    return f"""---
license: mit
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, minisd, toy-model]
---
# minisd-shapes

A {sum(params.values()) / 1e6:.1f}M-parameter text-to-image model in Stable Diffusion v1's architecture and file
format, trained from scratch on a CPU by [minisd](../../README.md)'s own code
(`tools/train_shapes.py`), so that `minisd generate` has a real model to run on a machine
that cannot download one. It is to minisd what nanoGPT's Shakespeare model is to nanoGPT.

**What it is.** It draws one flat shape on a flat background, 64x64 pixels, as the prompt
says: a circle, square or triangle; in red, orange, yellow, green, blue, purple, white or
black; small or large; in the centre, on the left or right, at the top or bottom; on a
background of another of those colours.

    minisd generate "a red circle on a blue background"
    minisd generate "blue background, large yellow triangle at the top" --seed 3

**What it is not.** Not Stable Diffusion's weights and no substitute for them: it has never
seen a photograph, and knows only the words of its data set's grammar (the colours above,
circle, square, triangle, small/little, large/big, left, right, top, bottom, centre,
middle, background). Any other prompt still gives a shape on a background. It draws one
shape per image, upright triangles only; its edges are soft, small squares often look like
four-pointed stars and small circles like blobs, and its colours, shapes and positions are
sometimes wrong (see the evaluation). It ships without a safety checker
(`requires_safety_checker: false`), since it can draw nothing but coloured shapes.

![samples](samples.png)

## Evaluation

`python tools/eval_shapes.py --model {eval_shapes.model_name(shown_as or out)} --n {n_eval} --steps 25 --seed 1234`:
{n_eval} prompts drawn from the grammar, fresh noise seeds, 25 DPM-Solver++ steps, guidance
7.5, each image judged by plain pixel analysis (nearest named colour, template overlap,
bounding-box position; see that file):

| background colour | shape colour | shape kind | position | size (where stated) |
|---|---|---|---|---|
| {accuracy['background']:.0%} | {accuracy['colour']:.0%} | {accuracy['shape']:.0%} | {accuracy['position']:.0%} | {accuracy['size']:.0%} |

One image at 25 steps took {seconds_per_image:.2f} s in minisd's Pipeline on the training
machine (one thread, model already loaded).

**Fewer steps want less guidance.** At 10 steps, guidance 7.5 overshoots: shapes come out
in a neighbouring colour (orange as red, yellow as orange). Guidance 3 does not
(`minisd generate "..." --steps 10 --guidance 3`). Same {n_eval} prompts:

| steps, guidance | background | colour | shape | position |
|---|---|---|---|---|
| 10, 7.5 | {row(few_steps[7.5])} |
| 10, 3 | {row(few_steps[3.0])} |

## Model

| component | what | parameters |
|---|---|---|
| text_encoder | CLIP text transformer (causal), {TEXT.num_hidden_layers} layers, width {TEXT.hidden_size}, {TEXT.num_attention_heads} heads, the real 49,408-token CLIP vocabulary | {params['text_encoder'] / 1e6:.2f}M (of which {TEXT.vocab_size * TEXT.hidden_size / 1e6:.2f}M token embeddings) |
| unet | SD v1 UNet, layers_per_block {unet_config_.layers_per_block} ({layout}), channels {list(unet_config_.block_out_channels)}, cross-attention at 8x8, 4x4 and the middle | {params['unet'] / 1e6:.2f}M |
| vae | AutoencoderKL, channels {list(VAE.block_out_channels)}: 64x64x3 images <-> 16x16x4 latents, scaling_factor {state.scaling_factor:.5f} | {params['vae'] / 1e6:.2f}M |
| scheduler | DPM-Solver++ (2nd order) on SD v1's scaled-linear betas (0.00085 to 0.012, 1000 steps), epsilon prediction | |

Weights are stored as float16 safetensors (so the folder, {total_mb:.1f} MB with the tokenizer,
stays small) and load as float32 in minisd and in diffusers' `StableDiffusionPipeline`, which
gives the same images (tests/test_shapes.py checks it).

## Training

* Data: tools/shapes.py, an endless procedural set of captioned 64x64 images (one shape,
  {len(shapes.COLOURS)} colours: {colours}; {len(shapes.SHAPES)} shapes, 2 sizes, 5 positions, with a few pixels of
  jitter), captions from a small grammar with five sentence forms. Never the same image twice.
{encoders}
* UNet, text encoder frozen: {plan.steps} steps of batch {plan.batch} ({plan.steps * plan.batch:,} images), AdamW lr {plan.lr:g}
  ({plan.warmup} warm-up steps, cosine decay to a tenth), gradient clipping at 1, epsilon loss
  weighted over timesteps by min(SNR, {plan.min_snr_gamma:g})/SNR x min(1 + 1/SNR, {plan.high_noise_cap:g}) (see `loss_weights`),
  caption dropped to "" for {plan.cfg_dropout:.0%} of samples (classifier-free guidance), EMA of the
  weights (decay {plan.ema_decay}) exported; {hours(state.seconds['unet'])}.
* In all {hours(sum(state.seconds.values()))} of training (wall time of the training steps, not counting
  the small evaluations) on {state.hardware}, shared with other jobs. Seed {plan.seed}.
* Changes made while resuming: {"; ".join(state.history) or "none"}.
* Reproduce (resumable; checkpoints and the folder under .cache/): `{reproduce}`;
  `--export-only --out FOLDER --overwrite` rewrites this folder from the last checkpoint.

Accuracy during training (20 prompts, 10 steps, guidance 7.5, EMA weights; the colour
column suffers from the overshoot above):

| step | background | colour | shape | position |
|---|---|---|---|---|
{evals}
"""
