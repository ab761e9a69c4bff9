"""Batches of a tokenized set, both ways: ratio buckets and packed sequences.

* ``bucket``: every batch holds images of one ratio (like CAT's own training, and aspect-ratio
  buckets in SDXL); equal shapes need no padding, mixed shapes in a bucket are padded.
* ``pack``: images of any ratio are packed into ``rows`` sequences of ``max_tokens`` tokens
  (:func:`cat_generation.packing.first_fit`), so a 1024-token and sixteen 64-token images share
  the compute a padded batch would spend on padding.

Both are endless, seeded streams of index lists; :func:`collate` turns one into a normalised
:class:`~cat_generation.packing.PackedBatch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .data import LatentItem
from .packing import PackedBatch, first_fit, pack_latents, pad_latents
from .stats import LatentStats
from .text import embed_captions

BATCHING_MODES = ("pack", "bucket")


def _tokens(item: LatentItem, patch_size: int) -> int:
    return (item.latent.shape[1] // patch_size) * (item.latent.shape[2] // patch_size)


def bucket_batches(items: Sequence[LatentItem], batch_size: int, seed: int = 0) -> Iterator[list[int]]:
    """Endless batches of ``batch_size`` indices, all of one ratio (ratios drawn by their share)."""
    generator = torch.Generator().manual_seed(seed)
    buckets: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        buckets.setdefault(item.ratio, []).append(index)
    ratios = sorted(buckets)
    weights = torch.tensor([len(buckets[r]) for r in ratios], dtype=torch.float)
    while True:
        ratio = ratios[int(torch.multinomial(weights, 1, generator=generator))]
        members = buckets[ratio]
        picks = torch.randperm(len(members), generator=generator)[:batch_size]
        yield [members[int(i)] for i in picks]


def packed_batches(
    items: Sequence[LatentItem], max_tokens: int, rows: int, patch_size: int = 1, seed: int = 0
) -> Iterator[list[int]]:
    """Endless batches of indices that first-fit packs into ``rows`` rows of ``max_tokens``.

    Images are taken in a fresh random order each epoch; an image that would need a row more
    than ``rows`` starts the next batch.
    """
    lengths = [_tokens(item, patch_size) for item in items]
    first_fit(lengths, max_tokens)  # every image must fit a row at all
    generator = torch.Generator().manual_seed(seed)
    while True:
        batch: list[int] = []
        for index in torch.randperm(len(items), generator=generator).tolist():
            candidate = [*batch, index]
            if batch and max(first_fit([lengths[i] for i in candidate], max_tokens)) >= rows:
                yield batch
                candidate = [index]
            batch = candidate
        if batch:
            yield batch


def collate(
    items: Sequence[LatentItem],
    indices: Sequence[int],
    stats: LatentStats,
    mode: str = "pack",
    max_tokens: int | None = None,
    patch_size: int = 1,
    caption_dim: int = 0,
) -> PackedBatch:
    """The normalised :class:`PackedBatch` of ``items[indices]`` (packed, or one image per row)."""
    if mode not in BATCHING_MODES:
        raise ValueError(f"batching mode must be one of {BATCHING_MODES}, got {mode!r}")
    chosen = [items[i] for i in indices]
    latents = [stats.normalize(item.latent, item.ratio) for item in chosen]
    ratios = [item.ratio for item in chosen]
    labels = [item.label for item in chosen]
    captions = embed_captions([item.caption for item in chosen], caption_dim) if caption_dim else None
    if mode == "pack":
        return pack_latents(latents, ratios, labels, max_tokens, patch_size, captions)
    return pad_latents(latents, ratios, labels, patch_size, captions)
