"""The nested VAE: one model that compresses an image 8x, 16x or 32x per side with shared weights.

Layout (``w_j = base_channels * channel_multipliers[j-1]``; default widths 32, 64, 128, 128, 256)::

    x (3, H, W), H and W reflect-padded to multiples of 32
    encoder.conv_in                                    -> (w1, H, W)
    encoder.stages[j-1], j = 1..5: ResNet blocks at (H/2^(j-1)) with width w_j, then a stride-2
        downsample                                     -> (w_j, H/2^j, W/2^j)
    exits after stage 3 (8x), 4 (16x), 5 (32x): encoder.exits["r"]
        learned:  ResNet block (+ self-attention at 16x/32x), GroupNorm, SiLU, conv
                  (w_j, H/r, W/r) -> mean and log-variance, each (latent_channels, H/r, W/r)
        shortcut: the stage's features *before* its downsample (w_j, 2H/r, 2W/r)
                  -> pixel-unshuffle 2 -> (4 w_j, H/r, W/r) -> mean of consecutive groups of
                  4 w_j / latent_channels channels -> (latent_channels, H/r, W/r), added to the mean

    decoder.entries["r"] for the latent z (latent_channels, H/r, W/r), r = 2^j:
        learned:  conv latent_channels -> d_j, ResNet block (+ self-attention at 16x/32x)
                  -> (d_j, H/r, W/r), where d_j = w_(j+1) (d_5 = w_5) is what decoder stage j takes
        shortcut: repeat each latent channel 4 d_j / latent_channels times -> pixel-shuffle 2
                  -> (d_j, 2H/r, 2W/r), added right after decoder stage j's upsample
    decoder.stages[j-1], run for j = 5..1 (a latent at 2^j enters at stage j):
        nearest 2x upsample + conv (d_j channels), then layers_per_block + 1 ResNet blocks
        d_j -> w_j                                     -> (w_j, H/2^(j-1), W/2^(j-1))
    decoder.norm_out, SiLU, decoder.conv_out (shared)  -> (3, H, W), cropped back to the input size

So the 8x path is a prefix of the 16x path, which is a prefix of the 32x path, on both sides: the
three ratios share every trunk module and own only their small exit head and entry. The shortcuts
are DC-AE's residual autoencoding (Chen et al. 2024): parameter-free space<->channel moves around
the resolution change next to each latent, so the learned heads only add a residual.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cat_foundations.ratios import PAD_MULTIPLE, RATIOS
from cat_foundations.ratios import latent_size as _latent_size

from .blocks import (
    NORM_EPS,
    Downsample,
    ResnetBlock,
    SelfAttention,
    Upsample,
    channel_repeat_to_space,
    space_to_channel_average,
)
from .shortcuts import build_pixel_shortcut, normalize_kind
from .tiling import run_tiled

logger = logging.getLogger(__name__)

# RATIOS (from cat_foundations.ratios): compression per side; ratio ``2**j`` exits after encoder stage ``j``.

NUM_STAGES = 5
INITIAL_LOGVAR = -8.0  # log-variance a new model's posterior starts at
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "default"


def _stage_of(ratio: int) -> int:
    """Encoder stage after which ``ratio`` exits (8 -> 3, 16 -> 4, 32 -> 5)."""
    return ratio.bit_length() - 1


@dataclass
class NestedVAEConfig:
    """Configuration of :class:`NestedVAE`; the defaults are the shipped checkpoint's.

    Args:
        in_channels: image channels read by the encoder.
        out_channels: image channels written by the decoder.
        base_channels: width of the first stage; stage ``j`` has
            ``base_channels * channel_multipliers[j-1]`` channels.
        channel_multipliers: one multiplier per stage; exactly five stages (ratios 2..32).
        layers_per_block: ResNet blocks per encoder stage (decoder stages use one more, as in
            diffusers' AutoencoderKL).
        latent_channels: channels of the latent at every ratio (16 -> a 256x256 image gives
            16x32x32, 16x16x16 or 16x8x8).
        norm_num_groups: GroupNorm groups everywhere. Must divide every stage width. Default 8:
            4 channels per group at the 32-channel full-resolution stage, as Stable Diffusion's VAE
            has (32 groups over 128 channels). With one channel per group (32 here, diffusers'
            default number) the decoder's last norm is an instance norm that erases each channel's
            per-image mean and scale, where global colour lives, and models trained that way lost
            colour (see nested_vae/weights/default/MODEL_CARD.md).
        pixel_shortcut: the parameter-free image <-> latent pair added around the whole network
            (:mod:`nested_vae.shortcuts`): ``"smooth"`` (a colour thumbnail, upsampled bicubically),
            ``"blocks"`` (DC-AE's space-to-channel group means from the pixels; piecewise constant)
            or ``"none"``. With a shortcut the network only learns the residual and a colour-correct
            low-frequency image is there from the first step (without one, our CPU-trained models
            lost colour: the trunk let chroma fade and training stalled there). ``True``/``False``
            (configs written before the kinds existed) mean ``"blocks"``/``"none"``.
        trunk_shortcuts: DC-AE's space<->channel shortcuts inside the trunk, around the resolution
            change next to each latent (encoder exit: features before the downsample; decoder
            entry: into the next stage's upsample), where later convolutions can smooth them.
        attention_ratios: ratios whose exit head and decoder entry get single-head self-attention.
            Attention at 8x (1024 positions at 256x256) would dominate the cost, so the default
            leaves it out.
        scaling_factor: multiply latents by this before handing them to a diffusion model (and
            divide before decoding); 1.0 until a checkpoint measures its latent statistics.
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 32
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4, 8)
    layers_per_block: int = 1
    latent_channels: int = 16
    norm_num_groups: int = 8
    attention_ratios: tuple[int, ...] = field(default=(16, 32))
    pixel_shortcut: str = "blocks"
    trunk_shortcuts: bool = True
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        self.attention_ratios = tuple(int(r) for r in self.attention_ratios)
        self.pixel_shortcut = normalize_kind(self.pixel_shortcut)
        if len(self.channel_multipliers) != NUM_STAGES:
            raise ValueError(
                f"channel_multipliers needs {NUM_STAGES} entries (one per 2x stage; ratios 8/16/32 exit "
                f"after stages 3/4/5), got {self.channel_multipliers}"
            )
        for name in ("in_channels", "out_channels", "base_channels", "layers_per_block", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be >= 1, got {self.channel_multipliers}")
        bad_groups = [w for w in self.widths if w % self.norm_num_groups]
        if self.norm_num_groups < 1 or bad_groups:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every stage width {self.widths}"
            )
        unknown = [r for r in self.attention_ratios if r not in RATIOS]
        if unknown:
            raise ValueError(f"attention_ratios {unknown} are not among the supported ratios {RATIOS}")
        # The shortcuts average (encoder) or repeat (decoder) channel groups of equal size.
        for ratio in RATIOS:
            stage = _stage_of(ratio)
            for side, width in (
                ("encoder", self.widths[stage - 1]),
                ("decoder", self.decoder_input_width(stage)),
            ):
                if (4 * width) % self.latent_channels:
                    raise ValueError(
                        f"latent_channels={self.latent_channels} must divide 4 x the {side} width at "
                        f"ratio {ratio} ({4 * width}) for the parameter-free shortcut"
                    )
            for channels in {self.in_channels, self.out_channels}:
                shortcut = build_pixel_shortcut(self.pixel_shortcut, self.latent_channels, channels)
                if shortcut is not None:
                    shortcut.check_ratio(ratio)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of each of the five stages."""
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    def decoder_input_width(self, stage: int) -> int:
        """Width that decoder stage ``stage`` (1..5) takes in: the next stage's output, w_5 for the last."""
        return self.widths[min(stage, NUM_STAGES - 1)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channel_multipliers"] = list(self.channel_multipliers)
        data["attention_ratios"] = list(self.attention_ratios)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> NestedVAEConfig:
        """Build from a dict (e.g. ``config.json``); keys starting with ``_`` are metadata and ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if not k.startswith("_")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown NestedVAEConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


class Padding(NamedTuple):
    """Rows and columns reflect-padded at the bottom and right to reach a multiple of 32."""

    bottom: int
    right: int


class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior over latents (as in diffusers, with mean and log-variance given apart).

    Args:
        mean: ``(B, C, h, w)`` means.
        logvar: ``(B, C, h, w)`` log-variances, clamped to [-30, 20] so ``exp`` never overflows.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussianDistribution:
        """Split ``(B, 2C, h, w)`` into mean (first C channels) and log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * eps``."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, summed over C, h, w: shape ``(B,)``."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


@dataclass
class EncoderOutput:
    """Result of :meth:`NestedVAE.encode`.

    Attributes:
        latent_dist: one batched distribution for an ``int`` ratio; for a per-sample ratio list, a
            list with one distribution (batch 1) per input image, in input order.
        ratio: the ratio (or per-sample ratios) the images were encoded at.
        padding: what was reflect-padded at the bottom and right before encoding.
        input_size: ``(H, W)`` of the input, to crop the decoded image back to.
    """

    latent_dist: DiagonalGaussianDistribution | list[DiagonalGaussianDistribution]
    ratio: int | list[int]
    padding: Padding
    input_size: tuple[int, int]


@dataclass
class DecoderOutput:
    """Result of :meth:`NestedVAE.decode`: ``sample`` is ``(B, 3, H, W)`` in (roughly) [-1, 1]."""

    sample: torch.Tensor


@dataclass
class NestedVAEOutput:
    """Result of :meth:`NestedVAE.forward`.

    Attributes:
        sample: reconstruction ``(B, 3, H, W)``, same size and order as the input.
        latent_dist: as in :class:`EncoderOutput`.
        latents: the latents that were decoded (a tensor, or a per-sample list for a ratio list).
        ratio: the ratio or per-sample ratios.
        padding: as in :class:`EncoderOutput`.
    """

    sample: torch.Tensor
    latent_dist: DiagonalGaussianDistribution | list[DiagonalGaussianDistribution]
    latents: torch.Tensor | list[torch.Tensor]
    ratio: int | list[int]
    padding: Padding


class CheckpointError(ValueError):
    """A checkpoint directory whose files do not match the model (names the keys or file at fault)."""


# ---------------------------------------------------------------------------------------------
# Encoder


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
                    widths[_stage_of(ratio) - 1],
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


# ---------------------------------------------------------------------------------------------
# Decoder


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
                    config.decoder_input_width(_stage_of(ratio)),
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
            # Zero-init the learned output so a new model starts as the exact shortcut projection
            # (already ~21 dB at 8x) instead of the shortcut plus noise that training must undo.
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


# ---------------------------------------------------------------------------------------------
# Public model


RatioArg = int | Sequence[int]


def _check_ratio(ratio: int) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio not in RATIOS:
        raise ValueError(f"ratio must be one of {RATIOS}, got {ratio!r}")
    return ratio


def _per_sample_ratios(ratio: RatioArg, batch: int) -> tuple[list[int], bool]:
    """Ratios per image and whether the caller gave a per-sample list."""
    if isinstance(ratio, int) and not isinstance(ratio, bool):
        return [_check_ratio(ratio)] * batch, False
    if isinstance(ratio, torch.Tensor):
        ratio = ratio.tolist()
    if not isinstance(ratio, Sequence) or isinstance(ratio, str):
        raise ValueError(f"ratio must be an int in {RATIOS} or a list of them, got {type(ratio).__name__}")
    ratios = [_check_ratio(r) for r in ratio]
    if len(ratios) != batch:
        raise ValueError(f"got {len(ratios)} ratios for a batch of {batch} images")
    return ratios, True


def _check_images(x: torch.Tensor, in_channels: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != in_channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected images of shape (B, {in_channels}, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point images in [-1, 1], got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"got an empty image batch {tuple(x.shape)}")
    low, high = x.detach().aminmax()
    if not torch.isfinite(low) or not torch.isfinite(high):
        raise ValueError("images contain NaN or infinite values")
    # Resampling overshoots [-1, 1] a little; 0..255 or 0..1-then-shifted mistakes go far beyond.
    if low < -1.5 or high > 1.5:
        raise ValueError(
            f"images must be in [-1, 1], got values in [{low.item():.3g}, {high.item():.3g}] "
            "(convert with cat_tokenizer.images.pil_to_tensor)"
        )


def reflect_pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, Padding]:
    """Reflect-pad the bottom and right of ``x`` so height and width are multiples of ``multiple``.

    Reflection needs the pad to be smaller than the size, so tiny images are reflected in several
    rounds (a 1-pixel side is replicated).
    """
    height, width = x.shape[-2:]
    padding = Padding(bottom=-height % multiple, right=-width % multiple)
    bottom, right = padding
    while bottom or right:
        height, width = x.shape[-2:]
        step_bottom, step_right = min(bottom, height - 1), min(right, width - 1)
        if (bottom and step_bottom == 0) or (right and step_right == 0):
            x = F.pad(x, (0, right, 0, bottom), mode="replicate")
            break
        x = F.pad(x, (0, step_right, 0, step_bottom), mode="reflect")
        bottom, right = bottom - step_bottom, right - step_right
    return x, padding


def _low_precision(x: torch.Tensor) -> bool:
    device = x.device.type
    autocast_low = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in (
        torch.float16,
        torch.bfloat16,
    )
    return autocast_low or x.dtype in (torch.float16, torch.bfloat16)


def _all_finite(result: torch.Tensor | dict[Any, torch.Tensor]) -> bool:
    tensors = result.values() if isinstance(result, dict) else [result]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class NestedVAE(nn.Module):
    """One VAE, three compression ratios (8x, 16x, 32x per side) sharing one encoder/decoder trunk.

    See the module docstring for the exact layout and shapes. ``NestedVAE()`` builds the default
    configuration (the shipped checkpoint's); pass a :class:`NestedVAEConfig` or its fields as
    keyword arguments for another.

    Memory and precision toggles (runtime settings, not saved with the weights):

    * :meth:`enable_tiling` -- encode/decode large images in overlapping tiles with blended seams.
    * :meth:`enable_slicing` -- run a batch one image at a time.
    * :meth:`enable_gradient_checkpointing` -- recompute stage activations in the backward pass.
    * ``upcast_on_overflow`` (default True) -- under fp16/bf16 autocast, a result with a NaN/inf
      (an fp16 overflow) is recomputed in float32; ``upcast_fallbacks`` counts how often.
    """

    def __init__(self, config: NestedVAEConfig | None = None, **config_overrides: Any):
        super().__init__()
        if config is not None and config_overrides:
            raise ValueError("pass either a NestedVAEConfig or keyword overrides, not both")
        self.config = config if config is not None else NestedVAEConfig(**config_overrides)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.use_tiling = False
        self.tile_sample_size = 256
        self.tile_overlap = 64
        self.use_slicing = False
        self.upcast_on_overflow = True
        self.upcast_fallbacks = 0

    # -- toggles ---------------------------------------------------------------------------------

    def enable_tiling(self, tile_sample_size: int = 256, tile_overlap: int = 64) -> None:
        """Encode/decode images larger than ``tile_sample_size`` pixels in overlapping tiles.

        Args:
            tile_sample_size: tile side in pixels, a multiple of 32.
            tile_overlap: overlap of neighbouring tiles in pixels (also the blend width), a multiple
                of 32 smaller than the tile, so tiles align with the latent grid at every ratio.
        """
        if tile_sample_size % PAD_MULTIPLE or tile_overlap % PAD_MULTIPLE:
            raise ValueError(f"tile size and overlap must be multiples of {PAD_MULTIPLE}")
        if not 0 < tile_overlap < tile_sample_size:
            raise ValueError("tile_overlap must be positive and smaller than tile_sample_size")
        self.use_tiling = True
        self.tile_sample_size = tile_sample_size
        self.tile_overlap = tile_overlap

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode/decode one image at a time (lower peak memory for large batches)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = False

    def get_last_layer(self) -> torch.Tensor:
        """Weight of the shared ``conv_out``, for the adaptive GAN loss weight."""
        return self.decoder.conv_out.weight

    @staticmethod
    def latent_size(height: int, width: int, ratio: int) -> tuple[int, int]:
        """Latent ``(h, w)`` for an image of ``height x width`` (padded up to multiples of 32)."""
        _check_ratio(ratio)
        return _latent_size(height, width, ratio)

    # -- precision guard -------------------------------------------------------------------------

    def _upcast_guarded(self, fn: Callable[[Any], Any], inputs: Any, reference: torch.Tensor) -> Any:
        """Run ``fn(inputs)``; under low precision, redo it in float32 if the result is not finite."""
        result = fn(inputs)
        if self.upcast_on_overflow and _low_precision(reference) and not _all_finite(result):
            self.upcast_fallbacks += 1
            logger.info("NestedVAE: non-finite result in low precision, recomputing in float32")
            as_float = (
                {k: v.float() for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.float()
            )
            with torch.autocast(reference.device.type, enabled=False):
                result = fn(as_float)
        return result

    # -- encode ----------------------------------------------------------------------------------

    def _encode_sorted(self, x: torch.Tensor, counts: dict[int, int]) -> dict[int, torch.Tensor]:
        """Moments per ratio for a padded batch sorted by ratio, honouring slicing and tiling."""
        if self.use_slicing and x.shape[0] > 1:
            parts: dict[int, list[torch.Tensor]] = {}
            ratios = [r for r in RATIOS for _ in range(counts.get(r, 0))]
            for image, ratio in zip(x.split(1), ratios):
                parts.setdefault(ratio, []).append(self._encode_sorted_unsliced(image, {ratio: 1})[ratio])
            return {ratio: torch.cat(chunks) for ratio, chunks in parts.items()}
        return self._encode_sorted_unsliced(x, counts)

    def _encode_sorted_unsliced(self, x: torch.Tensor, counts: dict[int, int]) -> dict[int, torch.Tensor]:
        if not (self.use_tiling and max(x.shape[-2:]) > self.tile_sample_size):
            return self.encoder(x, counts)
        moments, start = {}, 0
        for ratio in RATIOS:
            count = counts.get(ratio, 0)
            if count:
                moments[ratio] = run_tiled(
                    x[start : start + count],
                    lambda tile, ratio=ratio: self.encoder(tile, {ratio: tile.shape[0]})[ratio],
                    self.tile_sample_size,
                    self.tile_overlap,
                    Fraction(1, ratio),
                )
                start += count
        return moments

    def encode(self, x: torch.Tensor, ratio: RatioArg) -> EncoderOutput:
        """Encode images to latent distributions.

        Args:
            x: ``(B, 3, H, W)`` in [-1, 1], any H and W (reflect-padded to multiples of 32).
            ratio: 8, 16 or 32 for the whole batch, or one ratio per image.

        Returns:
            :class:`EncoderOutput`; for a ratio list ``latent_dist`` is a per-image list in input order.
        """
        _check_images(x, self.config.in_channels)
        ratios, per_sample = _per_sample_ratios(ratio, x.shape[0])
        padded, padding = reflect_pad_to_multiple(x)
        # Sort by ratio so each group leaves the shared trunk at its exit as one contiguous slice.
        order = sorted(range(len(ratios)), key=lambda i: ratios[i])
        counts = {r: ratios.count(r) for r in RATIOS if r in ratios}
        sorted_x = padded if order == list(range(len(order))) else padded[order]
        moments = self._upcast_guarded(lambda inp: self._encode_sorted(inp, counts), sorted_x, x)
        input_size = (x.shape[-2], x.shape[-1])
        if not per_sample:
            return EncoderOutput(
                DiagonalGaussianDistribution.from_moments(moments[ratio]), ratio, padding, input_size
            )
        rows_in_group = {r: 0 for r in RATIOS}
        dists: list[DiagonalGaussianDistribution | None] = [None] * len(ratios)
        for index in order:
            r = ratios[index]
            row = rows_in_group[r]
            dists[index] = DiagonalGaussianDistribution.from_moments(moments[r][row : row + 1])
            rows_in_group[r] = row + 1
        return EncoderOutput(dists, list(ratios), padding, input_size)

    # -- decode ----------------------------------------------------------------------------------

    def _decode_grouped(self, latents: dict[int, torch.Tensor]) -> torch.Tensor:
        """Images for latents grouped by ratio, deepest ratio first; honours slicing and tiling."""
        if self.use_slicing and sum(z.shape[0] for z in latents.values()) > 1:
            return torch.cat(
                [
                    self._decode_grouped_unsliced({ratio: z})
                    for ratio in sorted(latents, reverse=True)
                    for z in latents[ratio].split(1)
                ]
            )
        return self._decode_grouped_unsliced(latents)

    def _decode_grouped_unsliced(self, latents: dict[int, torch.Tensor]) -> torch.Tensor:
        ratio, z = next(iter(latents.items()))
        if not (self.use_tiling and max(z.shape[-2:]) * ratio > self.tile_sample_size):
            return self.decoder(latents)
        return torch.cat(
            [
                run_tiled(
                    latents[r],
                    lambda tile, r=r: self.decoder({r: tile}),
                    self.tile_sample_size // r,
                    self.tile_overlap // r,
                    Fraction(r),
                )
                for r in sorted(latents, reverse=True)
            ]
        )

    def decode(
        self,
        z: torch.Tensor | Sequence[torch.Tensor],
        ratio: RatioArg,
        output_size: tuple[int, int] | None = None,
    ) -> DecoderOutput:
        """Decode latents to images.

        Args:
            z: ``(B, latent_channels, h, w)`` with an ``int`` ratio, or a list of latents (each
                ``(n_i, latent_channels, h_i, w_i)``, e.g. from a per-sample encode) with one
                ratio per list entry. All must decode to the same image size ``h_i * ratio_i``.
            ratio: the ratio the latents were encoded at (explicit: a latent's size alone cannot
                tell a 16x latent of a 512 image from an 8x latent of a 256 image).
            output_size: ``(H, W)`` to crop the decoded (padded) image back to; default no crop.

        Returns:
            :class:`DecoderOutput` with ``sample`` ``(B, 3, H, W)``, rows in the order of ``z``.
        """
        if isinstance(z, torch.Tensor):
            if not (isinstance(ratio, int) and not isinstance(ratio, bool)):
                raise ValueError(
                    "a latent tensor needs an int ratio; pass a list of latents for per-sample ratios"
                )
            items, ratios = [z], [_check_ratio(ratio)]
        else:
            items = list(z)
            ratios, _ = _per_sample_ratios(ratio, len(items))
        if not items:
            raise ValueError("decode got no latents")
        decoded_size = None
        for index, (item, r) in enumerate(zip(items, ratios)):
            if (
                not isinstance(item, torch.Tensor)
                or item.dim() != 4
                or item.shape[1] != self.config.latent_channels
            ):
                shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                raise ValueError(
                    f"latent {index}: expected shape (n, {self.config.latent_channels}, h, w), got {shape}"
                )
            size = (item.shape[2] * r, item.shape[3] * r)
            if decoded_size is not None and size != decoded_size:
                raise ValueError(
                    f"latent {index} (ratio {r}) decodes to {size}, latent 0 to {decoded_size}: "
                    "decode latents of different image sizes in separate calls"
                )
            decoded_size = size
        if output_size is not None:
            output_size = (int(output_size[0]), int(output_size[1]))
            if not (0 < output_size[0] <= decoded_size[0] and 0 < output_size[1] <= decoded_size[1]):
                raise ValueError(f"output_size {output_size} does not fit the decoded size {decoded_size}")

        # Group by ratio; the decoder returns the groups deepest first, so remember each row's origin.
        grouped: dict[int, list[torch.Tensor]] = {}
        origins: dict[int, list[int]] = {}
        row = 0
        for item, r in zip(items, ratios):
            grouped.setdefault(r, []).append(item)
            origins.setdefault(r, []).extend(range(row, row + item.shape[0]))
            row += item.shape[0]
        latents = {r: torch.cat(grouped[r]) if len(grouped[r]) > 1 else grouped[r][0] for r in grouped}
        images = self._upcast_guarded(self._decode_grouped, latents, items[0])
        decoder_order = [origin for r in sorted(latents, reverse=True) for origin in origins[r]]
        if decoder_order != list(range(row)):
            inverse = torch.empty(row, dtype=torch.long)
            inverse[torch.tensor(decoder_order)] = torch.arange(row)
            images = images[inverse.to(images.device)]
        if output_size is not None:
            images = images[..., : output_size[0], : output_size[1]]
        return DecoderOutput(images)

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        ratio: RatioArg,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> NestedVAEOutput:
        """Encode, take the posterior mean (or a sample), decode and crop back to the input size.

        Args:
            x: ``(B, 3, H, W)`` in [-1, 1].
            ratio: 8, 16 or 32, or one per image.
            sample_posterior: decode a sample of the posterior instead of its mean (training).
            generator: random generator for the sample.
        """
        encoded = self.encode(x, ratio)
        if isinstance(encoded.latent_dist, list):
            latents = [d.sample(generator) if sample_posterior else d.mode() for d in encoded.latent_dist]
        else:
            dist = encoded.latent_dist
            latents = dist.sample(generator) if sample_posterior else dist.mode()
        decoded = self.decode(latents, encoded.ratio, output_size=encoded.input_size)
        return NestedVAEOutput(decoded.sample, encoded.latent_dist, latents, encoded.ratio, encoded.padding)

    # -- save / load -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **self.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> NestedVAE:
        """Load a model saved by :meth:`save_pretrained`, in eval mode.

        Args:
            name_or_path: ``"default"`` for the checkpoint shipped in ``nested_vae/weights/default/``,
                or a directory holding ``config.json`` and ``model.safetensors``.
            device: where to put the model (default CPU).
            dtype: parameter dtype (default as saved, float32).

        Raises:
            FileNotFoundError: the directory or one of its files is missing.
            CheckpointError: the config is invalid or the weights have missing, unexpected or
                mis-shaped tensors (all named).
        """
        from safetensors.torch import load_file

        directory = DEFAULT_WEIGHTS_DIR if str(name_or_path) == "default" else Path(name_or_path)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                hint = (
                    " The shipped checkpoint is produced by `cat-train` (nested_vae.train); "
                    "pass a directory from save_pretrained instead."
                    if str(name_or_path) == "default"
                    else ""
                )
                raise FileNotFoundError(f"NestedVAE checkpoint file not found: {path}.{hint}")
        try:
            config_data = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise CheckpointError(
                f"{config_path}: line {error.lineno}: invalid JSON ({error.msg})"
            ) from error
        # Checkpoints saved before the pixel shortcut existed were trained without it.
        if isinstance(config_data, dict):
            config_data.setdefault("pixel_shortcut", False)
        try:
            config = NestedVAEConfig.from_dict(config_data, source=str(config_path))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{config_path}: {error}") from error
        model = cls(config)
        state = load_file(str(weights_path), device="cpu")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mis_shaped = sorted(
            f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
            for k in set(state) & set(expected)
            if state[k].shape != expected[k].shape
        )
        if missing or unexpected or mis_shaped:
            problems = [
                f"{label} {keys}"
                for label, keys in (
                    ("missing keys", missing),
                    ("unexpected keys", unexpected),
                    ("mis-shaped tensors", mis_shaped),
                )
                if keys
            ]
            raise CheckpointError(
                f"{weights_path} does not match the config in {config_path}: " + "; ".join(problems)
            )
        model.load_state_dict(state, strict=True)
        return model.to(device=device or "cpu", dtype=dtype).eval()
