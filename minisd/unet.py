"""The SD v1 conditional UNet: predicts the noise in a latent, given the timestep and the
text context.

    latent [B,4,h,w] -> conv_in -> down blocks (resnets + cross-attention, then a stride-2 conv)
                     -> mid block -> up blocks (concatenating the skips)   -> conv_out -> [B,4,h,w]

Any `layers_per_block` (small-sd: 1, SD v1.x: 2); up blocks have one resnet more than down
blocks, one for each skip the down path saved. Module paths equal diffusers' state-dict keys
(`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`). Follows
https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_2d_condition.py
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checkpoint import load_component
from .config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding of the timestep, as in "Attention is all you need"; frequencies
    10000^(-i / (half - freq_shift)). diffusers' `get_timestep_embedding` in embeddings.py."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, time_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """A residual block (https://arxiv.org/abs/1512.03385): x + F(x), where F is GroupNorm ->
    SiLU -> conv, twice, with the time embedding added in between. The VAE uses it without a
    time embedding (`time_dim=None`)."""

    def __init__(self, c_in: int, c_out: int, time_dim: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, c_out) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.shortcut(x) + self.residual(x, temb)

    def residual(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:  # the timestep, as a per-channel shift
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h)))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.conv_shortcut is None else self.conv_shortcut(x)  # 1x1 conv when widths differ


class Attention(nn.Module):
    """Multi-head attention (https://arxiv.org/abs/1706.03762): self-attention among the
    feature map's pixels, or, with `context_dim`, cross-attention from the pixels to the text.
    minisd/fast.py swaps in two faster equivalents (one fused q/k/v product; text keys and
    values computed once per generation); they share `attend`."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        # A list of one: diffusers keeps a dropout after it, so the key is `to_out.0`.
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context  # [B, N, dim] pixels, [B, 77, context_dim] text
        return self.attend(self.to_q(x), self.to_k(context), self.to_v(context))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim)) v in each head, heads merged, output projection."""
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """GELU-gated linear unit (https://arxiv.org/abs/2002.05202): one projection to twice the
    width, half of it gating the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # [GEGLU, dropout, linear]: the dropout (a no-op at inference) is why the output
        # layer's key is `ff.net.2`.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-norm + residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # x: [B, h*w, C] pixels as tokens
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def to_feature_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Tokens [B, H*W, C] back to a feature map [B, C, H, W] in the memory layout of `like`
    (the block's input). In channels-last that is a free view; an NCHW model needs the copy,
    since a channels-last input makes every later convolution re-lay out its weights, per
    call (measured: +20% per UNet step on the CPU)."""
    h, w = like.shape[-2:]
    layout = torch.contiguous_format if like.is_contiguous() else torch.channels_last
    return rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w).contiguous(memory_format=layout)


class Transformer2DModel(nn.Module):
    """Feature map -> tokens -> transformer block -> feature map, with a residual around it."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        # Quirk: eps 1e-6 here, not the UNet's norm_eps (1e-5); diffusers hard-codes it.
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)  # SD v1: 1x1 convs; SD 2 uses linears
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x, context)

    def residual(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.proj_out(to_feature_map(tokens, like=x))


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Nearest-neighbour x2, or to the skip's size when an odd size was halved on the
        # way down (a 12-wide latent goes 12 -> 6 -> 3 -> 2 and must come back 2 -> 3).
        # bf16 goes through fp32 as in diffusers: nearest upsampling lacks bf16 kernels on some backends.
        up = F.interpolate(x.float() if x.dtype == torch.bfloat16 else x, size=size,
                           scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(up.to(x.dtype))


class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` when `heads` is given, else `DownBlock2D`."""

    def __init__(self, c_in: int, c_out: int, layers: int, heads: int | None, add_downsample: bool,
                 c: UNetConfig, time_dim: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c_in if i == 0 else c_out, c_out, time_dim,
                                                   c.norm_num_groups, c.norm_eps) for i in range(layers))
        self.attentions = nn.ModuleList(Transformer2DModel(c_out, heads, c.cross_attention_dim, c.norm_num_groups)
                                        for _ in range(layers)) if heads else None
        self.downsamplers = nn.ModuleList([Downsample2D(c_out, c.downsample_padding)]) if add_downsample else None

    def forward(self, x, temb, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[B, c_in, h, w] -> [B, c_out, h/2, w/2] (no halving in the last block), and the
        output of every layer, saved for the up path."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` when `heads` is given, else `UpBlock2D`. Resnet i takes the
    previous output concatenated with one skip from the matching down block."""

    def __init__(self, c_prev: int, c_out: int, skip_channels: list[int], heads: int | None,
                 add_upsample: bool, c: UNetConfig, time_dim: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((c_prev if i == 0 else c_out) + skip, c_out, time_dim, c.norm_num_groups, c.norm_eps)
            for i, skip in enumerate(skip_channels))
        self.attentions = nn.ModuleList(Transformer2DModel(c_out, heads, c.cross_attention_dim, c.norm_num_groups)
                                        for _ in skip_channels) if heads else None
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)]) if add_upsample else None

    def forward(self, x, skips: list[torch.Tensor], temb, context, upsample_size=None) -> torch.Tensor:
        """[B, c_prev, h, w] and this level's skips -> [B, c_out, 2h, 2w] (no doubling in the last block)."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, channels: int, heads: int, c: UNetConfig, time_dim: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, time_dim, c.norm_num_groups, c.norm_eps)
                                     for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, c.cross_attention_dim, c.norm_num_groups)])

    def forward(self, x, temb, context) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UNet2DConditionModel(nn.Module):
    """`unet(sample [B,C,h,w], timestep (scalar or [B]), context [B,T,D]) -> noise [B,C,h,w]`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        channels, heads = c.block_out_channels, c.heads_per_block()
        time_dim = channels[0] * 4
        self.conv_in = nn.Conv2d(c.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim)

        n = len(channels)
        self.down_blocks = nn.ModuleList()
        skip_channels = [channels[0]]  # what each down step saves, in order, for the up path
        for i, block_type in enumerate(c.down_block_types):
            c_in = channels[max(i - 1, 0)]
            self.down_blocks.append(DownBlock(c_in, channels[i], c.layers_per_block,
                                              heads[i] if block_type == "CrossAttnDownBlock2D" else None,
                                              i < n - 1, c, time_dim))
            skip_channels += [channels[i]] * (c.layers_per_block + (i < n - 1))

        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], heads[-1], c, time_dim)

        self.up_blocks = nn.ModuleList()
        c_prev = channels[-1]
        for i, block_type in enumerate(c.up_block_types):
            j = n - 1 - i  # the down block this up block mirrors
            block_skips = [skip_channels.pop() for _ in range(c.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(c_prev, channels[j], block_skips,
                                          heads[j] if block_type == "CrossAttnUpBlock2D" else None,
                                          i < n - 1, c, time_dim))
            c_prev = channels[j]

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, 3, padding=1)

    def embed_timestep(self, timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
        """The timestep (a scalar, or one per sample) -> temb [B, 4 * channels[0]]."""
        c = self.config
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.dim() == 0 else t
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        return self.time_embedding(t_emb.to(sample.dtype))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        context = encoder_hidden_states
        # 1. time: sinusoidal features of t -> MLP -> temb [B, 4 * channels[0]]
        temb = self.embed_timestep(timestep, sample)

        # 2. in: [B, 4, h, w] -> [B, channels[0], h, w]
        x = self.conv_in(sample)

        # 3. down: each level halves h and w (but the last); every step is saved as a skip
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips

        # 4. middle, at the coarsest level: resnet, attention, resnet
        x = self.mid_block(x, temb, context)

        # 5. up: each resnet reads one skip, newest first; each level doubles h and w (but the last)
        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # Upsample to the next skip's size, which differs from 2x for odd sizes.
            x = block(x, block_skips, temb, context, skips[-1].shape[-2:] if skips else None)

        # 6. out: [B, channels[0], h, w] -> predicted noise [B, 4, h, w]
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def load_unet(pipeline_folder: str | Path, device="cpu", dtype=torch.float32,
              variant: str | None = None, channels_last: bool = False) -> UNet2DConditionModel:
    """`channels_last=True` stores the convolution kernels NHWC, the layout fast convolutions want."""
    return load_component(pipeline_folder, "unet", UNet2DConditionModel, UNetConfig, device, dtype, variant,
                          channels_last)
