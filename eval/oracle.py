"""The oracle ratio allocation: the upper bound that routers are measured against.

It knows every image's quality at every ratio (``(N, L)`` tables, levels coarse first, i.e.
32x, 16x, 8x), starts all images at the coarsest level and repeatedly makes the upgrade with the
best quality gain per extra token -- to any finer level, so an image whose 16x is not on its
convex hull jumps 32x -> 8x; upgrades without gain are never made -- while it fits the budget.
:func:`oracle_row` compares it with fixed 16x at equal tokens and finds the fewest tokens with
which it matches fixed 16x (``cat-bench headroom``).
"""

from __future__ import annotations

import numpy as np

from eval.recon import LOWER_IS_BETTER
from nested_vae import RATIOS

COARSE_FIRST = tuple(sorted(RATIOS, reverse=True))  # oracle levels: 32, 16, 8
REFERENCE = 16


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


def greedy_path(quality: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean tokens and mean quality after each upgrade of the unconstrained greedy path (index 0: all coarse)."""
    level = np.zeros(quality.shape[0], dtype=int)
    total_q, total_t = [float(quality[:, 0].sum())], [float(tokens[:, 0].sum())]
    for image, new_level in greedy_upgrades(quality, tokens)[1]:
        old = level[image]
        total_q.append(total_q[-1] + quality[image, new_level] - quality[image, old])
        total_t.append(total_t[-1] + tokens[image, new_level] - tokens[image, old])
        level[image] = new_level
    return np.asarray(total_t) / len(level), np.asarray(total_q) / len(level)


def fewest_tokens(quality: np.ndarray, tokens: np.ndarray, target: float) -> float | None:
    """Fewest mean tokens at which the budgeted greedy oracle's mean quality reaches ``target``.

    Bisection over the budgets the allocations can reach (all-coarse total plus multiples of the
    gcd of the per-image token steps); None when even every image at its best level falls short.
    """
    rows = np.arange(len(quality))
    unit = int(np.gcd.reduce(np.diff(tokens.astype(np.int64), axis=1).ravel()))
    low = float(tokens[:, 0].sum())

    def allocate(steps: int) -> np.ndarray:
        return greedy_upgrades(quality, tokens, low + steps * unit)[0]

    def reaches(steps: int) -> bool:
        return float(quality[rows, allocate(steps)].mean()) >= target - 1e-9

    below, above = -1, int(round((tokens[:, -1].sum() - low) / unit))
    if not reaches(above):
        return None
    while above - below > 1:
        middle = (below + above) // 2
        below, above = (below, middle) if reaches(middle) else (middle, above)
    return float(tokens[rows, allocate(above)].mean())


def oracle_row(values: np.ndarray, tokens: np.ndarray, metric: str, budget: float | None) -> dict:
    """Oracle vs fixed 16x for one metric; ``values`` ``(N, L)`` in COARSE_FIRST order, the metric's units."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    quality, reference = sign * values, COARSE_FIRST.index(REFERENCE)
    fixed_tokens, fixed = float(tokens[:, reference].mean()), float(values[:, reference].mean())
    budget = fixed_tokens if budget is None else budget
    level, _ = greedy_upgrades(quality, tokens, budget * len(values))
    chosen = values[np.arange(len(values)), level]
    path_tokens, path_quality = greedy_path(quality, tokens)
    fewest = fewest_tokens(quality, tokens, sign * fixed)
    oracle = float(chosen.mean())
    row = {
        "budget_mean_tokens": budget,
        "mean_tokens": float(tokens[np.arange(len(values)), level].mean()),
        "ratio_counts": {str(r): int((level == i).sum()) for i, r in enumerate(COARSE_FIRST)},
        "fixed16": fixed,
        "fixed16_mean_tokens": fixed_tokens,
        "oracle": oracle,
        "gain": sign * (oracle - fixed),
        "fewest_mean_tokens": fewest,
        "fewest_saving_pct": None if fewest is None else 100.0 * (1 - fewest / fixed_tokens),
        "path": {"mean_tokens": path_tokens.tolist(), "mean": (sign * path_quality).tolist()},
    }
    if metric in LOWER_IS_BETTER:
        row["gain_pct"] = 100.0 * row["gain"] / fixed if fixed else None
    return row


# --------------------------------------------------------------------------------------------
