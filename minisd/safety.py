"""The safety checker SD v1 ships with: embed each image with a CLIP ViT-L/14 vision tower and
compare it with hidden concept embeddings; an image close to any concept comes back black.

`choose_safety_checker` is the policy a Pipeline follows: which checker runs, and what it says
when none does. The concept embeddings and their thresholds are data of the checkpoint (`concept_embeds`,
`special_care_embeds` and their `*_weights`): minisd loads them, never prints or logs them.

Scoring follows diffusers' `StableDiffusionSafetyChecker.forward`
https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/stable_diffusion/safety_checker.py
and preprocessing transformers' CLIP image processor (PIL backend).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoint import load_component
from .clip import CLIPVisionModel
from .config import SafetyCheckerConfig, read_json
from .errors import CheckpointError, InputError
from .folders import read_model_index

log = logging.getLogger("minisd")

NUM_CONCEPTS, NUM_SPECIAL_CARE = 17, 3  # fixed by the released checker
SPECIAL_CARE_ADJUSTMENT = 0.01


@dataclass(frozen=True)
class CLIPPreprocess:
    """CLIP's image preprocessing, from `feature_extractor/preprocessor_config.json`."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)  # height, width
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_folder(cls, folder: Path) -> "CLIPPreprocess":
        path = folder / "feature_extractor" / "preprocessor_config.json"
        if not path.is_file():
            return cls()  # SD v1 checkpoints all use CLIP's defaults
        raw = read_json(path)
        try:
            size, crop = raw.get("size", 224), raw.get("crop_size", 224)
            # Older configs give plain ints; newer ones dicts.
            edge = size["shortest_edge"] if isinstance(size, dict) else int(size)
            crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
            return cls(edge, crop, int(raw.get("resample", 3)), float(raw.get("rescale_factor", 1 / 255)),
                       tuple(raw.get("image_mean", cls.mean)), tuple(raw.get("image_std", cls.std)))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable preprocessing config ({e!r})") from None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Float images [B,3,H,W] in [0,1] -> CLIP pixel values [B,3,crop_h,crop_w].
        Goes through 8-bit PIL images, as diffusers' pipeline does before the processor."""
        pixels = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        return torch.stack([self._one(Image.fromarray(p)) for p in pixels])

    def _one(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        # Shortest edge to `shortest_edge`, the other scaled and truncated to an int.
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        array = np.asarray(image.resize(size, resample=self.resample))
        ch, cw = self.crop
        top, left = (array.shape[0] - ch) // 2, (array.shape[1] - cw) // 2
        if top < 0 or left < 0:
            raise InputError(f"safety checker: image {w}x{h} too small for a {cw}x{ch} crop")
        array = array[top:top + ch, left:left + cw]
        x = torch.from_numpy(array.astype(np.float32) * np.float32(self.rescale_factor)).permute(2, 0, 1)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]


class SafetyChecker(nn.Module):
    """`checker(images [B,3,H,W] in [0,1]) -> (images with flagged ones black, has_nsfw)`."""

    def __init__(self, config: SafetyCheckerConfig):
        super().__init__()
        vision = config.vision_config
        self.vision_model = CLIPVisionModel(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        self.register_buffer("concept_embeds", torch.empty(NUM_CONCEPTS, config.projection_dim))
        self.register_buffer("special_care_embeds", torch.empty(NUM_SPECIAL_CARE, config.projection_dim))
        self.register_buffer("concept_embeds_weights", torch.empty(NUM_CONCEPTS))
        self.register_buffer("special_care_embeds_weights", torch.empty(NUM_SPECIAL_CARE))
        self.preprocess = CLIPPreprocess()

    def extra_repr(self) -> str:
        return "concept embeddings: hidden"

    def scores(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(special-care scores [B,3], concept scores [B,17]); a score > 0 is a hit."""
        embeds = F.normalize(self.visual_projection(self.vision_model(pixel_values)).float(), dim=-1)
        special_cos = embeds @ F.normalize(self.special_care_embeds.float(), dim=-1).T
        concept_cos = embeds @ F.normalize(self.concept_embeds.float(), dim=-1).T
        # diffusers walks the special-care concepts in order: once one scores > 0, every later
        # special-care score and all concept scores get +0.01 (a stricter check for that image).
        adjustment = torch.zeros(embeds.shape[0], device=embeds.device)
        special = []
        for j in range(special_cos.shape[1]):
            score = round3(special_cos[:, j] - self.special_care_embeds_weights[j].float() + adjustment)
            special.append(score)
            adjustment = torch.where(score > 0, SPECIAL_CARE_ADJUSTMENT, adjustment)
        concept = round3(concept_cos - self.concept_embeds_weights.float() + adjustment[:, None])
        return torch.stack(special, dim=1), concept

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"safety checker: expected images [B,3,H,W], got shape {tuple(images.shape)}")
        pixels = self.preprocess(images).to(self.visual_projection.weight)
        _, concept = self.scores(pixels)
        flagged = (concept > 0).any(dim=1)
        black = torch.zeros_like(images)
        images = torch.where(flagged.to(images.device)[:, None, None, None], black, images)
        return images, flagged.tolist()


def round3(x: torch.Tensor) -> torch.Tensor:
    # diffusers rounds each score to 3 decimals (numpy: scale, round half to even, unscale).
    return torch.round(x * 1000) / 1000


def load_safety_checker(pipeline_folder: str | Path, device="cpu", dtype=torch.float32,
                        variant: str | None = None) -> SafetyChecker:
    checker = load_component(pipeline_folder, "safety_checker", SafetyChecker, SafetyCheckerConfig,
                             device, dtype, variant)
    checker.preprocess = CLIPPreprocess.from_folder(Path(pipeline_folder))
    return checker


NOT_GIVEN = object()  # `choose_safety_checker`'s "the caller passed nothing"


def choose_safety_checker(folder: Path, given=NOT_GIVEN, device="cpu", dtype=torch.float32,
                          variant: str | None = None) -> SafetyChecker | None:
    """The pipeline's checker, by the usual policy: one the caller passed wins, and None turns
    filtering off with a warning; else the folder's own. A folder without one gets a warning,
    or only a note when its model_index.json declares it needs none (minisd-shapes draws
    coloured shapes)."""
    if given is not NOT_GIVEN:
        if given is None:
            log.warning("The safety checker is disabled: images are returned unfiltered. Keep it on "
                        "for any service open to the public.")
        return given
    if not (folder / "safety_checker").is_dir():
        declared_safe = read_model_index(folder).get("requires_safety_checker") is False
        (log.info if declared_safe else log.warning)(
            "%s has no safety_checker folder: images are returned unfiltered.", folder)
        return None
    return load_safety_checker(folder, device=device, dtype=dtype, variant=variant)
