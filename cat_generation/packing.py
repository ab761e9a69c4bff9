"""Packing latents of different token counts into sequences, and getting each image back.

A CAT-routed batch holds 1024-, 256- and 64-token images. Padding each to the longest wastes most
of the compute on padding; **packing** concatenates several images into one sequence (row) instead,
and a block-diagonal attention mask keeps every image to itself:

```
row 0: [img0: 256 tokens][img2: 64][img3: 64][pad ...]
row 1: [img1: 1024 tokens                           ]
```

Every token carries its image's index (``sequence_ids``; :data:`PAD_ID` on padding), its 2-D
``(row, col)`` position in its image's patch grid and its image's ratio. The mask is
``sequence_ids[q] == sequence_ids[k]``, a boolean mask for torch's
``scaled_dot_product_attention``; padding tokens attend only to padding, so no row of the mask is
empty (an all-False row would give NaN) and no real token ever sees padding.
(``flex_attention`` block masks would skip the empty blocks, but torch 2.13 has no flex backward pass
on CPU, where this package has to train too.)

:func:`pad_latents` builds the same :class:`PackedBatch` with one image per row (the padded
baseline, and what a ratio bucket of equal shapes needs: no padding at all), so a model has one
input type for both ways of batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

PAD_ID = -1


@dataclass(frozen=True)
class Placement:
    """Where one image's tokens sit in a :class:`PackedBatch`.

    Args:
        row: the sequence (batch row) holding the image.
        start: index of its first token in that row.
        grid: ``(rows, cols)`` of its patch grid; it holds ``rows * cols`` consecutive tokens.
    """

    row: int
    start: int
    grid: tuple[int, int]

    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class PackedBatch:
    """Images' latent patches laid out in ``S`` sequences of ``L`` tokens.

    Args:
        tokens: ``(S, L, D)`` patch vectors, ``D = latent_channels * patch_size ** 2``; zeros on padding.
        sequence_ids: ``(S, L)`` long, the image index of each token, :data:`PAD_ID` on padding.
        positions: ``(S, L, 2)`` long, each token's ``(row, col)`` in its image's patch grid.
        ratios: ``(S, L)`` long, each token's image ratio (0 on padding).
        image_ratios: ``(N,)`` long, the ratio of each image, in input order.
        labels: ``(N,)`` long class/domain index of each image.
        placements: one :class:`Placement` per image, in input order.
        patch_size: latent positions per patch side.
        latent_channels: ``C`` of the latents.
        caption_embeddings: ``(N, E)`` caption vectors for conditioning, or None.
    """

    tokens: torch.Tensor
    sequence_ids: torch.Tensor
    positions: torch.Tensor
    ratios: torch.Tensor
    image_ratios: torch.Tensor
    labels: torch.Tensor
    placements: tuple[Placement, ...]
    patch_size: int
    latent_channels: int
    caption_embeddings: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return len(self.placements)

    @property
    def real_tokens(self) -> torch.Tensor:
        """``(S, L)`` bool: True on image tokens, False on padding."""
        return self.sequence_ids != PAD_ID

    @property
    def padding_fraction(self) -> float:
        """Share of the ``S * L`` token slots that are padding."""
        return 1.0 - float(self.real_tokens.float().mean())

    def attention_mask(self) -> torch.Tensor:
        """``(S, 1, L, L)`` bool block-diagonal mask (True: may attend), for SDPA's ``attn_mask``."""
        ids = self.sequence_ids
        return (ids[:, :, None] == ids[:, None, :])[:, None]

    def with_tokens(self, tokens: torch.Tensor) -> PackedBatch:
        """The same layout carrying other ``(S, L, D)`` token values."""
        if tokens.shape[:2] != self.sequence_ids.shape:
            raise ValueError(
                f"tokens {tuple(tokens.shape)} do not fit the layout {tuple(self.sequence_ids.shape)}"
            )
        return replace(self, tokens=tokens)

    def to(self, device: torch.device | str) -> PackedBatch:
        """Every tensor moved to ``device``."""
        moved = {
            name: getattr(self, name).to(device)
            for name in ("tokens", "sequence_ids", "positions", "ratios", "image_ratios", "labels")
        }
        if self.caption_embeddings is not None:
            moved["caption_embeddings"] = self.caption_embeddings.to(device)
        return replace(self, **moved)

    def latents(self, tokens: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each image's ``(C, h, w)`` latent from ``tokens`` (default: the batch's own), input order."""
        values = unpack(self, self.tokens if tokens is None else tokens)
        return [
            unpatchify(value, placement.grid, self.patch_size, self.latent_channels)
            for value, placement in zip(values, self.placements)
        ]


def patchify(latent: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(C, h, w)`` -> ``(h/p * w/p, C*p*p)`` patch vectors (row-major) and the grid ``(h/p, w/p)``."""
    channels, height, width = latent.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"latent {height}x{width} is not divisible by patch_size {patch_size}; use patch_size 1 "
            "or images whose latent sides are multiples of it"
        )
    rows, cols = height // patch_size, width // patch_size
    patches = latent.reshape(channels, rows, patch_size, cols, patch_size).permute(1, 3, 0, 2, 4)
    return patches.reshape(rows * cols, channels * patch_size * patch_size), (rows, cols)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(rows*cols, C*p*p)`` -> ``(C, rows*p, cols*p)``."""
    rows, cols = grid
    patches = tokens.reshape(rows, cols, channels, patch_size, patch_size).permute(2, 0, 3, 1, 4)
    return patches.reshape(channels, rows * patch_size, cols * patch_size)


def first_fit(lengths: Sequence[int], capacity: int) -> list[int]:
    """The row of each item when packed first-fit, longest first, into rows of ``capacity`` tokens.

    First-fit decreasing is within 11/9 of the fewest rows possible, and with CAT's three token
    counts (each a multiple of the next) it leaves at most one row partly empty.
    """
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(
            f"an image of {max(too_long)} tokens does not fit rows of {capacity}; raise max_tokens"
        )
    free: list[int] = []
    rows = [0] * len(lengths)
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, space in enumerate(free) if space >= lengths[index]), len(free))
        if row == len(free):
            free.append(capacity)
        free[row] -= lengths[index]
        rows[index] = row
    return rows


def _layout(
    latents: Sequence[torch.Tensor],
    rows: Sequence[int],
    ratios: Sequence[int],
    labels: Sequence[int] | None,
    patch_size: int,
    caption_embeddings: torch.Tensor | None,
) -> PackedBatch:
    """Lay images out in the given rows, each row in input order, padded to the longest row."""
    patches = [patchify(latent, patch_size) for latent in latents]
    num_rows = max(rows) + 1
    fill = [0] * num_rows
    placements = []
    for (values, grid), row in zip(patches, rows):
        placements.append(Placement(row, fill[row], grid))
        fill[row] += values.shape[0]
    length = max(fill)
    dim = patches[0][0].shape[1]
    tokens = torch.zeros(num_rows, length, dim, dtype=latents[0].dtype)
    sequence_ids = torch.full((num_rows, length), PAD_ID, dtype=torch.long)
    positions = torch.zeros(num_rows, length, 2, dtype=torch.long)
    token_ratios = torch.zeros(num_rows, length, dtype=torch.long)
    for index, ((values, grid), placement) in enumerate(zip(patches, placements)):
        span = slice(placement.start, placement.start + placement.length)
        tokens[placement.row, span] = values
        sequence_ids[placement.row, span] = index
        grid_rows, grid_cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        positions[placement.row, span] = torch.stack([grid_rows.flatten(), grid_cols.flatten()], dim=1)
        token_ratios[placement.row, span] = int(ratios[index])
    return PackedBatch(
        tokens=tokens,
        sequence_ids=sequence_ids,
        positions=positions,
        ratios=token_ratios,
        image_ratios=torch.tensor([int(r) for r in ratios], dtype=torch.long),
        labels=torch.tensor(list(labels) if labels is not None else [0] * len(latents), dtype=torch.long),
        placements=tuple(placements),
        patch_size=patch_size,
        latent_channels=int(latents[0].shape[0]),
        caption_embeddings=caption_embeddings,
    )


def _check_inputs(latents, ratios, labels) -> None:
    if not latents:
        raise ValueError("no latents to batch")
    if len(ratios) != len(latents) or (labels is not None and len(labels) != len(latents)):
        raise ValueError("latents, ratios and labels must have one entry per image")
    if len({latent.shape[0] for latent in latents}) != 1:
        raise ValueError("all latents must have the same channel count")


def pack_latents(
    latents: Sequence[torch.Tensor],
    ratios: Sequence[int],
    labels: Sequence[int] | None = None,
    max_tokens: int | None = None,
    patch_size: int = 1,
    caption_embeddings: torch.Tensor | None = None,
) -> PackedBatch:
    """Pack ``(C, h, w)`` latents into as few rows of ``max_tokens`` tokens as first-fit finds.

    Args:
        latents: one ``(C, h, w)`` latent per image (normalised or not: packing does not care).
        ratios: each image's ratio (carried per token, for the ratio-scaled positions).
        labels: each image's class index (default all 0).
        max_tokens: tokens per row; default the total, i.e. one row.
        patch_size: latent positions per patch side (1: one token per latent position).
        caption_embeddings: optional ``(N, E)`` caption vectors, carried per image.
    """
    _check_inputs(latents, ratios, labels)
    lengths = [(latent.shape[1] // patch_size) * (latent.shape[2] // patch_size) for latent in latents]
    rows = first_fit(lengths, sum(lengths) if max_tokens is None else max_tokens)
    return _layout(latents, rows, ratios, labels, patch_size, caption_embeddings)


def pad_latents(
    latents: Sequence[torch.Tensor],
    ratios: Sequence[int],
    labels: Sequence[int] | None = None,
    patch_size: int = 1,
    caption_embeddings: torch.Tensor | None = None,
) -> PackedBatch:
    """One image per row, padded to the longest (arguments as :func:`pack_latents`)."""
    _check_inputs(latents, ratios, labels)
    return _layout(latents, list(range(len(latents))), ratios, labels, patch_size, caption_embeddings)


def unpack(batch: PackedBatch, values: torch.Tensor) -> list[torch.Tensor]:
    """Each image's ``(tokens_i, ...)`` slice of per-token ``values`` ``(S, L, ...)``, in input order."""
    if values.shape[:2] != batch.sequence_ids.shape:
        raise ValueError(
            f"values {tuple(values.shape)} do not match the batch layout {tuple(batch.sequence_ids.shape)}"
        )
    return [values[p.row, p.start : p.start + p.length] for p in batch.placements]


def per_image_to_tokens(batch: PackedBatch, values: torch.Tensor) -> torch.Tensor:
    """Spread per-image ``values`` ``(N, ...)`` to every token ``(S, L, ...)``; zeros on padding."""
    index = batch.sequence_ids.clamp_min(0)
    spread = values[index]
    keep = batch.real_tokens.reshape(*batch.real_tokens.shape, *([1] * (values.dim() - 1)))
    return spread * keep.to(spread.dtype)
