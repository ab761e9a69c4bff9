"""Router quality on the devset: mean final score per domain, the fitted CombinationRule, held-out check.

    python -m eval.router_domains                 # score every devset caption (cached) and print the table
    python -m eval.router_domains --fit           # also fit flag calibration + lifts on the TRAIN split

The requirement (issue #4): on the devset captions, charts, text and faces must score above clip art
and photos on average. Everything is reported on the whole devset, the train split the rule was fitted
on, and the held-out split (nested_vae/weights/default/split.json), so no claim rests on data the rule
saw. Scoring goes through the SQLite score cache (``--cache``), so re-running the analysis is free;
the "before" rows read the previous prompt version's raw scores from the same cache when present.

What ``--fit`` fits (all by L2-regularised logistic regression, scipy L-BFGS, on the train split):

1. flag calibration: for each flag, "the image is in that flag's domain" (text -> text, faces -> face,
   charts -> chart) on the flag's raw log-odds: ``P_f = sigmoid(slope * logit(raw) + intercept)``;
2. lifts: "perception-sensitive domain" (text, face, chart vs clip art, photo) on the rating and the
   calibrated flags; lift_f = weight_f / weight_rating, so ``rating + sum lift_f * P_f`` orders
   images exactly like that classifier while staying in rating units.

Writes ``eval/results/router_domains.json``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.stats import rankdata

from cat_foundations.atomic import atomic_write_json
from cat_foundations.cache import find_cached
from router import load_scorer
from router.policy import RoutingPolicy, tokens_for
from router.scores import (
    FLAG_QUERIES,
    PROMPT_VERSION,
    CombinationRule,
    clean_caption,
    expected_rating,
    logit,
    make_score,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CAPTIONS = REPO.parent / "shared" / "data" / "devset" / "captions.jsonl"
DEFAULT_SPLIT = REPO / "nested_vae" / "weights" / "default" / "split.json"
DEFAULT_CACHE = find_cached("router-scores.sqlite", Path.is_file)
RESULTS = REPO / "eval" / "results"

SENSITIVE = ("chart", "text", "face")
PLAIN = ("clipart", "photo")
DOMAINS = (*SENSITIVE, *PLAIN)
FLAG_DOMAIN = {"text": "text", "faces": "face", "charts": "chart"}
# The rule before this fit (prompt cat-router-v1): raw flags, prior lifts.
BEFORE_VERSION = "cat-router-v1"
BEFORE_RULE = {"flag_lifts": {"text": 1.5, "faces": 1.0, "charts": 1.0}, "flag_calibration": {}}


def read_devset(captions_path: Path, split_path: Path) -> list[dict]:
    """Devset records with a ``split`` field: train / heldout (/ heldout_shared: shares a source file)."""
    split = json.loads(Path(split_path).read_text())
    train, heldout = set(split["train"]), set(split["heldout"])
    shared = set(split.get("heldout_sharing_a_source_file_with_train", []))
    records = []
    for line in Path(captions_path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if not record.get("caption"):
            continue
        image = record["image"]
        record["split"] = "train" if image in train else ("heldout" if image in heldout else "none")
        record["heldout_shares_source"] = image in shared
        records.append(record)
    return records


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1e-3) -> tuple[np.ndarray, float]:
    """Weights and intercept minimising mean log-loss + l2/2 * |w|^2 (intercept not penalised)."""
    x = np.asarray(features, dtype=float)
    y = np.asarray(labels, dtype=float)

    def loss(params):
        w, b = params[:-1], params[-1]
        z = x @ w + b
        # log(1 + exp(z)) - y z, computed stably
        value = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * np.dot(w, w)
        p = 1.0 / (1.0 + np.exp(-z))
        grad_w = x.T @ (p - y) / len(y) + l2 * w
        grad_b = np.mean(p - y)
        return value, np.append(grad_w, grad_b)

    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B")
    if not result.success:
        raise RuntimeError(f"logistic fit did not converge: {result.message}")
    return result.x[:-1], float(result.x[-1])


def fit_rule(raw: list[tuple[list[float], dict[str, float]]], domains: list[str]):
    """Fit a CombinationRule (see the module docstring) on raw scores and their domains."""
    domains = np.array(domains)
    calibration = {}
    for flag in FLAG_QUERIES:
        x = np.array([[logit(flags[flag])] for _, flags in raw])
        w, b = fit_logistic(x, domains == FLAG_DOMAIN[flag])
        calibration[flag] = (round(float(w[0]), 4), round(b, 4))
    partial = CombinationRule(flag_lifts={}, flag_calibration=calibration)
    features = np.array(
        [
            [expected_rating(dist), *(partial.calibrate_flags(flags)[f] for f in FLAG_QUERIES)]
            for dist, flags in raw
        ]
    )
    w, b = fit_logistic(features, np.isin(domains, SENSITIVE))
    if w[0] <= 0:
        raise RuntimeError(
            f"the rating's weight came out {w[0]:.3f} <= 0: the rating does not help separate the domains, "
            "so lifts in rating units are undefined"
        )
    lifts = {flag: round(float(w[i + 1] / w[0]), 3) for i, flag in enumerate(FLAG_QUERIES)}
    details = {
        "flag_calibration": calibration,
        "sensitive_classifier": {"weights": w.tolist(), "intercept": b},
    }
    return CombinationRule(flag_lifts=lifts, flag_calibration=calibration), details


def auc(values: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (probability a positive outranks a negative; ties count half)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(values)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summarize(records: list[dict], raw: list, rule) -> dict:
    """Per split: per-domain means of score/rating/calibrated flags, the order check, flag AUCs."""
    scores = [make_score(dist, flags, rule) for dist, flags in raw]
    subsets = {
        "all": [True] * len(records),
        "train": [r["split"] == "train" for r in records],
        "heldout": [r["split"] == "heldout" for r in records],
        "heldout_clean": [r["split"] == "heldout" and not r["heldout_shares_source"] for r in records],
    }
    out = {}
    for name, keep in subsets.items():
        idx = [i for i, k in enumerate(keep) if k]
        domains = np.array([records[i]["domain"] for i in idx])
        table = {}
        for domain in DOMAINS:
            members = [scores[i] for i, d in zip(idx, domains) if d == domain]
            if not members:
                continue
            table[domain] = {
                "n": len(members),
                "score": round(float(np.mean([s.score for s in members])), 3),
                "rating": round(float(np.mean([s.rating for s in members])), 3),
                **{
                    f"p_{f}": round(float(np.mean([s.flags[f] for s in members])), 3)
                    for f in members[0].flags
                },
            }
        sensitive_min = min(table[d]["score"] for d in SENSITIVE if d in table)
        plain_max = max(table[d]["score"] for d in PLAIN if d in table)
        final = np.array([scores[i].score for i in idx])
        out[name] = {
            "n": len(idx),
            "per_domain": table,
            "order_met": bool(sensitive_min > plain_max),
            "margin": round(sensitive_min - plain_max, 3),
            "auc_sensitive_vs_plain": round(auc(final, np.isin(domains, SENSITIVE)), 3),
            "flag_auc": {
                flag: round(auc(np.array([raw[i][1][flag] for i in idx]), domains == dom), 3)
                for flag, dom in FLAG_DOMAIN.items()
            },
        }
    return out


def cached_raw(cache_path: Path, model_id: str, prompt_version: str, captions: list[str]):
    """Raw scores of ``captions`` stored under another prompt version, or None if any is missing."""
    if not Path(cache_path).is_file():
        return None
    db = sqlite3.connect(cache_path)
    raw = []
    for caption in captions:
        row = db.execute(
            "SELECT raw FROM scores WHERE model_id=? AND prompt_version=? AND caption=?",
            (model_id, prompt_version, caption),
        ).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        raw.append((data["distribution"], data["flags"]))
    return raw


def print_table(title: str, summary: dict) -> None:
    print(f"\n{title}")
    print(f"  {'split':<14} " + " ".join(f"{d:>8}" for d in DOMAINS) + "   order met (margin)  AUC")
    for name, block in summary.items():
        cells = " ".join(f"{block['per_domain'][d]['score']:>8.2f}" for d in DOMAINS)
        print(
            f"  {name + ' (' + str(block['n']) + ')':<14} {cells}   {str(block['order_met']):>5} "
            f"({block['margin']:+.2f})     {block['auc_sensitive_vs_plain']:.2f}"
        )
    flags = summary["heldout"]["flag_auc"]
    print("  held-out flag AUC (flag vs its domain): " + ", ".join(f"{k} {v:.2f}" for k, v in flags.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS)
    parser.add_argument("--split", type=Path, default=DEFAULT_SPLIT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="SQLite score cache")
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fit", action="store_true", help="fit calibration + lifts on the train split")
    parser.add_argument("--out", type=Path, default=RESULTS / "router_domains.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)

    records = read_devset(args.captions, args.split)
    captions = [clean_caption(r["caption"]) for r in records]
    scorer = load_scorer(args.model, cache_path=args.cache, batch_size=args.batch_size)
    raw = scorer.score_raw(captions)
    print(f"{len(captions)} captions: {scorer.hits} from the cache, {scorer.misses} scored")

    result = {
        "model": args.model,
        "model_id": scorer.model_id,
        "prompt_version": PROMPT_VERSION,
        "captions_file": str(args.captions),
        "split_file": str(args.split.relative_to(REPO))
        if args.split.is_relative_to(REPO)
        else str(args.split),
        "command": "python -m eval.router_domains " + " ".join(sys.argv[1:] if argv is None else argv),
        "rules": {},
    }
    before = cached_raw(args.cache, scorer.model_id, BEFORE_VERSION, captions)
    if before is not None:
        rule = CombinationRule.from_dict(BEFORE_RULE)
        result["rules"]["before"] = {
            "prompt_version": BEFORE_VERSION,
            "rule": rule.to_dict(),
            "summary": summarize(records, before, rule),
        }
        print_table(
            f"before: prompt {BEFORE_VERSION}, raw flags, prior lifts", result["rules"]["before"]["summary"]
        )

    prior = CombinationRule(flag_lifts=dict(BEFORE_RULE["flag_lifts"]), flag_calibration={})
    result["rules"]["prior_uncalibrated"] = {
        "rule": prior.to_dict(),
        "summary": summarize(records, raw, prior),
    }
    print_table(
        f"prompt {PROMPT_VERSION}, raw flags, prior lifts", result["rules"]["prior_uncalibrated"]["summary"]
    )

    default = CombinationRule()
    result["rules"]["default"] = {"rule": default.to_dict(), "summary": summarize(records, raw, default)}
    print_table(
        f"prompt {PROMPT_VERSION}, CombinationRule() as shipped", result["rules"]["default"]["summary"]
    )

    if args.fit:
        result["rules"]["fitted_on_train"] = fit_section(records, raw)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result, indent=1)
    print(f"\nwrote {args.out}")
    return 0


def fit_section(records: list[dict], raw: list) -> dict:
    """``--fit``: the rule fitted on the train split, its summary and the fixed-16x thresholds on train."""
    train = [i for i, r in enumerate(records) if r["split"] == "train"]
    fitted, details = fit_rule([raw[i] for i in train], [records[i]["domain"] for i in train])
    section = {
        "rule": fitted.to_dict(),
        "fit": {"captions": len(train), **details},
        "summary": summarize(records, raw, fitted),
    }
    print_table(f"prompt {PROMPT_VERSION}, rule fitted on train", section["summary"])
    print(f"  fitted rule: {json.dumps(fitted.to_dict())}")
    train_scores = [make_final(raw[i], fitted) for i in train]
    policy = RoutingPolicy.calibrate(train_scores, target_mean_tokens=tokens_for(16, 256), image_size=256)
    section["policy_fixed16_budget_on_train"] = {
        "low": policy.low,
        "high": policy.high,
    }
    print(f"  thresholds for the fixed-16x budget on train: low={policy.low:.3f} high={policy.high:.3f}")
    return section


def make_final(raw_item, rule) -> float:
    dist, flags = raw_item
    return rule.combine(expected_rating(dist), flags)


if __name__ == "__main__":
    raise SystemExit(main())
