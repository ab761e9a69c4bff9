"""Routing benchmark: how much of the oracle's headroom each router mode captures.

    python -m eval.bench_routing --dataset ../shared/data/devset \\
        --targets nested_vae/weights/default/route_targets.json

Heads are fitted on the TRAIN split of the targets (:func:`eval.fit_router_head.fit_head`, the
same code that fits the shipped head); every figure is on the HELD-OUT split. Modes:

* ``caption rule``: the hand-made :class:`router.CombinationRule` score (CAT's caption mode);
* ``caption head``: ridge head on the LLM's hidden states + rating/flags (caption only, usable
  for text-to-image generation);
* ``JPEG bpp``: the image-only fallback score;
* ``image head``: ridge head on :mod:`router.image_features` alone (reference);
* ``hybrid head``: caption + image features in one head;
* ``quality (measured)``: smallest ratio whose MEASURED LPIPS meets one target for all images,
  the target set so that mean tokens fit the budget (what ``cat-tokenize --quality`` does);
* ``quality (hybrid-predicted)``: the same on the hybrid head's predicted LPIPS;
* ``oracle``: the best allocation at the budget (:class:`eval.oracle.Frontier`).

Score modes are routed the way ``cat-tokenize --target-mean-tokens 16x`` routes a run: thresholds
calibrated on the run's own scores to the budget (fixed 16x's mean tokens), keeping the mode's
threshold gap (the rule: the default policy's; heads: the gap fitted with them).

Reported per mode, overall and per domain: Spearman of the score with the VAE's gain (32x -> 8x,
LPIPS and PSNR); mean LPIPS / PSNR / SSIM and tokens; the fraction of the oracle's headroom
captured (``(mode - fixed16) / (oracle - fixed16)``, per metric, each oracle optimised for that
metric); and the fewest mean tokens with which the mode matches fixed 16x's mean LPIPS (the
"token saving"; CAT reports -18 % on natural images). Writes eval/results/bench_routing.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from eval.fit_router_head import fit_head, route_levels
from eval.oracle import COARSE_FIRST, Frontier
from eval.report import REPO_ROOT, run_record, write_results
from eval.route_targets import load_route_targets
from eval.routing_data import METRICS, RoutingTable, load_routing_table
from router import RoutingPolicy, load_scorer

RESULTS = REPO_ROOT / "eval" / "results"
REFERENCE = COARSE_FIRST.index(16)


def _mean_quality(table: RoutingTable, rows: np.ndarray, level: np.ndarray) -> dict:
    picked = {m: table.quality[m][rows, level] for m in METRICS}
    return {
        "tokens": float(table.tokens[rows, level].mean()),
        **{m: float(v.mean()) for m, v in picked.items()},
    }


def score_routing(scores: np.ndarray, size: int, budget: float, gap: float) -> np.ndarray:
    """Levels (0 = 32x, 1 = 16x, 2 = 8x) for ``scores`` routed as ``cat-tokenize --target-mean-tokens``
    routes a run: ``RoutingPolicy.calibrate`` on the scores themselves, threshold gap ``gap`` kept,
    tokens counted for images of ``size``."""
    policy = RoutingPolicy.calibrate(
        scores, target_mean_tokens=budget, image_size=size, base=RoutingPolicy(0.0, gap)
    )
    return route_levels(scores, policy.low, policy.high)


def quality_target_routing(values: np.ndarray, tokens: np.ndarray, budget: float) -> np.ndarray:
    """Smallest-token level with ``values`` (LPIPS, lower better) <= one target, the target at the budget."""
    rows = np.arange(len(values))

    def levels_for(target: float) -> np.ndarray:
        meets = values <= target
        return np.where(meets.any(axis=1), meets.argmax(axis=1), len(COARSE_FIRST) - 1)

    candidates = np.unique(values)
    spent = np.array([tokens[rows, levels_for(t)].mean() for t in candidates])
    within = np.flatnonzero(spent <= budget + 1e-9)
    target = candidates[within[0]] if within.size else candidates[-1]  # the strictest that fits
    return levels_for(float(target))


def fewest_tokens_to_match(
    levels_at, tokens: np.ndarray, lpips: np.ndarray, reference: float
) -> float | None:
    """Fewest mean tokens at which a mode's mean LPIPS reaches ``reference`` (None: never).

    ``levels_at(budget)`` routes the images at a budget; budgets sweep all-32x .. all-8x.
    """
    rows, best = np.arange(len(tokens)), None
    for budget in np.linspace(tokens[:, 0].mean(), tokens[:, -1].mean(), 121):
        level = levels_at(budget)
        if lpips[rows, level].mean() <= reference + 1e-12:
            spent = float(tokens[rows, level].mean())
            best = spent if best is None else min(best, spent)
    return best


def _spearman(x, y) -> float:
    if len(set(np.round(x, 12))) < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


def evaluate(table: RoutingTable, heldout: str = "heldout") -> dict:
    rows = np.flatnonzero(table.splits == heldout)
    if rows.size == 0:
        raise ValueError(f"no {heldout!r} images in the targets")
    tokens, lpips = table.tokens[rows], table.quality["lpips"][rows]
    budget = float(tokens[:, REFERENCE].mean())
    fitted = {
        "caption": fit_head(table, "caption"),
        "image": _image_head(table),
        "hybrid": fit_head(table, "hybrid"),
    }
    heads = {kind: head for kind, (head, _) in fitted.items()}
    fits = {kind: report for kind, (_, report) in fitted.items()}
    predictions = {kind: head.predict(table.rows(kind)[rows]) for kind, head in heads.items()}
    default = RoutingPolicy()
    score_modes = {
        "caption rule": (table.rule_scores[rows], default.high - default.low),
        "JPEG bpp": (table.jpeg_scores[rows], default.high - default.low),
        "caption head": (heads["caption"].score(predictions["caption"]), _gap(heads["caption"])),
        "image head": (heads["image"].score(predictions["image"]), _gap(heads["image"])),
        "hybrid head": (heads["hybrid"].score(predictions["hybrid"]), _gap(heads["hybrid"])),
    }
    size = int(table.targets["size"])
    routers = {  # mode -> (budget -> level per held-out image)
        name: (lambda b, s=s, gap=gap: score_routing(s, size, b, gap))
        for name, (s, gap) in score_modes.items()
    }
    routers["quality (measured)"] = lambda b: quality_target_routing(lpips, tokens, b)
    routers["quality (hybrid-predicted)"] = lambda b: quality_target_routing(predictions["hybrid"], tokens, b)
    oracle = {
        m: Frontier(-table.quality[m][rows] if m == "lpips" else table.quality[m][rows], tokens)
        for m in METRICS
    }
    routers["oracle (LPIPS)"] = oracle["lpips"].allocate
    levels = {name: route(budget) for name, route in routers.items()}
    fixed_level = np.full(rows.size, REFERENCE)
    sub = table.subset(rows)
    groups = {"all": np.arange(rows.size)}
    groups.update({f"domain:{d}": np.flatnonzero(sub.domains == d) for d in sorted(set(sub.domains))})
    oracle_means = {
        m: _mean_quality(sub, np.arange(rows.size), oracle[m].allocate(budget))[m] for m in METRICS
    }
    fixed = _mean_quality(sub, np.arange(rows.size), fixed_level)
    results = {"budget_mean_tokens": budget, "heldout_images": int(rows.size), "fixed16": fixed,
               "oracle_per_metric": oracle_means, "fits": fits, "modes": {}}  # fmt: skip
    gains = {m: sub.gain(m) for m in ("lpips", "psnr")}
    for name, level in levels.items():
        entry = {"groups": {}}
        for group, members in groups.items():
            entry["groups"][group] = {
                "mode": _mean_quality(sub, members, level[members]),
                "fixed16": _mean_quality(sub, members, fixed_level[members]),
            }
        overall = entry["groups"]["all"]["mode"]
        entry["capture"] = {
            m: _capture(overall[m], fixed[m], oracle_means[m], lower_better=(m == "lpips")) for m in METRICS
        }
        if name in score_modes:
            scores = score_modes[name][0]
            entry["spearman"] = {
                group: {m: _spearman(scores[members], gains[m][members]) for m in gains}
                for group, members in groups.items()
            }
        if name == "oracle (LPIPS)":  # its frontier's exact answer, not a budget sweep
            entry["tokens_to_match_fixed16_lpips"] = oracle["lpips"].fewest_tokens(-fixed["lpips"])
        else:
            entry["tokens_to_match_fixed16_lpips"] = fewest_tokens_to_match(
                routers[name], tokens, lpips, fixed["lpips"]
            )
        results["modes"][name] = entry
    for entry in results["modes"].values():
        match = entry.get("tokens_to_match_fixed16_lpips")
        entry["token_saving_pct"] = None if match is None else 100.0 * (1 - match / budget)
    return results


def _gap(head) -> float:
    return float(head.policy["high"] - head.policy["low"])


def _capture(mode: float, fixed: float, oracle: float, lower_better: bool) -> float | None:
    headroom = (fixed - oracle) if lower_better else (oracle - fixed)
    if headroom <= 1e-12:
        return None
    won = (fixed - mode) if lower_better else (mode - fixed)
    return float(won / headroom)


def _image_head(table: RoutingTable):
    """A head on the image features alone: fitted like the others, with the caption block emptied."""
    return fit_head(replace(table, caption_rows=np.zeros((len(table.ids), 0))), "hybrid", split="train")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(value, digits: int = 3, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.0f} %" if pct else f"{value:.{digits}f}"


def render(results: dict) -> str:
    fixed, oracle = results["fixed16"], results["oracle_per_metric"]
    lines = [
        "# Routing benchmark (`python -m eval.bench_routing`)",
        "",
        f"- {results['run']['git']['commit'][:12] if results['run'].get('git') else ''} "
        f"{results['run'].get('time_utc', '')}; targets: {results['targets_file']} "
        f"(checkpoint {str(results['checkpoint'].get('weights_sha256'))[:12]})",
        f"- held-out images: {results['heldout_images']}; heads fitted on the train split "
        f"({results['fits']['hybrid']['train_images']} images); budget: fixed 16x's "
        f"{results['budget_mean_tokens']:.0f} mean tokens",
        f"- fixed 16x: LPIPS {fixed['lpips']:.4f}, PSNR {fixed['psnr']:.2f} dB, SSIM {fixed['ssim']:.4f}; "
        f"oracle headroom (each metric's own oracle): LPIPS {fixed['lpips'] - oracle['lpips']:+.4f} "
        f"({100 * (1 - oracle['lpips'] / fixed['lpips']):.1f} %), PSNR {oracle['psnr'] - fixed['psnr']:+.2f} dB",
        "",
        "| mode | tokens | LPIPS | PSNR | SSIM | captured LPIPS | captured PSNR | Spearman gain (LPIPS / PSNR) "
        "| tokens to match 16x LPIPS (saving) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["modes"].items():
        mode = entry["groups"]["all"]["mode"]
        rho = entry.get("spearman", {}).get("all", {})
        match = entry.get("tokens_to_match_fixed16_lpips")
        saving = entry.get("token_saving_pct")
        lines.append(
            f"| {name} | {mode['tokens']:.0f} | {mode['lpips']:.4f} | {mode['psnr']:.2f} | {mode['ssim']:.4f} "
            f"| {_f(entry['capture']['lpips'], pct=True)} | {_f(entry['capture']['psnr'], pct=True)} "
            f"| {_f(rho.get('lpips'), 2)} / {_f(rho.get('psnr'), 2)} "
            f"| {'never' if match is None else f'{match:.0f} ({saving:+.0f} %)'} |"
        )
    lines += [
        "",
        "## Per domain (global allocation; LPIPS of the mode vs fixed 16x, tokens, Spearman with the LPIPS gain)",
        "",
    ]
    domains = [g for g in next(iter(results["modes"].values()))["groups"] if g.startswith("domain:")]
    lines.append("| mode | " + " | ".join(d.split(":", 1)[1] for d in domains) + " |")
    lines.append("|---" * (1 + len(domains)) + "|")
    for name, entry in results["modes"].items():
        cells = []
        for domain in domains:
            group = entry["groups"][domain]
            rho = entry.get("spearman", {}).get(domain, {}).get("lpips")
            cells.append(
                f"{group['mode']['lpips']:.3f} vs {group['fixed16']['lpips']:.3f}, {group['mode']['tokens']:.0f} tok"
                + (f", rho {_f(rho, 2)}" if rho is not None else "")
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Heads (cross-validated on the train split)", ""]
    for kind, fit in results["fits"].items():
        lines.append(
            f"- {kind}: {fit['features']} features, alpha {fit['alpha']:.3g}, out-of-fold Spearman with the "
            f"LPIPS gain {fit['oof_spearman_gain_lpips']:.2f}, MAE of LPIPS at 32/16/8x "
            + " / ".join(f"{v:.3f}" for v in fit["oof_mae_lpips"])
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_routing", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--targets", required=True, help="route_targets.json (`cat-bench route-targets`)")
    parser.add_argument("--router-model", default="default")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS / "bench_routing"), help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    targets = load_route_targets(args.targets)
    scorer = load_scorer(args.router_model)
    table = load_routing_table(targets, args.dataset, scorer, args.cache_dir)
    results = evaluate(table)
    results.update(
        run=run_record("bench_routing", vars(args), "cpu", argv if argv is not None else sys.argv[1:]),
        targets_file=args.targets,
        checkpoint=targets.get("checkpoint", {}),
    )
    out = Path(args.out)
    write_results(out.parent, out.name, results, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
