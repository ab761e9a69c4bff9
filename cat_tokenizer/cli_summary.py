"""The end-of-run summary of ``cat-tokenize``: the numbers (summary.json) and their text form."""

from __future__ import annotations

import sys
from collections import Counter

from cat_foundations.ratios import RATIOS, tokens_for
from cat_tokenizer.quality_routing import SOURCE as QUALITY_SOURCE
from cat_tokenizer.quality_routing import cost_summary


def log(message: str, quiet: bool) -> None:
    """A progress/summary line on stderr, unless ``--quiet``."""
    if not quiet:
        print(message, file=sys.stderr)


def quality_summary(records: list[dict], process_stats: list[dict]) -> dict | None:
    """``--quality`` runs: the target, how many images missed it, mean tokens, and the cost vs fixed 16x.

    The counts cover every image in the output (a resumed run's too); ``cost`` covers the images
    measured in this run (see :func:`cat_tokenizer.quality_routing.cost_summary`).
    """
    measured = [r for r in records if r["score_source"] == QUALITY_SOURCE]
    if not measured:
        return None
    targets = sorted({r["extra"]["quality"]["target"] for r in measured})
    missed = [r["id"] for r in measured if not r["extra"]["quality"]["met"]]
    return {
        "target": targets[0] if len(targets) == 1 else targets,
        "images": len(measured),
        "missed": len(missed),
        "missed_ids": missed,
        "mean_tokens": sum(r["tokens"] for r in measured) / len(measured),
        "cost": cost_summary(process_stats),
    }


def summarize(
    records: list[dict], errors: list[dict], skipped: int, wall_s: float, process_stats: list[dict]
) -> dict:
    """The end-of-run numbers: counts, tokens per ratio, mean tokens vs fixed 16x, speed, time split.

    ``process_stats``: per process, images done this run and seconds spent in setup (model
    loading), routing (``router_s``: caption LLM + image fallback) and the VAE encoder.
    """
    per_ratio = {}
    for ratio in RATIOS:
        chosen = [r for r in records if r["ratio"] == ratio]
        per_ratio[str(ratio)] = {"images": len(chosen), "tokens": sum(r["tokens"] for r in chosen)}
    total_tokens = sum(r["tokens"] for r in records)
    fixed16 = sum(tokens_for(16, tuple(r["size"])) for r in records)
    sources = Counter(r["score_source"] for r in records)
    done_this_run = sum(stats["done"] for stats in process_stats)
    quality = quality_summary(records, process_stats)
    return {
        "images_done": len(records),
        "images_done_this_run": done_this_run,
        "failed": len(errors),
        "skipped_without_caption": skipped,
        "per_ratio": per_ratio,
        "score_sources": dict(sources),
        "mean_tokens": total_tokens / len(records) if records else 0.0,
        "mean_tokens_fixed16": fixed16 / len(records) if records else 0.0,
        "token_ratio_vs_fixed16": total_tokens / fixed16 if fixed16 else None,
        "wall_s": wall_s,
        "images_per_s": done_this_run / wall_s if wall_s > 0 else 0.0,
        "processes": process_stats,
        **({"quality": quality} if quality is not None else {}),
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"done {summary['images_done']} ({summary['images_done_this_run']} this run), "
        f"failed {summary['failed']}, skipped without caption {summary['skipped_without_caption']}",
        "ratio  images  tokens",
    ]
    for ratio, row in summary["per_ratio"].items():
        lines.append(f"{ratio + 'x':>5}  {row['images']:>6}  {row['tokens']:>8}")
    vs = summary["token_ratio_vs_fixed16"]
    lines.append(
        f"mean tokens/image {summary['mean_tokens']:.1f} vs fixed 16x {summary['mean_tokens_fixed16']:.1f}"
        + (f" ({vs:.2f}x)" if vs is not None else "")
    )
    main_process = summary["processes"][0]
    lines.append(
        f"wall {summary['wall_s']:.1f} s, {summary['images_per_s']:.2f} images/s "
        f"(process 0: setup {main_process['setup_s']:.1f} s, router {main_process['router_s']:.1f} s, "
        f"VAE encode {main_process['vae_encode_s']:.1f} s)"
    )
    quality = summary.get("quality")
    if quality is not None:
        cost = quality["cost"] or {}
        ratio = cost.get("cost_vs_fixed16")
        lines.append(
            f"quality {quality['target']}: missed by {quality['missed']} of {quality['images']} images"
            + (f"; VAE encode+decode cost {ratio:.1f}x a fixed-16x encode" if ratio is not None else "")
        )
    return "\n".join(lines)
