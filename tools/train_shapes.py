"""Train minisd-shapes, the small embedded model, with minisd's own modules, on the CPU.

    python tools/train_shapes.py                  # train (or resume) and write weights/minisd-shapes/
    python tools/train_shapes.py --export-only    # write the folder from the last training checkpoint
    python tools/train_shapes.py --smoke          # a few steps of each phase into /tmp, to try the code

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

Everything is seeded: batch i of a phase is drawn from the seed and i alone, so a run that
stops and resumes sees the same data as one that never stopped. A training checkpoint is
written to .cache/train_shapes/ every few minutes and at each phase's end; rerunning the
command continues from it. The export is a diffusers pipeline folder in today's format
(safetensors, weights stored as float16 to fit 25 MB, loaded as float32 by minisd and by
diffusers), with a DPM-Solver++ scheduler, no safety checker, and a model card.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import eval_shapes
import shapes
import shapes_grid
from minisd.clip import CLIPTextModel
from minisd.config import CLIPTextConfig, SchedulerConfig, UNetConfig, VAEConfig
from minisd.dpm_solver import DPMSolverMultistep
from minisd.pipeline import Pipeline
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet2DConditionModel
from minisd.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]

CLIP_VOCAB_DIR = ROOT / "weights" / "clip"
OUT_DIR = ROOT / "weights" / "minisd-shapes"
WORK_DIR = ROOT / ".cache" / "train_shapes"

# --- the model ---------------------------------------------------------------------------

VAE = VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
                norm_num_groups=8, sample_size=shapes.SIZE)
TEXT = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
UNET = UNetConfig(
    sample_size=shapes.SIZE // VAE.downscale_factor,  # 16: the default image is 64x64
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    # Attention only at 8x8 and 4x4 (and the mid block): at 16x16 it would cost more than
    # it gives on a one-thread CPU budget. small-sd puts it on the three larger levels.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,  # diffusers' name for the number of heads
    cross_attention_dim=TEXT.hidden_size,
    norm_num_groups=32,
)
# SD v1's noise schedule and sampler (small-sd's scheduler_config.json, in today's keys).
SCHEDULER = SchedulerConfig(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                            timestep_spacing="linspace", steps_offset=1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long and how hard to train; the defaults are the shipped model's."""
    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 8
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6  # on the mean KL per latent element, against the mean pixel loss
    clip_steps: int = 1000  # text encoder, contrastive
    clip_batch: int = 128
    clip_lr: float = 1e-3
    steps: int = 6000  # UNet
    batch: int = 32
    lr: float = 8e-4
    warmup: int = 200
    cfg_dropout: float = 0.1  # share of captions replaced by "" (the unconditional prompt)
    min_snr_gamma: float = 5.0
    high_noise_cap: float = 20.0  # see loss_weights
    ema_decay: float = 0.999
    eval_every: int = 250  # steps between the small in-training evaluations (0: never)


# --- data --------------------------------------------------------------------------------

def batch_rng(plan: Plan, phase: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The data and noise generators of one step: a function of (seed, phase, step) only."""
    key = [plan.seed, {"vae": 1, "unet": 2, "scale": 3, "clip": 4}[phase], step]
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


# --- training state ----------------------------------------------------------------------

class State:
    """Models, optimisers, EMA copies and counters; saved and restored as one file."""

    def __init__(self, plan: Plan):
        torch.manual_seed(plan.seed)  # initial weights
        self.plan = plan
        self.vae = AutoencoderKL(VAE)
        with torch.no_grad():  # start with a narrow posterior (std e^-2): a decoder fed mostly
            self.vae.quant_conv.bias[VAE.latent_channels:] = -4.0  # noise learns slowly
        self.text_encoder = CLIPTextModel(TEXT)
        with torch.no_grad():
            # CLIP's initialisation (transformers' CLIPTextEmbeddings: N(0, 0.02)). It matters:
            # with N(0, 1) embeddings the ~60 padding positions, which the UNet attends to as
            # much as the words, barely differ between prompts (their own embedding swamps
            # what attention mixes in), and the UNet learns to ignore the text.
            for table in (self.text_encoder.embeddings.token_embedding, self.text_encoder.embeddings.position_embedding):
                table.weight.normal_(0.0, 0.02)
        self.clip = CLIPHeads(TEXT.hidden_size)
        self.unet = UNet2DConditionModel(UNET)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
        self.clip_opt = torch.optim.AdamW(list(self.text_encoder.parameters()) + list(self.clip.parameters()),
                                          lr=plan.clip_lr, weight_decay=0.0)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=plan.lr, weight_decay=0.0)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.vae_step = 0
        self.clip_step = 0
        self.step = 0
        self.scaling_factor: float | None = None
        self.seconds = {"vae": 0.0, "clip": 0.0, "unet": 0.0}  # training wall time, summed over sessions
        self.evals: list[dict] = []  # in-training evaluations
        self.history: list[str] = []  # plan changes made when resuming, for the model card
        self.hardware = hardware_name()

    MODULES = ("vae", "text_encoder", "clip", "unet", "vae_opt", "clip_opt", "opt", "ema_unet")

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {name: getattr(self, name).state_dict() for name in self.MODULES}
        blob["meta"] = json.dumps({"vae_step": self.vae_step, "clip_step": self.clip_step, "step": self.step,
                                   "seconds": self.seconds,
                                   "scaling_factor": self.scaling_factor, "evals": self.evals,
                                   "hardware": self.hardware, "history": self.history,
                                   "plan": dataclasses.asdict(self.plan)})
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)  # never a half-written checkpoint

    def load(self, path: Path) -> None:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        for name in self.MODULES:
            getattr(self, name).load_state_dict(blob[name])
        meta = json.loads(blob["meta"])
        self.vae_step, self.clip_step, self.step = meta["vae_step"], meta["clip_step"], meta["step"]
        self.seconds = meta["seconds"]
        self.scaling_factor, self.evals = meta["scaling_factor"], meta["evals"]
        self.hardware, self.history = meta["hardware"], meta.get("history", [])
        if meta["plan"]["seed"] != self.plan.seed:
            raise SystemExit(f"{path} was trained with seed {meta['plan']['seed']}, not {self.plan.seed}")
        where = f"vae step {self.vae_step}, clip step {self.clip_step}, unet step {self.step}"
        for key, old in meta["plan"].items():
            new = getattr(self.plan, key, None)
            if new != old and key != "eval_every":
                self.history.append(f"{key} changed from {old} to {new} at {where}")
                print(f"note: {self.history[-1]}", file=sys.stderr)

    def pipeline(self, tokenizer: CLIPTokenizer) -> Pipeline:
        """A minisd Pipeline of the EMA weights, as they would be exported."""
        vae = copy.deepcopy(self.vae).eval()
        vae.scaling_factor = self.scaling_factor
        return Pipeline(tokenizer, self.text_encoder.eval(), self.ema_unet.eval(), vae,
                        DPMSolverMultistep(SCHEDULER), safety_checker=None, name="minisd-shapes")


class Progress:
    """Progress on stderr: redrawn in place on a terminal, a line a minute in a log file."""

    def __init__(self, name: str, done: int, total: int):
        self.name, self.done, self.total, self.start_done = name, done, total, done
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, **values: float) -> None:
        self.done = done
        now = time.perf_counter()
        if not self.tty and now - self.last < 60 and done < self.total:
            return
        self.last = now
        rate = (now - self.start) / max(done - self.start_done, 1)
        eta = rate * (self.total - done)
        bar = "#" * int(20 * done / self.total)
        text = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        line = (f"{self.name} {done:5d}/{self.total} [{bar:<20}] {text} {rate:.2f}s/step "
                f"eta {eta / 60:.0f}min")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


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
    bar = Progress("vae", state.vae_step, plan.vae_steps)
    last_save = time.perf_counter()
    while state.vae_step < plan.vae_steps:
        t0 = time.perf_counter()
        rng, gen = batch_rng(plan, "vae", state.vae_step)
        x = to_tensor(shapes.batch(rng, plan.vae_batch)[0])
        lr = plan.vae_lr * cosine(state.vae_step, plan.vae_steps, warmup=50)
        for group in state.vae_opt.param_groups:
            group["lr"] = lr
        # bfloat16 matmuls and convolutions (fp32 weights): 1.5x faster on a CPU with
        # AVX512-BF16, and reconstructions of flat colours do not need more precision.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, pixel, kl = vae_loss(vae, x, gen, plan.kl_weight)
        state.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        state.vae_opt.step()
        state.vae_step += 1
        state.seconds["vae"] += time.perf_counter() - t0
        bar.update(state.vae_step, pixel=pixel.item(), kl=kl.item())
        if state.vae_step % 250 == 0:
            vae.eval()
            print(f"\nvae step {state.vae_step}: {vae_report(state)}", file=sys.stderr, flush=True)
            vae.train()
        if time.perf_counter() - last_save > save_every:
            state.save(checkpoint)
            last_save = time.perf_counter()
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

class CLIPHeads(nn.Module):
    """What CLIP trains beside its text tower and then throws away: an image tower (here a
    small CNN on the VAE's latents; flattened, not pooled, so it sees where things are),
    the two projections into the shared space and the temperature."""

    def __init__(self, dim: int):
        super().__init__()
        self.image_tower = nn.Sequential(
            nn.Conv2d(VAE.latent_channels, 64, 3, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),   # 8x8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),   # 4x4
            nn.Flatten(), nn.Linear(64 * 16, 256), nn.SiLU(), nn.Linear(256, dim))
        self.text_projection = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature


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
    bar = Progress("clip", state.clip_step, plan.clip_steps)
    last_save = time.perf_counter()
    smooth = None
    while state.clip_step < plan.clip_steps:
        t0 = time.perf_counter()
        for group in state.clip_opt.param_groups:
            group["lr"] = plan.clip_lr * cosine(state.clip_step, plan.clip_steps, warmup=50)
        loss, accuracy = clip_loss(state, tokenizer, state.clip_step)
        state.clip_opt.zero_grad(set_to_none=True)
        loss.backward()
        state.clip_opt.step()
        state.clip_step += 1
        state.seconds["clip"] += time.perf_counter() - t0
        smooth = accuracy if smooth is None else 0.95 * smooth + 0.05 * accuracy
        bar.update(state.clip_step, loss=loss.item(), accuracy=smooth)
        if time.perf_counter() - last_save > save_every or state.clip_step == plan.clip_steps:
            state.save(checkpoint)
            last_save = time.perf_counter()
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


def diffusion_loss(state: State, tokenizer: CLIPTokenizer, alphas_cumprod: torch.Tensor, step: int):
    plan = state.plan
    rng, gen = batch_rng(plan, "unet", step)
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
    predicted = state.unet(noisy, t, context)
    per_image = F.mse_loss(predicted, noise, reduction="none").mean(dim=(1, 2, 3))
    return (loss_weights(alphas_cumprod, plan)[t] * per_image).mean(), per_image.mean()


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
    bar = Progress("unet", state.step, plan.steps)
    last_save = time.perf_counter()
    smooth = None
    while state.step < plan.steps:
        t0 = time.perf_counter()
        for group in state.opt.param_groups:
            group["lr"] = plan.lr * cosine(state.step, plan.steps, plan.warmup)
        loss, raw = diffusion_loss(state, tokenizer, alphas_cumprod, state.step)
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.unet.parameters(), 1.0)
        state.opt.step()
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
        if time.perf_counter() - last_save > save_every or state.step == plan.steps:
            state.save(checkpoint)
            last_save = time.perf_counter()
    bar.close()


# --- export ------------------------------------------------------------------------------

def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _fp16(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}


def _listed(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


DIFFUSERS_VERSION = "0.42.1"  # the version whose config format this writes (and tests load it)
TRANSFORMERS_VERSION = "5.24.0"


def export(state: State, out: Path, card_eval: int = 100) -> None:
    """Write the diffusers pipeline folder: configs, float16 safetensors, tokenizer, and a
    model card with an evaluation of the written folder (`card_eval` prompts, 25 steps)."""
    if out.exists():
        shutil.rmtree(out)
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
    unet = _listed(UNET)
    unet.pop("num_attention_heads")  # None: diffusers reads attention_head_dim (the head count)
    _json(out / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                         "_diffusers_version": DIFFUSERS_VERSION, **unet})
    save_file(_fp16(state.ema_unet), out / "unet" / "diffusion_pytorch_model.safetensors")

    vae = _listed(dataclasses.replace(VAE, scaling_factor=round(state.scaling_factor, 5)))
    n = len(VAE.block_out_channels)
    _json(out / "vae" / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **vae,
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
    pipe = Pipeline.from_pretrained(out, safety_checker=None)
    shapes_grid.write_samples(pipe, out / "samples.png")
    (out / "README.md").write_text(model_card(state, out, card_eval, pipe))


def model_card(state: State, out: Path, n_eval: int, pipe: Pipeline) -> str:
    """README.md of the exported folder (loaded as `pipe`): what the model is and is not,
    measured, not claimed."""
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

`python tools/eval_shapes.py --model weights/minisd-shapes --n {n_eval} --steps 25 --seed 1234`:
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
| unet | SD v1 UNet, layers_per_block 1 (small-sd's layout), channels {list(UNET.block_out_channels)}, cross-attention at 8x8, 4x4 and the middle | {params['unet'] / 1e6:.2f}M |
| vae | AutoencoderKL, channels {list(VAE.block_out_channels)}: 64x64x3 images <-> 16x16x4 latents, scaling_factor {state.scaling_factor:.5f} | {params['vae'] / 1e6:.2f}M |
| scheduler | DPM-Solver++ (2nd order) on SD v1's scaled-linear betas (0.00085 to 0.012, 1000 steps), epsilon prediction | |

Weights are stored as float16 safetensors (so the folder, {total_mb:.1f} MB with the tokenizer,
stays small) and load as float32 in minisd and in diffusers' `StableDiffusionPipeline`, which
gives the same images (tests/test_shapes.py checks it).

## Training

* Data: tools/shapes.py, an endless procedural set of captioned 64x64 images (one shape,
  {len(shapes.COLOURS)} colours: {colours}; {len(shapes.SHAPES)} shapes, 2 sizes, 5 positions, with a few pixels of
  jitter), captions from a small grammar with five sentence forms. Never the same image twice.
* VAE: {plan.vae_steps} steps of batch {plan.vae_batch} ({plan.vae_steps * plan.vae_batch:,} images), AdamW lr {plan.vae_lr:g} with cosine
  decay, L1 + MSE reconstruction + {plan.kl_weight:g} x KL; {hours(state.seconds['vae'])}.
* Text encoder, as CLIP: {plan.clip_steps} steps of batch {plan.clip_batch} ({plan.clip_steps * plan.clip_batch:,} caption-image pairs),
  contrastive loss against a small CNN on the latents (discarded), AdamW lr {plan.clip_lr:g}; {hours(state.seconds['clip'])}.
* UNet, text encoder frozen: {plan.steps} steps of batch {plan.batch} ({plan.steps * plan.batch:,} images), AdamW lr {plan.lr:g}
  ({plan.warmup} warm-up steps, cosine decay to a tenth), gradient clipping at 1, epsilon loss
  weighted over timesteps by min(SNR, {plan.min_snr_gamma:g})/SNR x min(1 + 1/SNR, {plan.high_noise_cap:g}) (see `loss_weights`),
  caption dropped to "" for {plan.cfg_dropout:.0%} of samples (classifier-free guidance), EMA of the
  weights (decay {plan.ema_decay}) exported; {hours(state.seconds['unet'])}.
* In all {hours(sum(state.seconds.values()))} of training (wall time of the training steps, not counting
  the small evaluations) on {state.hardware}, shared with other jobs. Seed {plan.seed}.
* Changes made while resuming: {"; ".join(state.history) or "none"}.
* Reproduce (resumable; checkpoints in .cache/train_shapes/): `python tools/train_shapes.py`

Accuracy during training (20 prompts, 10 steps, guidance 7.5, EMA weights; the colour
column suffers from the overshoot above):

| step | background | colour | shape | position |
|---|---|---|---|---|
{evals}
"""


def hardware_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, 1 thread (torch {torch.__version__})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"pipeline folder to write (default {OUT_DIR})")
    p.add_argument("--work", type=Path, default=WORK_DIR, help="training checkpoints (default .cache/train_shapes)")
    p.add_argument("--export-only", action="store_true", help="write --out from the checkpoint and stop")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything, into /tmp")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--card-eval", type=int, default=100, help="prompts the model card's evaluation uses")
    p.add_argument("--save-every", type=float, default=180, help="seconds between checkpoints (default 180)")
    for field in dataclasses.fields(Plan):
        p.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Plan) if getattr(args, f.name) is not None}
    if args.smoke:
        args.card_eval = min(args.card_eval, 4)
        overrides = dict(vae_steps=3, vae_batch=4, clip_steps=3, clip_batch=8, steps=4, batch=4, warmup=2, eval_every=2) | overrides
        if args.out == OUT_DIR:
            args.out = Path("/tmp/minisd-shapes-smoke")
        if args.work == WORK_DIR:
            args.work = Path("/tmp/minisd-shapes-smoke-work")
    plan = Plan(**overrides)
    checkpoint = args.work / "state.pt"
    state = State(plan)
    if checkpoint.exists():
        state.load(checkpoint)
        print(f"resuming from {checkpoint}: vae step {state.vae_step}/{plan.vae_steps}, "
              f"unet step {state.step}/{plan.steps}", file=sys.stderr)
    tokenizer = CLIPTokenizer.from_folder(CLIP_VOCAB_DIR)
    sizes = {name: sum(p.numel() for p in getattr(state, name).parameters()) for name in ("vae", "text_encoder", "unet")}
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sizes.items()), file=sys.stderr)

    if not args.export_only:
        if state.vae_step < plan.vae_steps:
            train_vae(state, checkpoint, args.save_every)
            state.scaling_factor = None
        if state.scaling_factor is None:
            state.vae.eval()
            state.scaling_factor = measure_scaling_factor(state)
            print(f"scaling_factor {state.scaling_factor:.5f}; vae {vae_report(state)}", file=sys.stderr)
            state.save(checkpoint)
        if state.clip_step < plan.clip_steps:
            train_clip(state, tokenizer, checkpoint, args.save_every)
        train_unet(state, tokenizer, checkpoint, args.save_every)
    elif state.scaling_factor is None:
        raise SystemExit(f"{checkpoint}: the VAE is not trained yet; nothing to export")
    state.vae.eval()
    export(state, args.out, args.card_eval)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
