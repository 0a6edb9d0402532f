"""The three training phases of minisd-shapes (tools/train_shapes.py runs them in order).

The same recipe as Stable Diffusion v1, shrunk to tools/shapes.py's 64x64 world:

  1. VAE: an AutoencoderKL, 64x64 images -> 4x16x16 latents (3 blocks: downscale 4), trained
     on reconstruction (L1 + MSE) plus a small KL term; then `scaling_factor` = 1 / std of the
     latents, measured on fresh images, as SD's 0.18215 was.
  2. Text encoder, as CLIP: a CLIP text transformer (the real 49,408-token CLIP tokenizer;
     64 wide, 3 layers) trained contrastively against a small image tower on the latents
     (https://arxiv.org/abs/2103.00020), so that its end-of-text and padding states, which
     the UNet attends to, say what the caption says. The image tower is then thrown away.
  3. UNet, with the text encoder frozen (as SD v1 froze CLIP): a layers_per_block=1 UNet
     (small-sd's layout) trained to predict the noise (epsilon) on SD v1's scaled-linear
     beta schedule, with the caption dropped to "" 10% of the time so classifier-free
     guidance works. Two speed-ups from the literature, neither of which changes what the
     model is: loss weights over timesteps that make the noisiest steps, where only the
     caption can help, count (`loss_weights`), and an exponential moving average of the
     weights, which is what gets exported.

  Why a CLIP phase: trained jointly with the UNet from scratch, the text encoder got 2-5%
  of the gradient and, after 1,200 steps (an hour here), the model still drew the colours
  it was told only a third of the time.

Everything is seeded: batch i of a phase is drawn from the seed and i alone (`batch_rng`), so
a run that stops and resumes sees the same data as one that never stopped. Each phase saves
the State to its checkpoint every `save_every` seconds and at its end.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import eval_shapes
import shapes
from minisd.clip import CLIPTextModel
from minisd.config import SchedulerConfig
from minisd.runtime import ProgressBar
from minisd.tokenizer import CLIPTokenizer
from minisd.vae import AutoencoderKL
from shapes_model import SCHEDULER, Plan, State


# --- data --------------------------------------------------------------------------------

def batch_rng(plan: Plan, phase: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The data and noise generators of one step: a function of (seed, phase, step) only."""
    key = [plan.seed, {"vae": 1, "unet": 2, "scale": 3, "clip": 4, "distill": 5}[phase], step]
    seed = int(np.random.SeedSequence(key).generate_state(1)[0])
    return np.random.default_rng(key), torch.Generator().manual_seed(seed)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], what the VAE reads."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def sd_alphas_cumprod(config: SchedulerConfig = SCHEDULER) -> torch.Tensor:
    """alpha-bar_t of SD v1's scaled-linear schedule (linear in sqrt(beta)), t = 0..999."""
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def optimiser_step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float,
                   clip: Iterable[torch.Tensor] | None = None) -> None:
    """One step of `opt` at learning rate `lr` on `loss`'s gradient, its norm clipped to 1
    over the parameters `clip` when given."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()


def progress_bar(label: str, done: int, total: int) -> ProgressBar:
    """A phase's bar on stderr: redrawn in place on a terminal, a line a minute into a log file."""
    return ProgressBar(total, label, done=done, min_interval=60)


class Saver:
    """Saves the State to `path` when `every` seconds have passed since the last save, or when told."""

    def __init__(self, state: State, path: Path, every: float):
        self.state, self.path, self.every = state, path, every
        self.last = time.perf_counter()

    def __call__(self, now: bool = False) -> None:
        if now or time.perf_counter() - self.last > self.every:
            self.state.save(self.path)
            self.last = time.perf_counter()


# --- phase 1: the VAE --------------------------------------------------------------------

def vae_loss(vae: AutoencoderKL, x: torch.Tensor, gen: torch.Generator, kl_weight: float):
    mean, logvar = vae.encode(x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
    recon = vae.decode(z)
    pixel = F.l1_loss(recon, x) + F.mse_loss(recon, x)
    kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).mean()
    return pixel + kl_weight * kl, pixel, kl


def train_vae(state: State, checkpoint: Path, save_every: float) -> None:
    plan, vae = state.plan, state.vae
    vae.train()
    bar = progress_bar("vae", state.vae_step, plan.vae_steps)
    save = Saver(state, checkpoint, save_every)
    while state.vae_step < plan.vae_steps:
        t0 = time.perf_counter()
        rng, gen = batch_rng(plan, "vae", state.vae_step)
        x = to_tensor(shapes.batch(rng, plan.vae_batch)[0])
        # bfloat16 matmuls and convolutions (fp32 weights): 1.5x faster on a CPU with
        # AVX512-BF16, and reconstructions of flat colours do not need more precision.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, pixel, kl = vae_loss(vae, x, gen, plan.kl_weight)
        lr = plan.vae_lr * cosine(state.vae_step, plan.vae_steps, warmup=50)
        optimiser_step(state.vae_opt, loss, lr, clip=vae.parameters())
        state.vae_step += 1
        state.seconds["vae"] += time.perf_counter() - t0
        bar.update(state.vae_step, pixel=pixel.item(), kl=kl.item())
        if state.vae_step % 250 == 0:
            vae.eval()
            print(f"\nvae step {state.vae_step}: {vae_report(state)}", file=sys.stderr, flush=True)
            vae.train()
        save()  # the phase's end is saved by the caller, with the scaling factor
    bar.close()
    vae.eval()


@torch.no_grad()
def measure_scaling_factor(state: State, n: int = 512) -> float:
    """1 / std of the VAE's latents (posterior samples) over n fresh images."""
    rng, gen = batch_rng(state.plan, "scale", 0)
    latents = []
    for i in range(0, n, 64):
        mean, logvar = state.vae.encode(to_tensor(shapes.batch(rng, 64)[0]))
        latents.append(mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen))
    return float(1.0 / torch.cat(latents).std())


@torch.no_grad()
def vae_report(state: State, n: int = 64) -> str:
    """How well the VAE alone carries the facts: eval_shapes on reconstructions."""
    rng = np.random.default_rng([state.plan.seed, 99])
    images, captions, scenes = shapes.batch(rng, n)
    mean, logvar = state.vae.encode(to_tensor(images))
    recon = ((state.vae.decode(mean) + 1) * 127.5).clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
    accuracy, _ = eval_shapes.score(recon, [s.attributes() for s in scenes])
    mae = np.abs(recon.astype(float) - images).mean()
    return (f"reconstructions: mean |error| {mae:.1f}/255, " + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items())
            + f"; latent std {mean.std():.2f}, posterior std {(0.5 * logvar).exp().mean():.3f}")


# --- phase 2: the text encoder, as CLIP ----------------------------------------------------

def text_features(text_encoder: CLIPTextModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(all hidden states [B, 77, D], the end-of-text token's [B, D]: CLIP's pooled output)."""
    hidden = text_encoder(ids)
    eos = (ids == ids.max()).int().argmax(dim=1)  # the first <|endoftext|> (id 49407, the largest)
    return hidden, hidden[torch.arange(len(ids)), eos]


def clip_loss(state: State, tokenizer: CLIPTokenizer, step: int) -> tuple[torch.Tensor, float]:
    """CLIP's symmetric contrastive loss (https://arxiv.org/abs/2103.00020): each caption
    must pick out its own image among the batch's, and each image its caption."""
    rng, gen = batch_rng(state.plan, "clip", step)
    images, captions, _ = shapes.batch(rng, state.plan.clip_batch)
    with torch.no_grad():
        latents = encode_latents(state, images, gen)
    _, pooled = text_features(state.text_encoder, tokenizer(captions))
    text = F.normalize(state.clip.text_projection(pooled), dim=-1)
    image = F.normalize(state.clip.image_tower(latents), dim=-1)
    logits = state.clip.logit_scale.clamp(max=math.log(100)).exp() * text @ image.T
    # Captions can be true of several images in a batch (same facts, other jitter); those
    # count as right too, so the targets are spread over all of them.
    facts = [tuple(sorted(shapes.parse_caption(c).items())) for c in captions]
    same = torch.tensor([[a == b or _compatible(a, b) for b in facts] for a in facts], dtype=torch.float32)
    targets = same / same.sum(dim=1, keepdim=True)
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2  # same is symmetric
    accuracy = same[torch.arange(len(same)), logits.argmax(dim=1)].mean().item()
    return loss, accuracy


def _compatible(a: tuple, b: tuple) -> bool:
    """Two captions' facts agree wherever both state them (an unstated size is a wildcard)."""
    da, db = dict(a), dict(b)
    return all(da[k] == db[k] or da[k] is None or db[k] is None for k in da)


def train_clip(state: State, tokenizer: CLIPTokenizer, checkpoint: Path, save_every: float) -> None:
    plan = state.plan
    state.text_encoder.train()
    bar = progress_bar("clip", state.clip_step, plan.clip_steps)
    save = Saver(state, checkpoint, save_every)
    smooth = None
    while state.clip_step < plan.clip_steps:
        t0 = time.perf_counter()
        loss, accuracy = clip_loss(state, tokenizer, state.clip_step)
        optimiser_step(state.clip_opt, loss, plan.clip_lr * cosine(state.clip_step, plan.clip_steps, warmup=50))
        state.clip_step += 1
        state.seconds["clip"] += time.perf_counter() - t0
        smooth = accuracy if smooth is None else 0.95 * smooth + 0.05 * accuracy
        bar.update(state.clip_step, loss=loss.item(), accuracy=smooth)
        save(now=state.clip_step == plan.clip_steps)
    bar.close()
    state.text_encoder.eval()


# --- phase 3: the UNet --------------------------------------------------------------------

def encode_latents(state: State, images: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """Images -> scaled latents, a sample of the VAE's posterior (as SD trains)."""
    mean, logvar = state.vae.encode(to_tensor(images))
    return (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)) * state.scaling_factor


def cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def noisy_batch(state, tokenizer: CLIPTokenizer, alphas_cumprod: torch.Tensor, step: int, phase: str = "unet"):
    """Step `step`'s training batch for a UNet: (noisy latents x_t, timesteps t, text states,
    the noise that was added). `state` has the plan, the frozen VAE and text encoder, and the
    scaling factor (a train_shapes State, or tools/distill.py's)."""
    plan = state.plan
    rng, gen = batch_rng(plan, phase, step)
    images, captions, _ = shapes.batch(rng, plan.batch)
    drop = rng.random(plan.batch) < plan.cfg_dropout
    captions = ["" if d else c for c, d in zip(captions, drop)]
    with torch.no_grad():
        latents = encode_latents(state, images, gen)
        context = state.text_encoder(tokenizer(captions))  # frozen, as SD's CLIP
    t = torch.randint(0, len(alphas_cumprod), (plan.batch,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    a = alphas_cumprod[t][:, None, None, None]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # q(x_t | x_0)
    return noisy, t, context, noise


def weighted_mse(predicted: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the per-image MSE weighted by `weights` [B] and averaged, the plain mean MSE)."""
    per_image = F.mse_loss(predicted, target, reduction="none").mean(dim=(1, 2, 3))
    return (weights * per_image).mean(), per_image.mean()


def diffusion_loss(state: State, tokenizer: CLIPTokenizer, alphas_cumprod: torch.Tensor, step: int):
    noisy, t, context, noise = noisy_batch(state, tokenizer, alphas_cumprod, step)
    return weighted_mse(state.unet(noisy, t, context), noise, loss_weights(alphas_cumprod, state.plan)[t])


def loss_weights(alphas_cumprod: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Weight of the epsilon loss at each timestep, mean 1 over t.

    The plain epsilon loss weighs the error of the implied clean latent x0 by SNR(t), which
    at t = 999 is 0.005: there the image is nearly pure noise, only the caption can say what
    to draw, and the loss barely rewards listening to it. Two corrections, as factors on the
    epsilon loss:
      * 1 + 1/SNR, capped at `high_noise_cap`: the v-prediction loss (x0 weight SNR + 1, as
        in EDM, https://arxiv.org/abs/2206.00364), so the noisiest steps count;
      * min(SNR, gamma) / SNR: Min-SNR-gamma (https://arxiv.org/abs/2303.09556), so the
        nearly clean steps, which are easy, do not dominate.
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight = torch.clamp(snr, max=plan.min_snr_gamma) / snr * torch.clamp(1 + 1 / snr, max=plan.high_noise_cap)
    return weight / weight.mean()


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def evaluate(state: State, tokenizer: CLIPTokenizer, n: int = 20, steps: int = 10) -> dict:
    accuracy, _ = eval_shapes.evaluate_model(state.pipeline(tokenizer), n=n, steps=steps, seed=4321)
    return {"step": state.step, "n": n, "steps": steps, **{k: round(v, 3) for k, v in accuracy.items()}}


def train_unet(state: State, tokenizer: CLIPTokenizer, checkpoint: Path, save_every: float) -> None:
    plan = state.plan
    alphas_cumprod = sd_alphas_cumprod()
    state.text_encoder.eval().requires_grad_(False)
    state.unet.train()
    bar = progress_bar("unet", state.step, plan.steps)
    save = Saver(state, checkpoint, save_every)
    smooth = None
    while state.step < plan.steps:
        t0 = time.perf_counter()
        loss, raw = diffusion_loss(state, tokenizer, alphas_cumprod, state.step)
        optimiser_step(state.opt, loss, plan.lr * cosine(state.step, plan.steps, plan.warmup),
                       clip=state.unet.parameters())
        decay = min(plan.ema_decay, (1 + state.step) / (10 + state.step))  # short memory early on
        update_ema(state.ema_unet, state.unet, decay)
        state.step += 1
        state.seconds["unet"] += time.perf_counter() - t0
        smooth = raw.item() if smooth is None else 0.98 * smooth + 0.02 * raw.item()
        bar.update(state.step, loss=smooth)
        if plan.eval_every and (state.step % plan.eval_every == 0 or state.step == plan.steps):
            result = evaluate(state, tokenizer)
            state.evals.append(result)
            print(f"\neval at step {state.step}: {result}", file=sys.stderr, flush=True)
        save(now=state.step == plan.steps)
    bar.close()
