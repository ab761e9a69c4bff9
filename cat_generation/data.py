"""Read what ``cat-tokenize`` wrote: one :class:`LatentItem` per tokenized image.

The reader goes through cat_tokenizer's own reader (:func:`cat_tokenizer.readers.iter_encoded`), so
every layout ``cat-tokenize`` writes (folder runs, ``--shards`` / ``--hf-dataset`` runs in
safetensors or webdataset form) reads the same way and this package never parses a shard itself.

Labels for class/domain conditioning come from the image id by a named rule (:data:`LABEL_RULES`):
``none`` (one class), ``dir`` (the first folder of the id) or ``prefix`` (the file name up to its
first ``_``, which is how the devset names its domains: ``chart_pandas_001.png`` -> ``chart``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import torch

from cat_foundations.ratios import check_ratio
from cat_tokenizer.readers import iter_encoded


@dataclass(frozen=True)
class LatentItem:
    """One tokenized image, as a generator trains on it.

    Args:
        id: the image id (its path relative to the tokenized folder).
        latent: unscaled latent ``C x h x w`` (the VAE posterior mean, as ``cat-tokenize`` stores it).
        ratio: the compression ratio it was routed to (one of ``cat_foundations.ratios.RATIOS``).
        size: ``(H, W)`` of the encoded image; decoding a latent of this shape gives this size.
        caption: the caption it was routed by, or None.
        score: the router's complexity score (1..9), or None when the ratio was fixed.
        label: the class/domain index used for conditioning (see :func:`assign_labels`).
        scaling_factor: the VAE's ``config.scaling_factor`` the tokens were made with.
    """

    id: str
    latent: torch.Tensor
    ratio: int
    size: tuple[int, int]
    caption: str | None = None
    score: float | None = None
    label: int = 0
    scaling_factor: float = 1.0

    @property
    def tokens(self) -> int:
        """Latent positions ``h * w`` (the token count ``cat_foundations.ratios.tokens_for`` gives)."""
        return int(self.latent.shape[-2] * self.latent.shape[-1])


def read_tokens(directory: str | Path) -> list[LatentItem]:
    """Every image of a ``cat-tokenize`` output folder, in shard order.

    Raises:
        FileNotFoundError: the folder holds no committed shard.
        ValueError: a shard is not a cat-tokenizer shard, or a latent disagrees with its record.
    """
    directory = Path(directory)
    items = []
    for record, encoded in iter_encoded(directory):
        items.append(
            LatentItem(
                id=str(record["id"]),
                latent=encoded.latent.float(),
                ratio=check_ratio(encoded.ratio),
                size=tuple(encoded.size),
                caption=record.get("caption"),
                score=encoded.score,
                scaling_factor=encoded.scaling_factor,
            )
        )
    if not items:
        raise FileNotFoundError(f"{directory}: no shards/ with tokenized images (run cat-tokenize first)")
    return items


def _label_none(_: str) -> str:
    return "all"


def _label_dir(image_id: str) -> str:
    parts = PurePosixPath(image_id).parts
    return parts[0] if len(parts) > 1 else "."


def _label_prefix(image_id: str) -> str:
    return PurePosixPath(image_id).name.split("_", 1)[0]


LABEL_RULES: dict[str, Callable[[str], str]] = {
    "none": _label_none,
    "dir": _label_dir,
    "prefix": _label_prefix,
}


def assign_labels(
    items: Sequence[LatentItem], rule: str = "none", names: Sequence[str] | None = None
) -> tuple[list[LatentItem], list[str]]:
    """Give every item a class index by ``rule``; returns the items and the label names (index order).

    Args:
        items: what :func:`read_tokens` returned.
        rule: one of :data:`LABEL_RULES`.
        names: a fixed label list (e.g. a trained run's); an item whose label is not in it fails.
            Default: the sorted names found.
    """
    if rule not in LABEL_RULES:
        raise ValueError(f"label rule must be one of {sorted(LABEL_RULES)}, got {rule!r}")
    found = [LABEL_RULES[rule](item.id) for item in items]
    names = sorted(set(found)) if names is None else list(names)
    index = {name: i for i, name in enumerate(names)}
    missing = sorted(set(found) - set(index))
    if missing:
        raise ValueError(f"labels {missing} are not among the known labels {names}")
    return [replace(item, label=index[name]) for item, name in zip(items, found)], names
