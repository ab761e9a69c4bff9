"""2-D rotary position embedding whose positions are scaled by the ratio.

A token at grid cell ``(i, j)`` of a ratio-``r`` latent (patch size ``p``) covers image pixels
``[i * r * p, (i + 1) * r * p)``. Its position is the centre of that area counted in cells of the
finest ratio, ``(i + 0.5) * r * p / RATIOS[0]``: a 32x token and the sixteen 8x tokens of the same
area share one centre, so attention sees the same geometry at every ratio (the idea of
resolution-scaled positions, as in NaViT's fractional positions and FiT's 2-D RoPE).

Half of each head's channels rotate with the row position, the other half with the column
(rotate-half pairing, as in Llama / diffusers' ``apply_rotary_emb`` with ``use_real_unbind_dim=-2``).
Hand-written because torch has no RoPE; it is a few lines of tensor algebra.
"""

from __future__ import annotations

import torch

from cat_foundations.ratios import RATIOS


def scaled_positions(grid_positions: torch.Tensor, ratios: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(S, L, 2)`` float positions in finest-ratio cells from grid indices and per-token ratios."""
    scale = ratios.to(torch.float32)[..., None] * patch_size / RATIOS[0]
    return (grid_positions.to(torch.float32) + 0.5) * scale


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` of shape ``(S, 1, L, head_dim / 2)`` for ``(S, L, 2)`` positions."""
    quarter = head_dim // 4
    frequencies = theta ** (-torch.arange(quarter, dtype=torch.float32, device=positions.device) / quarter)
    angles = torch.cat([positions[..., 0:1] * frequencies, positions[..., 1:2] * frequencies], dim=-1)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``(S, heads, L, head_dim)`` queries or keys by the angles of :func:`rope_angles`."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.to(x.dtype)
