"""AutoencoderKL: SD's VAE. The encoder turns an image [B,3,H,W] in [-1, 1] into a Gaussian
over latents [B,4,H/8,W/8]; the decoder turns latents back into an image.

Callers scale: the UNet works on `latent * scaling_factor` (unit variance), so
`decode(z)` wants latents already divided by it and `encode(x)` returns the unscaled
distribution. Module paths equal diffusers' keys. Follows
https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/vae.py
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checkpoint import load_component
from .config import VAEConfig
from .unet import ResnetBlock2D, Upsample2D, to_feature_map

EPS = 1e-6  # every norm in the VAE uses 1e-6


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels of the smallest feature map, with its own
    GroupNorm and residual. Old checkpoints name its layers query/key/value/proj_attn."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key `to_out.0`, as in the UNet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        tokens = rearrange(self.group_norm(x), "b c h w -> b 1 (h w) c")
        out = F.scaled_dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))
        return to_feature_map(self.to_out[0](out).squeeze(1), like=x)


class MidBlock(nn.Module):
    """`UNetMidBlock2D`: resnet, attention, resnet (no time embedding)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Quirk: the VAE pads right and bottom only (LDM's choice), then convolves unpadded.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEBlock(nn.Module):
    """diffusers' `DownEncoderBlock2D` (resample="down") and `UpDecoderBlock2D` (resample="up"):
    resnets, then a stride-2 convolution or a nearest x2 upsampling (none in the last block)."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, groups, EPS)
                                     for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample(c_out)]) if resample == "down" else None
        self.upsamplers = nn.ModuleList([Upsample2D(c_out)]) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            VAEBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, groups, "down" if i < len(ch) - 1 else None)
            for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], groups, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, groups = c.block_out_channels[::-1], c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, c.mid_block_add_attention)
        # One resnet more than the encoder per block, like the UNet's up path.
        self.up_blocks = nn.ModuleList(
            VAEBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, groups, "up" if i < len(ch) - 1 else None)
            for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B,3,H,W] in [-1, 1] -> (mean, logvar) of the latent distribution, unscaled."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents already divided by `scaling_factor` -> images [B,3,H,W], roughly [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor


def load_vae(pipeline_folder: str | Path, device="cpu", dtype=torch.float32,
             variant: str | None = None, channels_last: bool = False) -> AutoencoderKL:
    """`channels_last=True` stores the convolution kernels NHWC, the layout fast convolutions want."""
    return load_component(pipeline_folder, "vae", AutoencoderKL, VAEConfig, device, dtype, variant, channels_last)
