"""Building blocks of the nested VAE, in the style of diffusers' ``resnet.py`` / ``attention_processor.py``.

Every block keeps the spatial size except :class:`Downsample` (halves it) and :class:`Upsample`
(doubles it). The two shortcut functions at the bottom have no parameters: they are the
residual autoencoding shortcuts of DC-AE (Chen et al. 2024), which give each latent a direct,
parameter-free path to the features next to it so the learned heads only add a residual.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# GroupNorm eps as in diffusers' VAE blocks (1e-6 rather than PyTorch's 1e-5).
NORM_EPS = 1e-6


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1 conv when the width changes) skip.

    Args:
        in_channels: channels of the input feature map.
        out_channels: channels of the output feature map.
        norm_num_groups: GroupNorm groups; must divide both ``in_channels`` and ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, kernel_size=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual.

    Only used at the 16x and 32x latents, where a 256x256 image has 256 or 64 positions, so the
    quadratic cost is negligible next to the convolutions.

    Args:
        channels: channels of the feature map (also the attention width).
        norm_num_groups: GroupNorm groups applied before the projections.
    """

    def __init__(self, channels: int, norm_num_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=NORM_EPS)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        query, key, value = self.to_qkv(tokens).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = self.to_out(attended).transpose(1, 2).reshape(batch, channels, height, width)
        return x + attended


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: halves height and width, keeps the channels.

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (keeps the channels).

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def space_to_channel_average(x: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    """Parameter-free downsampling shortcut: ``(B, C, H, W) -> (B, out_channels, H/f, W/f)``.

    Pixel-unshuffle moves each ``f x f`` neighbourhood into channels (``C * f**2`` of them), then
    consecutive groups of ``C * f**2 / out_channels`` channels are averaged.
    """
    unshuffled = F.pixel_unshuffle(x, factor)
    batch, channels, height, width = unshuffled.shape
    group = channels // out_channels
    return unshuffled.view(batch, out_channels, group, height, width).mean(dim=2)


def channel_repeat_to_space(z: torch.Tensor, out_channels: int, factor: int) -> torch.Tensor:
    """Parameter-free upsampling shortcut: ``(B, C, h, w) -> (B, out_channels, h*f, w*f)``.

    Each channel is repeated ``out_channels * f**2 / C`` times, then pixel-shuffle moves groups of
    ``f**2`` channels into ``f x f`` neighbourhoods.
    """
    repeats = out_channels * factor * factor // z.shape[1]
    return F.pixel_shuffle(z.repeat_interleave(repeats, dim=1), factor)
