"""Routing policy: final complexity score -> compression ratio 32x / 16x / 8x.

``score < low -> 32x``, ``low <= score < high -> 16x``, ``score >= high -> 8x``.

Default thresholds (``low=7.25``, ``high=8.25``): fitted with ``calibrate(target_mean_tokens=256)``
(the fixed-16x budget at 256 px, gap 1.0) on the final scores of the devset's train split (294
captions) with the default router model, prompt ``cat-router-v2`` and the default
:class:`~router.scores.CombinationRule` (``python -m eval.router_domains --fit`` prints them). They
are a starting point, not a quality fit: calibrate to your token budget (``calibrate(scores,
target_mean_tokens=...)``) or to oracle labels from eval/ (``calibrate(scores, oracle_ratios=...)``)
and save the thresholds as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cat_foundations.atomic import atomic_write_json
from cat_foundations.ratios import RATIOS, tokens_for
from router.fallback import image_complexity_score
from router.scores import ComplexityScore

__all__ = ["RATIOS", "SOURCE_OVERRIDE", "RoutingDecision", "RoutingPolicy", "routing_score", "tokens_for"]
SOURCE_OVERRIDE = "override"


@dataclass
class RoutingDecision:
    """Which ratio one image gets and why.

    Args:
        ratio: 8, 16 or 32.
        score: the final complexity score used (None when the ratio was overridden).
        source: what decided: ``"caption_llm"``, ``"image_jpeg_bpp"`` or ``"override"``.
        complexity: the full :class:`ComplexityScore` when there was one.
    """

    ratio: int
    score: float | None
    source: str
    complexity: ComplexityScore | None = None


def routing_score(caption_score, image=None, *, image_score=None):
    """The score routing uses, in the ONE order of precedence (after an explicit ratio override).

    The caption's score when there is one, else the image-only fallback: ``image_score`` when
    already computed, else :func:`~router.fallback.image_complexity_score` of ``image`` (a PIL
    image, anything ``load_image`` reads, or a zero-argument callable returning one, so the
    pixels are loaded only when the fallback is needed). ``RoutingPolicy.decide``, ``cat-tokenize``
    calibration and ``eval`` all route through here.
    """
    if caption_score is not None:
        return caption_score
    if image_score is not None:
        return image_score
    if image is None:
        raise ValueError("routing needs a caption score, an image for the fallback, or an override ratio")
    return image_complexity_score(image() if callable(image) else image)


def _tokens_per_image(image_size, count: int) -> np.ndarray:
    """``(count, 3)`` token counts at 32x, 16x and 8x: one size for all images, or one per image."""
    if isinstance(image_size, int) or (
        isinstance(image_size, tuple) and len(image_size) == 2 and all(isinstance(v, int) for v in image_size)
    ):
        sizes = [image_size] * count
    else:
        sizes = [tuple(size) for size in image_size]
        if len(sizes) != count:
            raise ValueError(f"image_size has {len(sizes)} sizes for {count} scores: give one per score")
    return np.array([[tokens_for(ratio, size) for ratio in sorted(RATIOS, reverse=True)] for size in sizes])


def _score_values(scores: Sequence[ComplexityScore | float]) -> np.ndarray:
    values = np.array([s.score if isinstance(s, ComplexityScore) else float(s) for s in scores], dtype=float)
    if values.size == 0:
        raise ValueError("calibration needs at least one score")
    if not np.all(np.isfinite(values)):
        raise ValueError("calibration scores must be finite numbers")
    return values


@dataclass
class RoutingPolicy:
    """Thresholds on the final score.

    Args:
        low: scores below ``low`` go to 32x (coarsest, fewest tokens).
        high: scores at or above ``high`` go to 8x (finest, most tokens); between: 16x.
    """

    low: float = 7.25
    high: float = 8.25

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"thresholds need low <= high, got low={self.low}, high={self.high}")

    def route(self, score: ComplexityScore | float) -> int:
        """Ratio for one score."""
        value = score.score if isinstance(score, ComplexityScore) else float(score)
        if value < self.low:
            return 32
        if value < self.high:
            return 16
        return 8

    def decide(
        self,
        score: ComplexityScore | float | None,
        image=None,
        override_ratio: int | None = None,
    ) -> RoutingDecision:
        """Pick a ratio: an explicit override wins, then the caption score, then the image fallback.

        Args:
            score: the caption's score, or None when the image has no caption.
            image: PIL image (or anything ``cat_foundations.images.load_image`` reads), used for the
                JPEG bits-per-pixel fallback when ``score`` is None.
            override_ratio: force this ratio (8, 16 or 32).
        """
        if override_ratio is not None:
            if override_ratio not in RATIOS:
                raise ValueError(f"override_ratio must be one of {RATIOS}, got {override_ratio!r}")
            return RoutingDecision(ratio=int(override_ratio), score=None, source=SOURCE_OVERRIDE)
        if score is None and image is None:
            raise ValueError("decide() needs a caption score, an image for the fallback, or override_ratio")
        score = routing_score(score, image)
        if isinstance(score, ComplexityScore):
            return RoutingDecision(self.route(score), score.score, score.source, complexity=score)
        return RoutingDecision(self.route(score), float(score), "given")

    def mean_tokens(self, scores: Sequence[ComplexityScore | float], image_size=256) -> float:
        """Mean latent tokens over ``scores`` when every image has size ``image_size``."""
        return float(np.mean([tokens_for(self.route(s), image_size) for s in scores]))

    # ---- calibration -------------------------------------------------------------------------

    @classmethod
    def calibrate(
        cls,
        scores: Sequence[ComplexityScore | float],
        target_mean_tokens: float | None = None,
        oracle_ratios: Sequence[int] | None = None,
        image_size: int | tuple[int, int] | Sequence[tuple[int, int]] = 256,
        base: RoutingPolicy | None = None,
    ) -> RoutingPolicy:
        """Fit thresholds to a token budget or to oracle labels (give exactly one of the two).

        Args:
            scores: final scores of a dataset (ComplexityScore or floats).
            target_mean_tokens: the dataset's mean tokens per image should be as close as possible
                to this (e.g. ``tokens_for(16, 256)`` = "same budget as fixed 16x"). Two thresholds
                but one budget: the gap ``high - low`` of ``base`` is kept and both shift together,
                which makes mean tokens monotone in the shift; the shift closest to the budget wins.
            oracle_ratios: per score, the smallest-token ratio whose reconstruction meets the
                quality bar (computed by eval/). Thresholds maximise exact agreement; ties go to
                fewer images routed coarser than their oracle (quality misses).
            image_size: size at which tokens are counted for the budget: one for every image
                (int or (H, W)), or one (H, W) per score -- the sizes actually encoded, so the
                budget means what the run's summary reports.
            base: policy whose threshold gap is kept for budget calibration (default: defaults).
        """
        if (target_mean_tokens is None) == (oracle_ratios is None):
            raise ValueError("calibrate() takes exactly one of target_mean_tokens or oracle_ratios")
        values = _score_values(scores)
        if target_mean_tokens is not None:
            return cls._fit_budget(values, float(target_mean_tokens), image_size, base or cls())
        return cls._fit_oracle(values, oracle_ratios)

    @classmethod
    def _fit_budget(cls, values: np.ndarray, target: float, image_size, base: RoutingPolicy) -> RoutingPolicy:
        tokens = _tokens_per_image(image_size, values.size)  # (n, 3): tokens at 32x, 16x, 8x
        lowest, highest = tokens[:, 0].mean(), tokens[:, 2].mean()
        if not lowest <= target <= highest:
            raise ValueError(
                f"target_mean_tokens={target:g} is outside what routing can reach on these images "
                f"({lowest:g} at all-32x .. {highest:g} at all-8x)"
            )
        gap = base.high - base.low
        # Mean tokens only change when a threshold crosses a score, so these shifts (placing
        # ``low`` or ``high`` just above / at each score) cover every reachable budget.
        shifts = np.unique(np.concatenate([values - base.low, values - base.high]))
        shifts = np.sort(np.concatenate([shifts, shifts + 1e-6, [shifts.min() - 1.0, shifts.max() + 1.0]]))
        order = np.argsort(values, kind="stable")
        sorted_values = values[order]
        # prefix[k, j]: tokens of the k lowest-scoring images, all at ratio column j.
        prefix = np.vstack([np.zeros((1, 3)), np.cumsum(tokens[order], axis=0)])
        below_low = np.searchsorted(sorted_values, base.low + shifts, side="left")
        below_high = np.searchsorted(sorted_values, base.low + shifts + gap, side="left")
        total = (
            prefix[below_low, 0]
            + (prefix[below_high, 1] - prefix[below_low, 1])
            + (prefix[-1, 2] - prefix[below_high, 2])
        )
        best = int(np.argmin(np.abs(total / values.size - target)))  # first (smallest shift) on ties
        return cls(low=float(base.low + shifts[best]), high=float(base.low + shifts[best] + gap))

    @classmethod
    def _fit_oracle(cls, values: np.ndarray, oracle_ratios: Sequence[int]) -> RoutingPolicy:
        oracle = np.asarray(list(oracle_ratios), dtype=int)
        if oracle.shape != values.shape:
            raise ValueError(f"got {values.size} scores but {oracle.size} oracle ratios")
        bad = sorted(set(oracle.tolist()) - set(RATIOS))
        if bad:
            raise ValueError(f"oracle ratios must be in {RATIOS}, got {bad}")
        order = np.argsort(values, kind="stable")
        sorted_values, sorted_oracle = values[order], oracle[order]
        # Threshold candidates: below everything, between distinct neighbours, above everything.
        distinct = np.unique(sorted_values)
        cuts = np.concatenate([[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1.0]])
        # cut_index[c] = number of scores below cut c.
        cut_index = np.searchsorted(sorted_values, cuts, side="left")
        prefix = {r: np.concatenate([[0], np.cumsum(sorted_oracle == r)]) for r in RATIOS}
        # "Too coarse" = routed to a bigger ratio than the oracle allows.
        coarse_if_32 = np.concatenate([[0], np.cumsum(sorted_oracle < 32)])
        coarse_if_16 = np.concatenate([[0], np.cumsum(sorted_oracle < 16)])
        n = len(sorted_values)
        best, best_key = None, None
        for i, low_idx in enumerate(cut_index):
            high_idx = cut_index[i:]
            agree = (
                prefix[32][low_idx]
                + prefix[16][high_idx]
                - prefix[16][low_idx]
                + prefix[8][n]
                - prefix[8][high_idx]
            )
            misses = coarse_if_32[low_idx] + coarse_if_16[high_idx] - coarse_if_16[low_idx]
            j = int(np.lexsort((misses, -agree))[0])
            key = (-int(agree[j]), int(misses[j]))
            if best_key is None or key < best_key:
                best_key, best = key, (float(cuts[i]), float(cuts[i + j]))
        return cls(low=best[0], high=best[1])

    # ---- persistence -------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the thresholds as JSON (atomically)."""
        atomic_write_json(Path(path), {"format": "cat-router-policy-v1", **asdict(self)})

    @classmethod
    def load(cls, path: str | Path) -> RoutingPolicy:
        """Read thresholds written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot read routing policy JSON ({error})") from error
        if not isinstance(data, dict) or "low" not in data or "high" not in data:
            raise ValueError(f"{path}: a routing policy needs numeric 'low' and 'high' keys")
        try:
            return cls(low=float(data["low"]), high=float(data["high"]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error
