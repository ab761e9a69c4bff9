"""Parameter-free pixel shortcuts: a fixed image <-> latent map that the learned VAE refines.

A pixel shortcut gives the encoder a fixed projection of the image into the latent (added to the
learned latent mean) and the decoder its inverse (added to the learned output), so the network
only learns a residual and a colour-correct low-frequency image is there from the first step.
Two kinds exist, named by ``NestedVAEConfig.pixel_shortcut``:

``"blocks"``
    DC-AE's space-to-channel move applied to the pixels: pixel-unshuffle by the ratio ``r``, then
    means of consecutive groups of ``3 r^2 / C`` channels; the decoder repeats each latent channel
    back over its group. The groups are strips of pixel-shuffle positions, so the shortcut image
    is piecewise constant: at 32x, 6-pixel-high strips of one colour in each 32x32 block, whose
    edges the learned decoder has to cancel exactly (the checkpoints trained with it kept
    block-mosaic artefacts at 16x and 32x).
``"smooth"``
    A colour thumbnail: the image is area-averaged to ``s`` times the latent resolution
    (``s = 2`` for 16 latent channels: 2x2 sub-blocks of 3 colours use 12 channels, the rest start
    at zero), and the decoder upsamples it bicubically. Smooth by construction, and the best
    parameter-free reconstruction of its size that we measured (it beats the trained "blocks"
    checkpoint at every ratio), so the learned part starts from a better image.

Both are plain functions of tensors (no parameters), usable as baselines on their own:
``shortcut.decode(shortcut.encode(x, r), r)`` is the parameter-free codec of the same size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .blocks import channel_repeat_to_space, space_to_channel_average

PIXEL_SHORTCUTS = ("blocks", "smooth", "none")


def thumbnail_side(latent_channels: int, image_channels: int = 3) -> int:
    """Sub-blocks per latent position and side that the smooth shortcut stores (a power of two).

    The largest ``s`` with ``image_channels * s^2 <= latent_channels``: 16 latent channels hold a
    2x2 colour thumbnail per position (12 channels), 4 channels a 1x1 one (3 channels).
    """
    side = math.isqrt(latent_channels // image_channels)
    if side < 1:
        raise ValueError(
            f"the smooth pixel shortcut needs latent_channels >= image channels ({image_channels}), "
            f"got {latent_channels}; use pixel_shortcut='none' or more latent channels"
        )
    return min(1 << (side.bit_length() - 1), 8)


class PixelShortcut:
    """The fixed image <-> latent pair of one kind (see the module docstring).

    Args:
        kind: ``"blocks"`` or ``"smooth"``.
        latent_channels: channels of the latent it writes into and reads from.
        image_channels: channels of the image (3 for RGB).
    """

    def __init__(self, kind: str, latent_channels: int, image_channels: int = 3):
        if kind not in ("blocks", "smooth"):
            raise ValueError(f"pixel shortcut kind must be 'blocks' or 'smooth', got {kind!r}")
        self.kind = kind
        self.latent_channels = latent_channels
        self.image_channels = image_channels
        self.side = thumbnail_side(latent_channels, image_channels) if kind == "smooth" else 0

    def check_ratio(self, ratio: int) -> None:
        """Raise if this shortcut cannot map an image at ``ratio`` exactly into the latent."""
        if self.kind == "blocks" and (self.image_channels * ratio * ratio) % self.latent_channels:
            raise ValueError(
                f"latent_channels={self.latent_channels} must divide {self.image_channels} x {ratio}^2 "
                f"({self.image_channels * ratio * ratio}) for the pixel shortcut 'blocks'"
            )
        if self.kind == "smooth" and ratio % self.side:
            raise ValueError(
                f"the smooth pixel shortcut's {self.side}x{self.side} sub-blocks do not divide {ratio}"
            )

    def encode(self, images: torch.Tensor, ratio: int) -> torch.Tensor:
        """``(B, 3, H, W)`` with H, W multiples of ``ratio`` -> ``(B, latent_channels, H/r, W/r)``."""
        if self.kind == "blocks":
            return space_to_channel_average(images, self.latent_channels, ratio)
        thumbnail = F.avg_pool2d(images, kernel_size=ratio // self.side)
        packed = F.pixel_unshuffle(thumbnail, self.side)
        return F.pad(packed, (0, 0, 0, 0, 0, self.latent_channels - packed.shape[1]))

    def decode(self, latents: torch.Tensor, ratio: int) -> torch.Tensor:
        """``(B, latent_channels, h, w)`` -> ``(B, 3, h*r, w*r)``: the shortcut's image."""
        if self.kind == "blocks":
            return channel_repeat_to_space(latents, self.image_channels, ratio)
        used = self.image_channels * self.side * self.side
        thumbnail = F.pixel_shuffle(latents[:, :used], self.side)
        # Interpolation runs in float32: bicubic is not implemented for every low-precision dtype.
        upsampled = F.interpolate(
            thumbnail.float(), scale_factor=ratio // self.side, mode="bicubic", align_corners=False
        )
        return upsampled.to(latents.dtype)

    def reconstruct(self, images: torch.Tensor, ratio: int) -> torch.Tensor:
        """The parameter-free codec: ``decode(encode(images))`` (a baseline for the learned exits)."""
        return self.decode(self.encode(images, ratio), ratio)


def build_pixel_shortcut(
    kind: str | bool, latent_channels: int, image_channels: int = 3
) -> PixelShortcut | None:
    """The shortcut named by a config value; ``None`` for ``"none"``.

    ``True``/``False`` are the values of configs written before the kinds existed: ``True`` was
    the block shortcut.
    """
    kind = normalize_kind(kind)
    return None if kind == "none" else PixelShortcut(kind, latent_channels, image_channels)


def normalize_kind(kind: str | bool) -> str:
    """Map a config value (a kind name, or the legacy booleans) to one of :data:`PIXEL_SHORTCUTS`."""
    if kind is True:
        return "blocks"
    if kind is False or kind is None:
        return "none"
    if kind not in PIXEL_SHORTCUTS:
        raise ValueError(f"pixel_shortcut must be one of {PIXEL_SHORTCUTS} (or a boolean), got {kind!r}")
    return kind
