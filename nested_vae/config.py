"""Configuration of the nested VAE: widths, latent channels, norm groups, attention and shortcuts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cat_foundations.ratios import RATIOS

from .shortcuts import build_pixel_shortcut, normalize_kind

NUM_STAGES = 5


def stage_of(ratio: int) -> int:
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
    pixel_shortcut: str = "smooth"
    trunk_shortcuts: bool = False
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
            stage = stage_of(ratio)
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
