"""Masked random-order generation (MAR / Fluid), decoded in parallel on a cosine schedule (Muse).

Training: each image masks a share ``cos(pi/2 * u)`` (``u ~ U(0, 1)``) of its tokens, chosen in a
random order; the backbone sees the rest (bidirectionally, within the image only) and its output at
each masked token conditions the per-token diffusion head, which learns that token's value
(:mod:`cat_generation.head`, flow rule of :mod:`cat_generation.flow`).

Sampling: all tokens start masked, in a random order per image. Step ``k`` of ``K`` leaves
``floor(n * cos(pi/2 * k / K))`` tokens masked; the ones it unmasks are drawn in parallel by the head
from the backbone's current output. After ``K`` steps every token is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .flow import euler_sample, interpolate, sample_timesteps, velocity_target
from .packing import PackedBatch


@dataclass
class MaskedDraw:
    """One image's random generation order.

    Args:
        order: ``(n,)`` token indices within the image; the first ``masked`` ones are hidden.
        masked: how many tokens are hidden.
    """

    order: torch.Tensor
    masked: int


def cosine_masked_count(tokens: int, progress: float) -> int:
    """Tokens still masked at ``progress`` in [0, 1] of the schedule: ``floor(n * cos(pi/2 * progress))``."""
    return int(math.floor(tokens * math.cos(math.pi / 2 * progress) + 1e-9))


def _mask_from_draws(
    batch: PackedBatch, draws: list[MaskedDraw], count: list[int] | None = None
) -> torch.Tensor:
    """``(S, L)`` bool: True at each image's first ``count[i]`` (default ``masked``) tokens of its order."""
    mask = torch.zeros(batch.sequence_ids.shape, dtype=torch.bool)
    for index, (placement, draw) in enumerate(zip(batch.placements, draws)):
        hidden = draw.order[: draw.masked if count is None else count[index]]
        mask[placement.row, placement.start + hidden] = True
    return mask.to(batch.tokens.device)


def training_mask(batch: PackedBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(S, L)`` bool training mask: per image a cosine-distributed share (at least one token)."""
    draws = []
    for placement in batch.placements:
        share = math.cos(math.pi / 2 * float(torch.rand(1, generator=generator)))
        masked = min(placement.length, max(1, math.ceil(share * placement.length)))
        draws.append(MaskedDraw(torch.randperm(placement.length, generator=generator), masked))
    return _mask_from_draws(batch, draws)


def masked_loss(model, batch: PackedBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean flow-matching error of the head on the masked tokens (``model``: a ``LatentGenerator``)."""
    mask = training_mask(batch, generator)
    z = model.backbone(batch, token_mask=mask).sample[mask]
    data = batch.tokens[mask]
    repeats = model.config.head_batch_mul
    z, data = z.repeat(repeats, 1), data.repeat(repeats, 1)
    noise = torch.randn(data.shape, generator=generator).to(data)
    t = sample_timesteps(data.shape[0], generator, data.device)
    prediction = model.head(interpolate(data, noise, t), t, z)
    return (prediction - velocity_target(data, noise)).pow(2).mean()


def _draw_tokens(model, z: torch.Tensor, head_steps: int, temperature: float, generator) -> torch.Tensor:
    """Token values for conditions ``z`` ``(M, cond)``: the head's ODE from scaled noise."""
    noise = torch.randn(z.shape[0], model.config.token_dim, generator=generator).to(z) * temperature
    return euler_sample(lambda x, t: model.head(x, t.expand(x.shape[0]), z), noise, head_steps)


@torch.no_grad()
def masked_sample(
    model,
    layout: PackedBatch,
    steps: int = 8,
    head_steps: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(S, L, token_dim)`` generated tokens for ``layout`` in ``steps`` parallel decoding steps."""
    if steps < 1:
        raise ValueError(f"decoding steps must be >= 1, got {steps}")
    draws = [MaskedDraw(torch.randperm(p.length, generator=generator), p.length) for p in layout.placements]
    tokens = torch.zeros_like(layout.tokens)
    for step in range(1, steps + 1):
        still = [
            min(d.masked, cosine_masked_count(p.length, step / steps))
            for p, d in zip(layout.placements, draws)
        ]
        if step < steps:  # every step unmasks at least one token per image
            still = [max(0, min(s, d.masked - 1)) for s, d in zip(still, draws)]
        else:
            still = [0] * len(draws)
        hidden = _mask_from_draws(layout, draws)
        reveal = hidden & ~_mask_from_draws(layout, draws, still)
        z = model.backbone(layout, tokens, token_mask=hidden).sample
        tokens[reveal] = _draw_tokens(model, z[reveal], head_steps, temperature, generator)
        for draw, count in zip(draws, still):
            draw.masked = count
    return tokens
