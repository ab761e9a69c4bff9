"""Overlapping-tile execution with linearly blended seams, for encoding and decoding large images.

One function serves both directions: :func:`run_tiled` cuts the input into overlapping square
tiles, runs a function on each, and writes the results into an output ``scale`` times the
input's size (``1/r`` for encoding to ratio ``r``, ``r`` for decoding). Where tiles overlap their
outputs are averaged with weights that ramp linearly from the tile's inner edge, so no seam shows a
step. This is the idea of diffusers' ``tiled_encode``/``tiled_decode``, written as one weighted
average instead of separate vertical and horizontal blends.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` with at least ``overlap``.

    The last tile is aligned to the end, so every tile has the full size (its overlap with the one
    before may then exceed ``overlap``). A length that fits in one tile gives ``[0]``.
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _edge_ramp(size: int, ramp: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D blending weights: rise over ``ramp`` samples at an inner start edge, fall at an inner end."""
    weights = torch.ones(size)
    ramp = min(ramp, size)
    if ramp > 0:
        rising = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
        if ramp_start:
            weights[:ramp] = torch.minimum(weights[:ramp], rising)
        if ramp_end:
            weights[size - ramp :] = torch.minimum(weights[size - ramp :], rising.flip(0))
    return weights


def run_tiled(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    tile: int,
    overlap: int,
    scale: Fraction,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile x tile`` crops of ``x`` and blend the results.

    Args:
        x: input ``(B, C, H, W)``; ``H`` and ``W`` may be smaller than ``tile`` (one tile then).
        fn: maps a crop ``(B, C, h, w)`` to ``(B, C_out, h * scale, w * scale)``.
        tile: tile side in input samples.
        overlap: minimum overlap of neighbouring tiles in input samples; also the blend width.
        scale: output size per input sample; every tile offset times ``scale`` must be an integer.

    Returns:
        ``(B, C_out, H * scale, W * scale)``, each position the weighted mean of the tiles covering it.
    """
    height, width = x.shape[-2:]
    tile_h, tile_w = min(tile, height), min(tile, width)
    starts_y = tile_starts(height, tile, overlap)
    starts_x = tile_starts(width, tile, overlap)
    ramp = int(overlap * scale)
    output = weight_sum = None
    for y0 in starts_y:
        for x0 in starts_x:
            result = fn(x[..., y0 : y0 + tile_h, x0 : x0 + tile_w])
            out_y0, out_x0 = y0 * scale, x0 * scale
            if out_y0.denominator != 1 or out_x0.denominator != 1:
                raise ValueError(f"tile offset ({y0}, {x0}) times scale {scale} is not an integer")
            out_y0, out_x0 = int(out_y0), int(out_x0)
            out_h, out_w = result.shape[-2:]
            if output is None:
                # Accumulate in float32: low-precision sums of many tiles lose the blend weights.
                out_size = (int(height * scale), int(width * scale))
                output = result.new_zeros(*result.shape[:2], *out_size, dtype=torch.float32)
                weight_sum = result.new_zeros(out_size, dtype=torch.float32)
            weight = torch.outer(
                _edge_ramp(out_h, ramp, ramp_start=y0 > 0, ramp_end=y0 + tile_h < height),
                _edge_ramp(out_w, ramp, ramp_start=x0 > 0, ramp_end=x0 + tile_w < width),
            ).to(result.device)
            output[..., out_y0 : out_y0 + out_h, out_x0 : out_x0 + out_w] += result * weight
            weight_sum[out_y0 : out_y0 + out_h, out_x0 : out_x0 + out_w] += weight
    return (output / weight_sum).to(result.dtype)
