"""CLIP: one pre-norm transformer used twice in SD v1.

* `CLIPTextModel`: the causal text tower that turns 77 token ids into the UNet's context
  (SD v1 uses the last hidden state, after the final layer norm, not the pooled output).
* `CLIPVisionModel`: the ViT tower the safety checker embeds images with.

Module paths equal transformers' state-dict keys (`encoder.layers.0.self_attn.q_proj`), so
loading is a plain copy. Follows
https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checkpoint import load_component
from .config import CLIPTextConfig, CLIPVisionConfig
from .errors import InputError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI trained CLIP with this sigmoid approximation of GELU; exact GELU drifts.
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        q, k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = CLIPAttention(dim, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, causal: bool, skip_last: int = 0) -> torch.Tensor:
        for layer in self.layers[:len(self.layers) - skip_last]:
            x = layer(x, causal)
        return x


def embedding(num: int, dim: int) -> nn.Embedding:
    # The weights come from the checkpoint: skip nn.Embedding's random init, which on the meta
    # device (where loading builds modules) would import torch's compiler, a second of start-up.
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)


class CLIPTextModel(nn.Module):
    """`text_encoder(ids [B, T]) -> last hidden state [B, T, hidden]`, T <= 77.

    `clip_skip=k` stops k layers before the last and applies the final layer norm to that
    hidden state, diffusers' `clip_skip` (AUTOMATIC1111's "Clip skip" k + 1): models fine-tuned
    on the penultimate layer's features want k = 1. Stopping early equals taking transformers'
    `hidden_states[-(k + 1)]`: hidden state j is the output of the first j layers.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        self._check_ids(input_ids)
        skip = check_clip_skip(clip_skip, self.config.num_hidden_layers)
        # Each token sees only itself and earlier tokens: CLIP's text tower is causal, so
        # padding after the end token does not change the states before it.
        x = self.encoder(self.embeddings(input_ids), causal=True, skip_last=skip)
        return self.final_layer_norm(x)

    def _check_ids(self, ids: torch.Tensor) -> None:
        c = self.config
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"text_encoder: input_ids must be an integer tensor [batch, tokens], "
                             f"got {ids.dtype} of shape {tuple(ids.shape)}")
        if ids.shape[1] > c.max_position_embeddings:
            raise InputError(f"text_encoder: {ids.shape[1]} tokens, at most {c.max_position_embeddings}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size):
            raise InputError(f"text_encoder: token ids must lie in [0, {c.vocab_size}), "
                             f"got [{int(ids.min())}, {int(ids.max())}]")


def check_clip_skip(clip_skip, num_layers: int) -> int:
    """clip_skip as an int in [0, num_layers]; None is 0. diffusers allows num_layers too: then
    no layer runs and the token embeddings themselves are normalized."""
    if clip_skip is None:
        return 0
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip <= num_layers:
        raise InputError(f"clip_skip: must be an integer from 0 to {num_layers} (this text encoder has "
                         f"{num_layers} layers; 1 = the penultimate layer), got {clip_skip!r}")
    return clip_skip


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, patch, stride=patch, bias=False)
        num_positions = (config.image_size // patch) ** 2 + 1  # patches + the class token
        self.position_embedding = embedding(num_positions, dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = rearrange(self.patch_embedding(pixels), "b c h w -> b (h w) c")
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionModel(nn.Module):
    """`vision(pixels [B, 3, 224, 224]) -> pooled embedding [B, hidden]` (the class token)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        # Quirk: the name really is `pre_layrnorm` in OpenAI's and transformers' code.
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), causal=False)
        return self.post_layernorm(x[:, 0])


def load_text_encoder(pipeline_folder: str | Path, device="cpu", dtype=torch.float32,
                      variant: str | None = None) -> CLIPTextModel:
    return load_component(pipeline_folder, "text_encoder", CLIPTextModel, CLIPTextConfig,
                          device, dtype, variant)
