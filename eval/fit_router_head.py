"""Fit a router head to what the VAE gains: ``python -m eval.fit_router_head``.

    python -m eval.fit_router_head --dataset ../shared/data/devset \\
        --targets nested_vae/weights/default/route_targets.json --kind hybrid \\
        --out nested_vae/weights/default/router_head

Ridge regression (scikit-learn ``RidgeCV``, regularisation chosen by efficient leave-one-out
cross-validation) of every image's measured LPIPS at 32x, 16x and 8x on the head's features
(:mod:`router.head`), on the TRAIN split only. Out-of-fold predictions (5-fold) of the train
split then set the score range and the routing thresholds, so neither is fitted on predictions
the model saw its own targets for. The held-out split is never read here: it is for reporting
(:mod:`eval.bench_routing`).

Thresholds: among all (low, high) pairs of out-of-fold scores, the pair with the best mean LPIPS
whose mean tokens stay within fixed 16x's; ``cat-tokenize`` keeps their gap and shifts both to
meet a run's budget (``RoutingPolicy.calibrate``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from cat_foundations.ratios import tokens_for
from eval.oracle import COARSE_FIRST
from eval.route_targets import load_route_targets
from eval.routing_data import RoutingTable, load_routing_table
from router import load_scorer
from router.head import RouterHead
from router.scores import PROMPT_VERSION

ALPHAS = np.logspace(-2, 6, 33)
FOLDS = 5
THRESHOLD_CANDIDATES = 48
CAPTION_BLOCK_WEIGHTS = (0.01, 0.03, 0.1, 0.3, 1.0)


def ridge_fit(rows: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None):
    """Standardise, weight the columns, ridge with LOO-chosen alpha; returns (mean, scale, ridge).

    A column weight below 1 regularises that column more (ridge penalises its coefficient as if
    the column were smaller): the hybrid head gives the ~3,600 caption columns one weight and the
    six image columns another. ``(x - mean) / scale`` is the ridge's input.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(rows)
    weights = np.ones(rows.shape[1]) if weights is None else weights
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0) / weights
    ridge = RidgeCV(alphas=ALPHAS).fit((rows - scaler.mean_) / scale, targets)
    return scaler.mean_, scale, ridge


def out_of_fold(rows: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None, seed: int = 0):
    """5-fold out-of-fold predictions, each fold's model fitted (alpha included) without it."""
    from sklearn.model_selection import KFold

    predicted = np.zeros_like(targets)
    for train, test in KFold(FOLDS, shuffle=True, random_state=seed).split(rows):
        mean, scale, ridge = ridge_fit(rows[train], targets[train], weights)
        predicted[test] = ridge.predict((rows[test] - mean) / scale)
    return predicted


def _gain_spearman(predicted: np.ndarray, lpips: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(predicted[:, 0] - predicted[:, 2], lpips[:, 0] - lpips[:, 2]).statistic)


def column_weights(table: RoutingTable, kind: str, rows, lpips, seed: int) -> tuple[np.ndarray, float]:
    """Per-column weights: all 1 for one block; for ``hybrid`` the caption block's weight (vs 1 for
    the image block) with the best out-of-fold Spearman of the predicted gain."""
    if kind != "hybrid" or table.caption_rows.shape[1] == 0:
        return np.ones(rows.shape[1]), 1.0
    captions = table.caption_rows.shape[1]
    best = None
    for weight in CAPTION_BLOCK_WEIGHTS:
        weights = np.concatenate([np.full(captions, weight), np.ones(rows.shape[1] - captions)])
        rho = _gain_spearman(out_of_fold(rows, lpips, weights, seed), lpips)
        if best is None or rho > best[0]:
            best = (rho, weights, weight)
    return best[1], best[2]


def route_levels(scores: np.ndarray, low: float, high: float) -> np.ndarray:
    """Level per image (0 = 32x, 1 = 16x, 2 = 8x), as :meth:`RoutingPolicy.route` decides."""
    return (scores >= low).astype(int) + (scores >= high).astype(int)


def best_thresholds(
    scores: np.ndarray, lpips: np.ndarray, tokens: np.ndarray, budget: float
) -> tuple[float, float]:
    """(low, high) with the lowest mean LPIPS whose mean tokens are <= ``budget``."""
    cuts = np.unique(np.quantile(scores, np.linspace(0, 1, THRESHOLD_CANDIDATES)))
    cuts = np.concatenate([[scores.min() - 1.0], cuts + 1e-9, [scores.max() + 1.0]])
    rows, best, best_pair = np.arange(len(scores)), np.inf, (float(cuts[0]), float(cuts[-1]))
    for i, low in enumerate(cuts):
        for high in cuts[i:]:
            level = route_levels(scores, low, high)
            if tokens[rows, level].mean() <= budget + 1e-9 and lpips[rows, level].mean() < best:
                best, best_pair = float(lpips[rows, level].mean()), (float(low), float(high))
    return best_pair


def fit_head(table: RoutingTable, kind: str, split: str = "train", seed: int = 0) -> tuple[RouterHead, dict]:
    """Fit a ``caption`` / ``hybrid`` head on ``split``; returns it and its cross-validated report."""
    chosen = table.splits == split
    if chosen.sum() < 2 * FOLDS:
        raise ValueError(
            f"split {split!r} has {int(chosen.sum())} images; fitting needs at least {2 * FOLDS}"
        )
    rows, lpips, tokens = table.rows(kind)[chosen], table.quality["lpips"][chosen], table.tokens[chosen]
    weights, caption_weight = column_weights(table, kind, rows, lpips, seed)
    mean, scale, ridge = ridge_fit(rows, lpips, weights)
    oof = out_of_fold(rows, lpips, weights, seed)
    gain = oof[:, 0] - oof[:, 2]
    score_range = (float(np.percentile(gain, 2)), float(np.percentile(gain, 98)))
    head = RouterHead(
        kind=kind,
        mean=mean.astype(np.float64),
        scale=scale.astype(np.float64),
        coef=ridge.coef_.T.astype(np.float64),
        intercept=np.asarray(ridge.intercept_, dtype=np.float64),
        score_range=score_range,
    )
    oof_scores = head.score(oof)
    budget = float(tokens[:, COARSE_FIRST.index(16)].mean())
    low, high = best_thresholds(oof_scores, lpips, tokens, budget)
    head.policy = {"low": low, "high": high}
    report = {
        "kind": kind,
        "train_images": int(chosen.sum()),
        "features": int(rows.shape[1]),
        "alpha": float(ridge.alpha_),
        "caption_block_weight": caption_weight,
        "oof_spearman_gain_lpips": _gain_spearman(oof, lpips),
        "oof_mae_lpips": [float(v) for v in np.abs(oof - lpips).mean(axis=0)],
        "policy": head.policy,
    }
    return head, report


def provenance(table: RoutingTable, scorer, targets_path: str, report: dict) -> dict:
    checkpoint = table.targets.get("checkpoint", {})
    return {
        "vae_weights_sha256": checkpoint.get("weights_sha256"),
        "vae_path": checkpoint.get("path"),
        "router_model_id": scorer.model_id,
        "router_numerics": scorer.numerics,
        "prompt_version": PROMPT_VERSION,
        "image_side": int(table.targets["size"]),
        "targets": str(targets_path),
        "fixed16_tokens_at_side": tokens_for(16, int(table.targets["size"])),
        "cross_validation": report,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.fit_router_head", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dataset", required=True, help="the dataset the targets were measured on")
    parser.add_argument("--targets", required=True, help="route_targets.json from `cat-bench route-targets`")
    parser.add_argument("--kind", choices=("caption", "hybrid"), default="hybrid")
    parser.add_argument(
        "--out", required=True, help="directory for router_head.json + router_head.safetensors"
    )
    parser.add_argument("--router-model", default="default")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    targets = load_route_targets(args.targets)
    scorer = load_scorer(args.router_model)
    table = load_routing_table(targets, args.dataset, scorer, args.cache_dir)
    head, report = fit_head(table, args.kind)
    head.fitted_to = provenance(table, scorer, args.targets, report)
    head.save(args.out)
    print(f"{args.kind} head {head.digest} -> {args.out}: {report}")
    return 0


__all__ = ["best_thresholds", "fit_head", "main", "out_of_fold", "ridge_fit", "route_levels"]

if __name__ == "__main__":
    sys.exit(main())
