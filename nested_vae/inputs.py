"""Checks and padding of what callers hand the nested VAE (ratios, image batches, precision)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cat_foundations.ratios import PAD_MULTIPLE, RATIOS

from .outputs import Padding

__all__ = [
    "RatioArg",
    "all_finite",
    "check_images",
    "check_ratio",
    "is_low_precision",
    "per_sample_ratios",
    "reflect_pad_to_multiple",
]


RatioArg = int | Sequence[int]


def check_ratio(ratio: int) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio not in RATIOS:
        raise ValueError(f"ratio must be one of {RATIOS}, got {ratio!r}")
    return ratio


def per_sample_ratios(ratio: RatioArg, batch: int) -> tuple[list[int], bool]:
    """Ratios per image and whether the caller gave a per-sample list."""
    if isinstance(ratio, int) and not isinstance(ratio, bool):
        return [check_ratio(ratio)] * batch, False
    if isinstance(ratio, torch.Tensor):
        ratio = ratio.tolist()
    if not isinstance(ratio, Sequence) or isinstance(ratio, str):
        raise ValueError(f"ratio must be an int in {RATIOS} or a list of them, got {type(ratio).__name__}")
    ratios = [check_ratio(r) for r in ratio]
    if len(ratios) != batch:
        raise ValueError(f"got {len(ratios)} ratios for a batch of {batch} images")
    return ratios, True


def check_images(x: torch.Tensor, in_channels: int) -> None:
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


def is_low_precision(x: torch.Tensor) -> bool:
    device = x.device.type
    autocast_low = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in (
        torch.float16,
        torch.bfloat16,
    )
    return autocast_low or x.dtype in (torch.float16, torch.bfloat16)


def all_finite(result: torch.Tensor | dict[Any, torch.Tensor]) -> bool:
    tensors = result.values() if isinstance(result, dict) else [result]
    return all(bool(torch.isfinite(t).all()) for t in tensors)
