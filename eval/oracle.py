"""The oracle ratio allocation: the upper bound that routers are measured against.

It knows every image's quality at every ratio (``(N, L)`` tables, levels coarse first, i.e.
32x, 16x, 8x) and picks one ratio per image to maximise the mean quality within a mean-token
budget. :class:`Frontier` solves this exactly for every budget at once (dynamic programming over
budgets in units of the token steps), so the oracle at a budget is the true optimum, never below
fixed 16x at 16x's tokens, and "fewest tokens to match" is monotone. :func:`greedy_upgrades` --
start at 32x, repeatedly make the upgrade with the best gain per extra token that still fits --
is kept for comparison: it is optimal except at knapsack corners (e.g. four images back to 32x
to pay for one 16x -> 8x). :func:`oracle_row` compares the oracle with fixed 16x (``cat-bench headroom``),
and :func:`coarsest_gap_to_close` says how much better the 32x exit must get before the oracle saves
the target share of tokens.
"""

from __future__ import annotations

import math

import numpy as np

from cat_foundations.ratios import RATIOS
from eval.recon import LOWER_IS_BETTER

COARSE_FIRST = tuple(sorted(RATIOS, reverse=True))  # oracle levels: 32, 16, 8
REFERENCE = 16
TARGET_SAVING_PCT = 35.0  # issue #16: the oracle matches fixed 16x with >= 35 % fewer tokens


def greedy_upgrades(quality: np.ndarray, tokens: np.ndarray, budget: float | None = None):
    """Greedy allocation by quality gain per extra token.

    Args:
        quality: ``(N, L)`` per image and level, higher is better (negate lower-is-better metrics).
        tokens: ``(N, L)`` tokens per image and level, strictly increasing along L (coarse first).
        budget: total tokens the allocation may use (None: every upgrade with a gain).

    Returns:
        (level per image ``(N,)``, upgrades ``[(image, new level), ...]`` in the order made).
    """
    count, levels = quality.shape
    rows, columns = np.arange(count), np.arange(levels)
    level = np.zeros(count, dtype=int)
    spent = float(tokens[:, 0].sum())
    steps = []
    while True:
        gain = quality - quality[rows, level][:, None]
        cost = tokens - tokens[rows, level][:, None]
        valid = (columns[None, :] > level[:, None]) & (gain > 0)
        if budget is not None:
            valid &= spent + cost <= budget + 1e-6
        efficiency = np.where(valid, gain / np.where(cost > 0, cost, 1), -np.inf)
        best = int(np.argmax(efficiency))
        if not np.isfinite(efficiency.flat[best]):
            return level, steps
        image, new_level = divmod(best, levels)
        spent += float(cost[image, new_level])
        level[image] = new_level
        steps.append((image, new_level))


class Frontier:
    """The exact oracle: the best allocation at every budget (a multiple-choice knapsack, solved by DP).

    Budgets are counted in units of the gcd of the per-image token steps (192 tokens at 256^2:
    +192 for 32x -> 16x, +960 for 32x -> 8x), so the table has ``sum(steps) / unit + 1`` entries.

    Args:
        quality: ``(N, L)`` per image and level, higher is better (negate lower-is-better metrics).
        tokens: ``(N, L)`` tokens per image and level, increasing along L (coarse first).
    """

    def __init__(self, quality: np.ndarray, tokens: np.ndarray):
        tokens = np.rint(tokens).astype(np.int64)
        steps = tokens - tokens[:, :1]
        self.unit = int(np.gcd.reduce(steps.ravel())) or 1
        self.cost = steps // self.unit
        self.count, levels = quality.shape
        self.base_tokens, self.base_quality = int(tokens[:, 0].sum()), float(quality[:, 0].sum())
        size = int(self.cost.max(axis=1).sum()) + 1
        best = np.full(size, -np.inf)
        best[0] = 0.0
        self.choices = np.zeros((self.count, size), dtype=np.int8)
        for image in range(self.count):
            candidates = np.full((levels, size), -np.inf)
            for level in range(levels):
                shift = self.cost[image, level]
                candidates[level, shift:] = best[: size - shift] + quality[image, level] - quality[image, 0]
            self.choices[image] = candidates.argmax(axis=0)  # ties: the coarser level
            best = candidates.max(axis=0)
        self.best = best  # best[b]: highest total gain over all-coarse with exactly b units

    def mean_tokens(self, units: int) -> float:
        return (self.base_tokens + units * self.unit) / self.count

    def allocate(self, budget: float) -> np.ndarray:
        """Levels ``(N,)`` of the best allocation with at most ``budget`` mean tokens (fewest tokens on ties)."""
        limit = math.floor((budget * self.count - self.base_tokens) / self.unit + 1e-9)
        if limit < 0:
            raise ValueError(f"budget {budget} mean tokens is below the all-coarsest {self.mean_tokens(0)}")
        units = int(np.argmax(self.best[: limit + 1]))
        levels = np.zeros(self.count, dtype=int)
        for image in reversed(range(self.count)):
            levels[image] = self.choices[image, units]
            units -= int(self.cost[image, levels[image]])
        return levels

    def fewest_tokens(self, target: float) -> float | None:
        """Fewest mean tokens whose best mean quality reaches ``target`` (None: never)."""
        reached = np.flatnonzero(self.base_quality + self.best >= (target - 1e-9) * self.count)
        return self.mean_tokens(int(reached[0])) if reached.size else None

    def curve(self) -> tuple[list[float], list[float]]:
        """The frontier's corners: mean tokens and best mean quality where the quality rises."""
        running = np.maximum.accumulate(self.best)
        corners = np.flatnonzero(np.diff(running, prepend=-np.inf) > 1e-12)
        means = (self.base_quality + running[corners]) / self.count
        return [self.mean_tokens(int(u)) for u in corners], means.tolist()


def fewest_tokens_to_match_16x(frontier: Frontier, quality: np.ndarray, tokens: np.ndarray):
    """Fewest mean tokens with which the oracle matches fixed 16x's mean quality, and the % saved
    against fixed 16x's tokens (``(None, None)``: never). ``quality`` as :class:`Frontier`'s."""
    reference = COARSE_FIRST.index(REFERENCE)
    fewest = frontier.fewest_tokens(float(quality[:, reference].mean()))
    if fewest is None:
        return None, None
    return fewest, 100.0 * (1 - fewest / float(tokens[:, reference].mean()))


def coarsest_gap_to_close(
    quality: np.ndarray, tokens: np.ndarray, target_saving_pct: float, tolerance: float = 1e-3
) -> float | None:
    """The share of every image's quality gap between 32x and 16x that the 32x exit must close for the
    oracle to match fixed 16x with ``target_saving_pct`` % fewer tokens.

    What a better 32x exit is worth to routing: 0 means the exits already allow the saving; 0.8 means
    each image's 32x result must come within a fifth of its 16x result (its 16x and 8x results as
    they are). The gap is closed uniformly, only where 32x is worse than 16x, so the saving grows
    with the share and bisection finds the smallest one (to ``tolerance``).

    Args:
        quality: ``(N, L)`` per image and level, higher is better, COARSE_FIRST order (32x, 16x, 8x).
        tokens: ``(N, L)`` tokens per image and level, in the same order.
        target_saving_pct: the token saving to reach (the issue's target: 35).
        tolerance: precision of the returned share.

    Returns:
        The share in [0, 1], or None when even a 32x exit as good as 16x misses the target.
    """
    reference = COARSE_FIRST.index(REFERENCE)
    gap = np.maximum(quality[:, reference] - quality[:, 0], 0.0)

    def reaches(share: float) -> bool:
        closed = quality.copy()
        closed[:, 0] += share * gap
        saving = fewest_tokens_to_match_16x(Frontier(closed, tokens), closed, tokens)[1]
        return saving is not None and saving >= target_saving_pct - 1e-9

    if reaches(0.0):
        return 0.0
    if not reaches(1.0):
        return None
    low, high = 0.0, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return high


def oracle_row(
    values: np.ndarray,
    tokens: np.ndarray,
    metric: str,
    budget: float | None,
    target_saving_pct: float = TARGET_SAVING_PCT,
) -> dict:
    """Oracle vs fixed 16x for one metric; ``values`` ``(N, L)`` in COARSE_FIRST order, the metric's units."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    quality, reference, rows = sign * values, COARSE_FIRST.index(REFERENCE), np.arange(len(values))
    fixed_tokens, fixed = float(tokens[:, reference].mean()), float(values[:, reference].mean())
    budget = fixed_tokens if budget is None else budget
    frontier = Frontier(quality, tokens)
    level = frontier.allocate(budget)
    oracle = float(values[rows, level].mean())
    greedy = float(values[rows, greedy_upgrades(quality, tokens, budget * len(values))[0]].mean())
    fewest, saving = fewest_tokens_to_match_16x(frontier, quality, tokens)
    curve_tokens, curve_quality = frontier.curve()
    row = {
        "budget_mean_tokens": budget,
        "mean_tokens": float(tokens[rows, level].mean()),
        "ratio_counts": {str(r): int((level == i).sum()) for i, r in enumerate(COARSE_FIRST)},
        "fixed16": fixed,
        "fixed16_mean_tokens": fixed_tokens,
        "oracle": oracle,
        "gain": sign * (oracle - fixed),
        "greedy_oracle": greedy,  # greedy by gain per token, for comparison (misses knapsack corners)
        "fewest_mean_tokens": fewest,
        "fewest_saving_pct": saving,
        "target_saving_pct": target_saving_pct,
        "gap_32x_to_close": coarsest_gap_to_close(quality, tokens, target_saving_pct),
        "frontier": {"mean_tokens": curve_tokens, "mean": [sign * q for q in curve_quality]},
    }
    if metric in LOWER_IS_BETTER:
        row["gain_pct"] = 100.0 * row["gain"] / fixed if fixed else None
    return row
