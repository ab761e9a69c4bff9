"""`cat-bench router`: does the caption score predict how hard an image is to reconstruct?

Oracle, from the per-image reconstructions (no router involved):

* **difficulty** = PSNR(8x) - PSNR(32x) in dB: what an image loses when compressed 16x more
  tokens-wise. (LPIPS would be the first choice; it is unavailable offline, so PSNR is used
  and the EfficientNet feature distance gives a second, perceptual view.)
* **oracle ratio** = the coarsest ratio (fewest tokens) whose reconstruction meets the quality
  bar: PSNR within ``bar_db`` of the 8x reconstruction (or, with ``bar_psnr``, at least that
  many dB). 8x always qualifies.

Predictors compared: the caption LLM's final score (and its raw rating, before the flag lifts),
the JPEG bits-per-pixel score (image-only baseline), and a seeded random score. Reported:
Spearman correlation with the difficulty (overall and per domain), and routing accuracy against
the oracle ratios -- exact agreement and "too coarse" (quality-bar misses) -- for the given policy,
for thresholds fitted to the oracle (``RoutingPolicy.calibrate(oracle_ratios=...)``; in-sample,
and on a held-out split when one is given), for random routing with the LLM's ratio mix, and for
the best single fixed ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

from cat_foundations.ratios import RATIOS, tokens_for
from eval.engine import ImageResult
from router import RoutingPolicy

RATIOS_COARSE_FIRST = (32, 16, 8)


def oracle_difficulty(result: ImageResult, metric: str = "psnr") -> float:
    """Quality lost from 8x to 32x: PSNR drop in dB (``psnr``) or distance increase (``effnet_dist``)."""
    fine, coarse = result.metrics[8].get(metric), result.metrics[32].get(metric)
    if fine is None or coarse is None:
        return math.nan
    return fine - coarse if metric in ("psnr", "ssim") else coarse - fine


def oracle_ratio(result: ImageResult, bar_db: float = 1.0, bar_psnr: float | None = None) -> int:
    """Coarsest ratio meeting the bar (see the module docstring); 8 when none coarser does."""
    reference = result.metrics[8]["psnr"]
    for ratio in RATIOS_COARSE_FIRST:
        psnr = result.metrics[ratio]["psnr"]
        meets = psnr >= bar_psnr if bar_psnr is not None else reference - psnr <= bar_db
        if meets:
            return ratio
    return 8


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman rho and p-value over the finite pairs (NaN with fewer than 3 or no spread)."""
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return {"rho": math.nan, "p": math.nan, "n": len(pairs)}
    result = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    return {"rho": float(result.statistic), "p": float(result.pvalue), "n": len(pairs)}


def routing_scores(predicted: Sequence[int], oracle: Sequence[int], size: int) -> dict:
    """Exact agreement, too-coarse and too-fine rates, and mean tokens of a routing."""
    predicted, oracle = np.asarray(predicted), np.asarray(oracle)
    return {
        "accuracy": float(np.mean(predicted == oracle)),
        "too_coarse": float(np.mean(predicted > oracle)),
        "too_fine": float(np.mean(predicted < oracle)),
        "mean_tokens": float(np.mean([tokens_for(int(r), size) for r in predicted])),
        "n": int(predicted.size),
    }


def _correlations(results: Sequence[ImageResult], predictors: dict, difficulty, difficulty_effnet) -> dict:
    """Spearman of every predictor with the oracle difficulty: overall and per domain."""
    correlations = {"all": {}}
    for name, values in predictors.items():
        correlations["all"][name] = {
            "vs_psnr_drop": spearman(values, difficulty),
            "vs_effnet_increase": spearman(values, difficulty_effnet),
        }
    for domain in sorted({r.domain for r in results}):
        idx = [i for i, r in enumerate(results) if r.domain == domain]
        correlations[f"domain:{domain}"] = {
            name: {"vs_psnr_drop": spearman([values[i] for i in idx], [difficulty[i] for i in idx])}
            for name, values in predictors.items()
        }
    return correlations


def _oracle_fitted(results, name: str, scores, oracle, size: int, heldout_ids, routing: dict) -> dict:
    """Thresholds fitted to the oracle (in-sample, and train -> held-out when a split is given)."""
    fit = RoutingPolicy.calibrate(scores, oracle_ratios=oracle)
    routing[f"{name} (oracle-fitted, in-sample)"] = routing_scores(
        [fit.route(s) for s in scores], oracle, size
    )
    if heldout_ids:
        train = [i for i, r in enumerate(results) if r.id not in heldout_ids]
        test = [i for i, r in enumerate(results) if r.id in heldout_ids]
        if train and test:
            held = RoutingPolicy.calibrate(
                [scores[i] for i in train], oracle_ratios=[oracle[i] for i in train]
            )
            routing[f"{name} (oracle-fitted on train, held-out split)"] = routing_scores(
                [held.route(scores[i]) for i in test], [oracle[i] for i in test], size
            )
    return {"low": fit.low, "high": fit.high}


def _routing(results, policy, oracle, size: int, heldout_ids, rng) -> tuple[dict, dict, list, list]:
    """Routing accuracy rows, oracle-fitted thresholds, the routing scores and the routed ratios."""
    # Routing: images with a caption score use it; the rest fall back to the JPEG score, as in use.
    route_scores = [r.router_score() for r in results]
    jpeg_scores = [r.jpeg_score for r in results]
    routed = [policy.route(s) for s in route_scores]
    routing = {
        "router (given policy)": routing_scores(routed, oracle, size),
        "jpeg_bpp (given policy)": routing_scores([policy.route(s) for s in jpeg_scores], oracle, size),
        "random (router's ratio mix)": routing_scores(rng.permutation(routed).tolist(), oracle, size),
    }
    best_fixed = max(RATIOS, key=lambda r: sum(o == r for o in oracle))
    routing[f"fixed-{best_fixed}x (most common oracle ratio)"] = routing_scores(
        [best_fixed] * len(oracle), oracle, size
    )
    fitted = {
        name: _oracle_fitted(results, name, scores, oracle, size, heldout_ids, routing)
        for name, scores in (("router", route_scores), ("jpeg_bpp", jpeg_scores))
    }
    return routing, fitted, route_scores, routed


def router_quality(
    results: Sequence[ImageResult],
    policy,
    size: int,
    bar_db: float = 1.0,
    bar_psnr: float | None = None,
    heldout_ids: set[str] | None = None,
    seed: int = 0,
) -> dict:
    """The router report (see the module docstring) as a JSON-ready dict, plus per-image rows."""
    rng = np.random.default_rng(seed)
    difficulty = [oracle_difficulty(r) for r in results]
    difficulty_effnet = [oracle_difficulty(r, "effnet_dist") for r in results]
    oracle = [oracle_ratio(r, bar_db, bar_psnr) for r in results]
    llm = [r.caption_score["score"] if r.caption_score else math.nan for r in results]
    rating = [r.caption_score["rating"] if r.caption_score else math.nan for r in results]
    predictors = {
        "caption_llm_score": llm,
        "caption_llm_rating": rating,
        "jpeg_bpp": [r.jpeg_bpp for r in results],
        "random": rng.uniform(1, 9, len(results)).tolist(),
    }
    correlations = _correlations(results, predictors, difficulty, difficulty_effnet)
    routing, fitted, route_scores, routed = _routing(results, policy, oracle, size, heldout_ids, rng)
    per_image = [
        {
            "id": r.id,
            "domain": r.domain,
            "difficulty_psnr_db": d,
            "difficulty_effnet": de,
            "oracle_ratio": o,
            "router_score": s,
            "caption_llm_score": None if math.isnan(lm) else lm,
            "jpeg_bpp": r.jpeg_bpp,
            "routed_ratio": rt,
        }
        for r, d, de, o, s, lm, rt in zip(
            results, difficulty, difficulty_effnet, oracle, route_scores, llm, routed
        )
    ]
    counts = {str(r): int(sum(o == r for o in oracle)) for r in RATIOS}
    return {
        "quality_bar": {"psnr_within_db_of_8x": bar_db}
        if bar_psnr is None
        else {"psnr_at_least_db": bar_psnr},
        "oracle_ratio_counts": counts,
        "captioned_images": int(sum(r.caption_score is not None for r in results)),
        "spearman": correlations,
        "routing": routing,
        "oracle_fitted_thresholds": fitted,
        "per_image": per_image,
    }
