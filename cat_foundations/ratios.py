"""The compression ratios and the token arithmetic, written once.

An image of ``H x W`` is reflect-padded at the bottom/right up to multiples of
:data:`PAD_MULTIPLE` (32, the coarsest ratio) to ``Hp x Wp``; at ratio ``r`` its latent is
``(Hp / r) x (Wp / r)`` and it costs ``(Hp / r) * (Wp / r)`` tokens.
"""

from __future__ import annotations

RATIOS: tuple[int, ...] = (8, 16, 32)
PAD_MULTIPLE = 32


def check_ratio(ratio) -> int:
    """``ratio`` as an int if it is one of :data:`RATIOS`; ``ValueError`` naming the choices otherwise."""
    if isinstance(ratio, bool) or ratio not in RATIOS:
        raise ValueError(f"ratio must be one of {RATIOS}, got {ratio!r}")
    return int(ratio)


def padded_size(height: int, width: int) -> tuple[int, int]:
    """``(Hp, Wp)``: the size rounded up to multiples of :data:`PAD_MULTIPLE`."""
    return -(-height // PAD_MULTIPLE) * PAD_MULTIPLE, -(-width // PAD_MULTIPLE) * PAD_MULTIPLE


def latent_size(height: int, width: int, ratio: int) -> tuple[int, int]:
    """Latent ``(h, w)`` of an image of ``height x width`` at ``ratio``."""
    check_ratio(ratio)
    padded_height, padded_width = padded_size(height, width)
    return padded_height // ratio, padded_width // ratio


def tokens_for(ratio: int, image_size: int | tuple[int, int]) -> int:
    """Latent tokens of an image at ``ratio``: ``(Hp / r) * (Wp / r)``; ``image_size`` is int or (H, W)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    padded_height, padded_width = padded_size(height, width)
    return (padded_height // ratio) * (padded_width // ratio)
