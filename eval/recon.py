"""`cat-bench recon`: quality per token for fixed ratios and adaptive routing, overall and per domain.

Methods compared (each assigns one ratio per image):

* ``fixed-8x`` / ``fixed-16x`` / ``fixed-32x``: every image at one ratio;
* ``adaptive``: the router's score through the given :class:`~router.RoutingPolicy`;
* ``adaptive@16x-budget``: the same scores with thresholds calibrated
  (``RoutingPolicy.calibrate(scores, target_mean_tokens=tokens_for(16, size))``) so the mean
  tokens per image over the whole set equal fixed 16x's -- the equal-budget comparison the CAT
  paper makes. Within one domain the mean tokens then differ from 16x's: routing moves tokens
  from easy domains to hard ones, which is the point.
* ``adaptive@16x-budget-in-group``: thresholds calibrated separately inside each group (domain,
  split) to fixed 16x's tokens, so every row compares at equal tokens within its own group.
  Budget calibrations use only the scores (no reconstruction quality), on the evaluated set.

For each method and group: mean PSNR, SSIM, EfficientNet feature distance, LPIPS (or
"unavailable"), rFID against the originals of the same group, mean tokens per image, and the
relative change of every metric vs ``fixed-16x`` (for PSNR also the difference in dB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cat_foundations.ratios import tokens_for
from eval.engine import ImageResult
from eval.metrics import UNAVAILABLE, fid_from_features
from router import RoutingPolicy

FIXED_REFERENCE = "fixed-16x"
ADAPTIVE = "adaptive"
CALIBRATED = "adaptive@16x-budget"
GROUP_CALIBRATED = "adaptive@16x-budget-in-group"
# Lower is better for these; higher is better for PSNR and SSIM.
LOWER_IS_BETTER = {"rfid", "effnet_dist", "lpips"}
METRIC_NAMES = ("rfid", "psnr", "ssim", "lpips", "effnet_dist")


def fixed_name(ratio: int) -> str:
    return f"fixed-{ratio}x"


@dataclass
class Method:
    """A named assignment of one ratio per image (same order as the results)."""

    name: str
    ratios: list[int]


def build_methods(results: Sequence[ImageResult], fixed: Sequence[int], adaptive: bool, policy, size: int):
    """The compared methods and the calibrated policy (None without adaptive).

    Args:
        results: per-image results (with router scores).
        fixed: fixed ratios to report.
        adaptive: also report adaptive routing and its 16x-budget calibration.
        policy: the :class:`~router.RoutingPolicy` for ``adaptive``.
        size: image side (tokens are counted at this size).
    """
    methods = [Method(fixed_name(r), [r] * len(results)) for r in fixed]
    calibrated = None
    if adaptive:
        scores = [r.router_score() for r in results]
        methods.append(Method(ADAPTIVE, [policy.route(s) for s in scores]))
        calibrated = RoutingPolicy.calibrate(
            scores, target_mean_tokens=tokens_for(16, size), image_size=size, base=policy
        )
        methods.append(Method(CALIBRATED, [calibrated.route(s) for s in scores]))
    return methods, calibrated


def _mean(values: list) -> float | str | None:
    present = [v for v in values if v is not None]
    if not values:
        return math.nan
    if not present:
        return None
    return float(np.mean(present))


def summarize(
    results: Sequence[ImageResult], ratios: Sequence[int], size: int, lpips_available: bool
) -> dict:
    """Metrics of one method on one group of images (``ratios[i]`` is image i's ratio)."""
    chosen = [r.metrics[ratio] for r, ratio in zip(results, ratios)]
    has_features = all("original" in r.features and ratio in r.features for r, ratio in zip(results, ratios))
    rfid = (
        fid_from_features(
            [r.features["original"] for r in results],
            [r.features[ratio] for r, ratio in zip(results, ratios)],
        )
        if has_features and results
        else None
    )
    counts = {str(k): int(v) for k, v in zip(*np.unique(np.asarray(ratios, dtype=int), return_counts=True))}
    return {
        "n": len(results),
        "mean_tokens": float(np.mean([tokens_for(r, size) for r in ratios])) if ratios else math.nan,
        "ratio_counts": counts,
        "psnr": _mean([m["psnr"] for m in chosen]),
        "ssim": _mean([m["ssim"] for m in chosen]),
        "effnet_dist": _mean([m.get("effnet_dist") for m in chosen]),
        "lpips": _mean([m.get("lpips") for m in chosen]) if lpips_available else UNAVAILABLE,
        "rfid": rfid,
    }


def relative_changes(row: dict, reference: dict) -> dict:
    """Per metric: relative change vs the reference in percent (and PSNR difference in dB).

    Positive ``improvement_pct`` always means better (sign flipped for lower-is-better metrics).
    """
    changes = {}
    for name in METRIC_NAMES:
        value, base = row.get(name), reference.get(name)
        if (
            not isinstance(value, float)
            or not isinstance(base, float)
            or base == 0
            or math.isnan(value * base)
        ):
            continue
        change = 100.0 * (value - base) / abs(base)
        changes[name] = {
            "change_pct": change,
            "improvement_pct": -change if name in LOWER_IS_BETTER else change,
        }
    if isinstance(row.get("psnr"), float) and isinstance(reference.get("psnr"), float):
        changes.setdefault("psnr", {})["delta_db"] = row["psnr"] - reference["psnr"]
    changes["mean_tokens_ratio"] = row["mean_tokens"] / reference["mean_tokens"]
    return changes


def groups_of(
    results: Sequence[ImageResult], subsets: dict[str, set[str]] | None = None
) -> dict[str, list[int]]:
    """Group name -> indices: ``all``, every domain (``domain:<name>``) and every given id subset."""
    groups = {"all": list(range(len(results)))}
    for domain in sorted({r.domain for r in results}):
        groups[f"domain:{domain}"] = [i for i, r in enumerate(results) if r.domain == domain]
    for name, ids in (subsets or {}).items():
        indices = [i for i, r in enumerate(results) if r.id in ids]
        if indices:
            groups[f"split:{name}"] = indices
    return groups


def recon_tables(
    results: Sequence[ImageResult],
    methods: Sequence[Method],
    size: int,
    lpips_available: bool,
    subsets: dict[str, set[str]] | None = None,
    policy=None,
) -> dict[str, dict[str, dict]]:
    """group -> method -> summary (+ ``vs_fixed16`` relative changes when fixed-16x is present).

    With ``policy`` (the adaptive run's), each group also gets :data:`GROUP_CALIBRATED`.
    """
    tables: dict[str, dict[str, dict]] = {}
    for group, indices in groups_of(results, subsets).items():
        group_results = [results[i] for i in indices]
        rows = {
            m.name: summarize(group_results, [m.ratios[i] for i in indices], size, lpips_available)
            for m in methods
        }
        if policy is not None:
            scores = [r.router_score() for r in group_results]
            in_group = RoutingPolicy.calibrate(
                scores, target_mean_tokens=tokens_for(16, size), image_size=size, base=policy
            )
            rows[GROUP_CALIBRATED] = summarize(
                group_results, [in_group.route(s) for s in scores], size, lpips_available
            )
            rows[GROUP_CALIBRATED]["policy"] = {"low": in_group.low, "high": in_group.high}
        if FIXED_REFERENCE in rows:
            for name, row in rows.items():
                if name != FIXED_REFERENCE:
                    row["vs_fixed16"] = relative_changes(row, rows[FIXED_REFERENCE])
        tables[group] = rows
    return tables
