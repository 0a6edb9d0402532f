"""minisd-shapes, what tools/train_shapes.py trains: its architecture, the training plan, and
the training state that a checkpoint holds.

The architecture is SD v1's, shrunk to tools/shapes.py's 64x64 world (minisd.config's
`minisd_shapes` preset): an AutoencoderKL with 3 blocks (64x64 images <-> 4x16x16 latents), a
3-layer CLIP text transformer 64 wide on the real 49,408-token CLIP vocabulary (weights/clip),
and a layers_per_block=1 UNet (small-sd's layout) on SD v1's scaled-linear noise schedule.
`Plan` is how long and how hard each phase trains (tools/train_phases.py); `State` is
everything a resumed run needs, in one file.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import sys
from pathlib import Path

import torch
from torch import nn

import shapes
from minisd.clip import CLIPTextModel, load_text_encoder
from minisd.config import minisd_shapes
from minisd.dpm_solver import DPMSolverMultistep
from minisd.pipeline import Pipeline
from minisd.tokenizer import CLIPTokenizer
from minisd.unet import UNet2DConditionModel
from minisd.vae import AutoencoderKL, load_vae

CLIP_VOCAB_DIR = Path(__file__).resolve().parents[1] / "weights" / "clip"

# The architecture is minisd's preset of the shipped model, one definition for minisd and this
# training: attention only at 8x8 and 4x4 (and the mid block), since at 16x16 it would cost more
# than it gives on a one-thread CPU budget (small-sd puts it on the three larger levels). Its
# VAE scaling_factor is the shipped model's; training measures its own (State.scaling_factor).
_PRESET = minisd_shapes()
UNET, VAE, TEXT, SCHEDULER = (_PRESET[k] for k in ("unet", "vae", "text_encoder", "scheduler"))
assert VAE.downscale_factor * UNET.sample_size == shapes.SIZE  # the default image is shapes' 64x64


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
    # 1: small-sd's layout (the shipped model); 2: SD v1-4/v1-5's, the teacher that
    # tools/distill.py shrinks and distils (trained on the shipped text encoder and VAE).
    layers_per_block: int = 1


def unet_config(plan: Plan):
    """The UNet a plan trains: the shipped architecture with the plan's layers per block."""
    return dataclasses.replace(UNET, layers_per_block=plan.layers_per_block)


class CLIPHeads(nn.Module):
    """What CLIP trains beside its text tower and then throws away (phase 2; never exported):
    an image tower (here a small CNN on the VAE's latents; flattened, not pooled, so it sees
    where things are), the two projections into the shared space and the temperature."""

    def __init__(self, dim: int):
        super().__init__()
        self.image_tower = nn.Sequential(
            nn.Conv2d(VAE.latent_channels, 64, 3, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),   # 8x8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),   # 4x4
            nn.Flatten(), nn.Linear(64 * 16, 256), nn.SiLU(), nn.Linear(256, dim))
        self.text_projection = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature


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
        self.unet = UNet2DConditionModel(unet_config(plan))
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
        self.encoders_from: str | None = None  # a pipeline folder whose VAE and text encoder were taken

    MODULES = ("vae", "text_encoder", "clip", "unet", "vae_opt", "clip_opt", "opt", "ema_unet")

    def save(self, path: Path) -> None:
        blob = {name: getattr(self, name).state_dict() for name in self.MODULES}
        blob["meta"] = json.dumps({"vae_step": self.vae_step, "clip_step": self.clip_step, "step": self.step,
                                   "seconds": self.seconds,
                                   "scaling_factor": self.scaling_factor, "evals": self.evals,
                                   "hardware": self.hardware, "history": self.history,
                                   "encoders_from": self.encoders_from,
                                   "plan": dataclasses.asdict(self.plan)})
        save_checkpoint(blob, path)

    def load(self, path: Path) -> None:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        saved_layers = meta["plan"].get("layers_per_block", 1)
        if saved_layers != self.plan.layers_per_block:
            raise SystemExit(f"{path} holds a UNet with layers_per_block={saved_layers}, not "
                             f"{self.plan.layers_per_block}; pass --layers-per-block {saved_layers} or another --work")
        for name in self.MODULES:
            getattr(self, name).load_state_dict(blob[name])
        self.vae_step, self.clip_step, self.step = meta["vae_step"], meta["clip_step"], meta["step"]
        self.seconds = meta["seconds"]
        self.scaling_factor, self.evals = meta["scaling_factor"], meta["evals"]
        self.hardware, self.history = meta["hardware"], meta.get("history", [])
        self.encoders_from = meta.get("encoders_from")
        if meta["plan"]["seed"] != self.plan.seed:
            raise SystemExit(f"{path} was trained with seed {meta['plan']['seed']}, not {self.plan.seed}")
        where = f"vae step {self.vae_step}, clip step {self.clip_step}, unet step {self.step}"
        for key, old in meta["plan"].items():
            new = getattr(self.plan, key, None)
            if new != old and key != "eval_every":
                self.history.append(f"{key} changed from {old} to {new} at {where}")
                print(f"note: {self.history[-1]}", file=sys.stderr)

    def take_encoders(self, folder: Path) -> None:
        """Use the VAE (with its scaling factor) and text encoder of the pipeline folder
        `folder` instead of training them: phases 1 and 2 count as done. A teacher trained this
        way sees exactly the latents and text states its students will."""
        vae, text_encoder = load_vae(folder), load_text_encoder(folder)
        self.vae.load_state_dict(vae.state_dict())
        self.text_encoder.load_state_dict(text_encoder.state_dict())
        self.scaling_factor = vae.scaling_factor
        self.vae_step, self.clip_step = self.plan.vae_steps, self.plan.clip_steps
        self.encoders_from = str(Path(folder).resolve())  # resolved: a resume may name it otherwise

    def pipeline(self, tokenizer: CLIPTokenizer) -> Pipeline:
        """A minisd Pipeline of the EMA weights, as they would be exported."""
        vae = copy.deepcopy(self.vae).eval()
        vae.scaling_factor = self.scaling_factor
        return Pipeline(tokenizer, self.text_encoder.eval(), self.ema_unet.eval(), vae,
                        DPMSolverMultistep(SCHEDULER), safety_checker=None, name="minisd-shapes")


def save_checkpoint(blob: dict, path: Path) -> None:
    """torch.save `blob` to `path` through a temporary file: never a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def hardware_name() -> str:
    """The training machine, as the model card names it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, 1 thread (torch {torch.__version__})"
