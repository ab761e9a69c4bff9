"""The nested VAE's encoder: one shared five-stage trunk with an exit head after stages 3, 4 and 5."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cat_foundations.ratios import RATIOS

from .blocks import NORM_EPS, Downsample, ResnetBlock, SelfAttention, space_to_channel_average
from .config import NUM_STAGES, NestedVAEConfig, stage_of
from .shortcuts import build_pixel_shortcut

INITIAL_LOGVAR = -8.0  # log-variance a new model's posterior starts at


class EncoderStage(nn.Module):
    """``num_blocks`` ResNet blocks at the stage's input resolution, then a stride-2 downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, norm_num_groups: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_num_groups)
            for i in range(num_blocks)
        )
        self.downsample = Downsample(out_channels)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the features before the downsample (for the exit shortcut) and after it."""
        for block in self.blocks:
            h = block(h)
        return h, self.downsample(h)


class ExitHead(nn.Module):
    """Turns trunk features at one ratio into the moments (mean, log-variance) of its latent."""

    def __init__(
        self, width: int, latent_channels: int, norm_num_groups: int, attention: bool, shortcut: bool = True
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.shortcut = shortcut
        self.block = ResnetBlock(width, width, norm_num_groups)
        self.attention = SelfAttention(width, norm_num_groups) if attention else None
        self.norm_out = nn.GroupNorm(norm_num_groups, width, eps=NORM_EPS)
        self.conv_out = nn.Conv2d(width, 2 * latent_channels, kernel_size=3, padding=1)

    def forward(self, before_downsample: torch.Tensor, after_downsample: torch.Tensor) -> torch.Tensor:
        h = self.block(after_downsample)
        if self.attention is not None:
            h = self.attention(h)
        mean, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        if self.shortcut:
            mean = mean + space_to_channel_average(before_downsample, self.latent_channels, factor=2)
        return torch.cat([mean, logvar], dim=1)


class Encoder(nn.Module):
    """Shared five-stage trunk with an exit head after stages 3, 4 and 5."""

    def __init__(self, config: NestedVAEConfig):
        super().__init__()
        widths, groups = config.widths, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], kernel_size=3, padding=1)
        self.stages = nn.ModuleList(
            EncoderStage(widths[max(j - 1, 0)], widths[j], config.layers_per_block, groups)
            for j in range(NUM_STAGES)
        )
        self.exits = nn.ModuleDict(
            {
                str(ratio): ExitHead(
                    widths[stage_of(ratio) - 1],
                    config.latent_channels,
                    groups,
                    ratio in config.attention_ratios,
                    config.trunk_shortcuts,
                )
                for ratio in RATIOS
            }
        )
        self.latent_channels = config.latent_channels
        self.pixel_shortcut = build_pixel_shortcut(
            config.pixel_shortcut, config.latent_channels, config.in_channels
        )
        for head in self.exits.values():
            # A new model's posterior starts narrow (std e^-4): with unit noise on every latent the
            # first hundreds of steps only learn to shrink it. With a pixel shortcut the learned
            # mean starts at zero too, so a new model's latent is exactly the shortcut's.
            nn.init.constant_(head.conv_out.bias[config.latent_channels :], INITIAL_LOGVAR)
            if self.pixel_shortcut is not None:
                nn.init.zeros_(head.conv_out.weight[: config.latent_channels])
                nn.init.zeros_(head.conv_out.bias[: config.latent_channels])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, counts: dict[int, int]) -> dict[int, torch.Tensor]:
        """Encode a batch sorted by ratio.

        Args:
            x: ``(B, 3, H, W)``, H and W multiples of 32, the first ``counts[8]`` images to exit at
                8x, the next ``counts[16]`` at 16x, the rest at 32x.
            counts: images per ratio (missing ratios count 0).

        Returns:
            moments ``(n_r, 2 * latent_channels, H/r, W/r)`` per ratio with ``n_r > 0``. Each
            image runs through the trunk only as deep as its ratio needs.
        """
        h, pixels = self.conv_in(x), x
        moments: dict[int, torch.Tensor] = {}
        for index, stage in enumerate(self.stages, start=1):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                before, h = checkpoint(stage, h, use_reentrant=False)
            else:
                before, h = stage(h)
            ratio = 2**index
            exiting = counts.get(ratio, 0)
            if exiting:
                moments[ratio] = self.exits[str(ratio)](before[:exiting], h[:exiting])
                if self.pixel_shortcut is not None:
                    mean, logvar = moments[ratio].chunk(2, dim=1)
                    shortcut = self.pixel_shortcut.encode(pixels[:exiting], ratio)
                    mean = mean + shortcut.to(mean.dtype)  # keep autocast's dtype
                    moments[ratio] = torch.cat([mean, logvar], dim=1)
                h, pixels = h[exiting:], pixels[exiting:]
            if h.shape[0] == 0:
                break
        return moments
