"""Per-ratio, per-channel latent statistics, stored with the tokens, and the normalisation they give.

A downstream model trains on ``(latent - mean[r]) / std[r]`` where ``r`` is the image's ratio: the
three compression paths of the nested VAE do not produce latents of the same scale, so one global
``scaling_factor`` would leave the 32x tokens louder or quieter than the 8x ones. This is the
convention of diffusers' ``latents_mean`` / ``latents_std``, kept once per ratio.

On disk: ``latents_stats.json`` beside the shards of a ``cat-tokenize`` output folder,
``{"ratios": {"8": {"mean": [...C], "std": [...C], "positions": N}, "16": {...}, ...}, ...}`` (ratio
keys as strings, JSON's only key type; ``positions`` is the number of latent positions averaged):
the layout ``cat-tokenize`` itself writes at the end of every run (:mod:`cat_tokenizer.latent_stats`),
with more keys beside ``mean``/``std`` that are ignored here. The flat form without the ``"ratios"``
wrapper is read too. :func:`load_or_compute_stats` reads the file when present and
otherwise computes it from the latents and writes it there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cat_foundations.atomic import atomic_write_json
from cat_foundations.ratios import RATIOS, check_ratio
from cat_tokenizer.latent_stats import LatentStats as TokenizerLatentStats
from cat_tokenizer.run_outputs import LATENT_STATS as STATS_FILE

from .data import LatentItem

MIN_STD = 1e-6  # a constant channel must not divide by zero


@dataclass(frozen=True)
class RatioStats:
    """Statistics of one ratio's latents.

    Args:
        mean: per-channel mean, shape ``(C,)``.
        std: per-channel standard deviation, shape ``(C,)``, at least :data:`MIN_STD`.
        count: latent positions they were computed over (0 when unknown).
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: int = 0


@dataclass(frozen=True)
class LatentStats:
    """Per-ratio statistics, and the normalisation they define.

    Args:
        per_ratio: ratio -> :class:`RatioStats` (only the ratios the tokens hold).
    """

    per_ratio: dict[int, RatioStats]

    def of(self, ratio: int) -> RatioStats:
        """The statistics of ``ratio``; ``KeyError`` saying which ratios have any when absent."""
        if ratio not in self.per_ratio:
            raise KeyError(
                f"no latent statistics for ratio {ratio} (the tokens hold ratios {sorted(self.per_ratio)})"
            )
        return self.per_ratio[ratio]

    def normalize(self, latent: torch.Tensor, ratio: int) -> torch.Tensor:
        """``(latent - mean) / std`` per channel; ``latent`` is ``(..., C, h, w)``."""
        stats = self.of(ratio)
        return (latent - _as_map(stats.mean, latent)) / _as_map(stats.std, latent)

    def denormalize(self, latent: torch.Tensor, ratio: int) -> torch.Tensor:
        """Inverse of :meth:`normalize`: what the VAE decodes."""
        stats = self.of(ratio)
        return latent * _as_map(stats.std, latent) + _as_map(stats.mean, latent)

    def to_json(self) -> dict:
        """The ``latents_stats.json`` form (see the module docstring)."""
        ratios = {
            str(ratio): {"mean": s.mean.tolist(), "std": s.std.tolist(), "positions": s.count}
            for ratio, s in sorted(self.per_ratio.items())
        }
        return {"ratios": ratios}

    @classmethod
    def from_json(cls, value: dict) -> LatentStats:
        """Read either ``latents_stats.json`` form; keys that are not ratios are ignored."""
        per_ratio = {}
        entries = value["ratios"] if isinstance(value.get("ratios"), dict) else value
        for key, entry in entries.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) in RATIOS):
                continue
            mean = torch.tensor(entry["mean"], dtype=torch.float32)
            std = torch.tensor(entry["std"], dtype=torch.float32).clamp_min(MIN_STD)
            if mean.shape != std.shape or mean.dim() != 1:
                raise ValueError(f"ratio {key}: mean and std must be lists of one number per channel")
            per_ratio[int(key)] = RatioStats(mean, std, int(entry.get("positions", entry.get("count", 0))))
        if not per_ratio:
            raise ValueError(f"no ratio entries (keys must be among {[str(r) for r in RATIOS]})")
        return cls(per_ratio)

    def save(self, path: str | Path) -> None:
        """Write ``latents_stats.json`` atomically."""
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LatentStats:
        """Read a ``latents_stats.json``; ``ValueError`` naming the file when it is malformed."""
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not a latents_stats.json ({error})") from None


def _as_map(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(C,)`` vector shaped to broadcast over ``(..., C, h, w)``."""
    return values.to(device=like.device, dtype=like.dtype)[:, None, None]


def _tokenizer_summary(items: Sequence[LatentItem]) -> dict:
    """The ``latents_stats.json`` that ``cat-tokenize`` would have written for ``items``.

    Computed by cat_tokenizer's own accumulator (float64 per-channel sums), so a file written here
    and one written by a tokenize run are the same format from the same code.
    """
    if not items:
        raise ValueError("no latents to compute statistics from")
    sums = TokenizerLatentStats()
    for item in items:
        sums.add(check_ratio(item.ratio), item.latent)
    return sums.summary(scaling_factor=items[0].scaling_factor)


def compute_stats(items: Sequence[LatentItem]) -> LatentStats:
    """Per-ratio, per-channel mean and (population) std over every latent position of ``items``."""
    return LatentStats.from_json(_tokenizer_summary(items))


def load_or_compute_stats(directory: str | Path, items: Sequence[LatentItem]) -> LatentStats:
    """The tokens' ``latents_stats.json`` when present; else computed from ``items`` and saved there.

    Every ``cat-tokenize`` run writes the file; older output folders lack it. A read-only tokens
    folder is not an error: the statistics are then returned without being saved (a training run
    keeps its own copy either way).
    """
    path = Path(directory) / STATS_FILE
    if path.is_file():
        return LatentStats.load(path)
    summary = _tokenizer_summary(items)
    try:
        atomic_write_json(path, summary)
    except OSError:
        pass
    return LatentStats.from_json(summary)
