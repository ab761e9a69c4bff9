"""The nested VAE's decoder: per-ratio entries joining one shared upsampling trunk."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cat_foundations.ratios import RATIOS

from .blocks import NORM_EPS, ResnetBlock, SelfAttention, Upsample, channel_repeat_to_space
from .config import NUM_STAGES, NestedVAEConfig, stage_of
from .shortcuts import build_pixel_shortcut


class EntryHead(nn.Module):
    """Lifts a latent into decoder features, plus the parameter-free shortcut for the next resolution."""

    def __init__(
        self, latent_channels: int, width: int, norm_num_groups: int, attention: bool, shortcut: bool = True
    ):
        super().__init__()
        self.width = width
        self.shortcut = shortcut
        self.conv_in = nn.Conv2d(latent_channels, width, kernel_size=3, padding=1)
        self.block = ResnetBlock(width, width, norm_num_groups)
        self.attention = SelfAttention(width, norm_num_groups) if attention else None

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return features ``(B, width, h, w)`` and the shortcut ``(B, width, 2h, 2w)`` (or ``None``)."""
        h = self.block(self.conv_in(z))
        if self.attention is not None:
            h = self.attention(h)
        return h, channel_repeat_to_space(z, self.width, factor=2) if self.shortcut else None


class DecoderStage(nn.Module):
    """2x upsample (adding an entry's shortcut, if any), then ``num_blocks`` ResNet blocks."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, norm_num_groups: int):
        super().__init__()
        self.upsample = Upsample(in_channels)
        self.blocks = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_num_groups)
            for i in range(num_blocks)
        )

    def forward(self, h: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        h = self.upsample(h)
        if shortcut is not None:
            h = h + shortcut
        for block in self.blocks:
            h = block(h)
        return h


class Decoder(nn.Module):
    """Per-ratio entries that join one shared upsampling trunk and a shared ``conv_out``."""

    def __init__(self, config: NestedVAEConfig):
        super().__init__()
        widths, groups = config.widths, config.norm_num_groups
        self.entries = nn.ModuleDict(
            {
                str(ratio): EntryHead(
                    config.latent_channels,
                    config.decoder_input_width(stage_of(ratio)),
                    groups,
                    ratio in config.attention_ratios,
                    config.trunk_shortcuts,
                )
                for ratio in RATIOS
            }
        )
        self.stages = nn.ModuleList(
            DecoderStage(config.decoder_input_width(j + 1), widths[j], config.layers_per_block + 1, groups)
            for j in range(NUM_STAGES)
        )
        self.norm_out = nn.GroupNorm(groups, widths[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, kernel_size=3, padding=1)
        self.out_channels = config.out_channels
        self.pixel_shortcut = build_pixel_shortcut(
            config.pixel_shortcut, config.latent_channels, config.out_channels
        )
        if self.pixel_shortcut is not None:
            # Zero-init the learned output so a new model starts as the exact shortcut's image
            # instead of the shortcut plus noise that training must undo.
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = False

    def forward(self, latents: dict[int, torch.Tensor]) -> torch.Tensor:
        """Decode latents of one image size given per ratio.

        Returns:
            images ``(sum n_r, 3, H, W)`` ordered deepest ratio first (32x, then 16x, then 8x):
            each group joins the shared trunk at its entry stage, after the deeper ones.
        """
        h: torch.Tensor | None = None
        for index in range(NUM_STAGES, 0, -1):
            ratio = 2**index
            shortcut = None
            if ratio in latents:
                entered, entry_shortcut = self.entries[str(ratio)](latents[ratio])
                if h is None:
                    h, shortcut = entered, entry_shortcut
                elif entry_shortcut is None:
                    h = torch.cat([h, entered])
                else:
                    # Images already in the trunk get no shortcut at this stage.
                    passing = entry_shortcut.new_zeros((h.shape[0], *entry_shortcut.shape[1:]))
                    h, shortcut = torch.cat([h, entered]), torch.cat([passing, entry_shortcut])
            if h is None:
                continue
            stage = self.stages[index - 1]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(stage, h, shortcut, use_reentrant=False)
            else:
                h = stage(h, shortcut)
        assert h is not None, "Decoder.forward needs at least one latent"
        images = self.conv_out(F.silu(self.norm_out(h)))
        if self.pixel_shortcut is not None:
            deepest_first = sorted(latents, reverse=True)
            shortcut = torch.cat([self.pixel_shortcut.decode(latents[r], r) for r in deepest_first])
            images = images + shortcut.to(images.dtype)
        return images
