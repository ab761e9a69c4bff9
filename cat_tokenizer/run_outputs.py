"""The end-of-run files of a ``cat-tokenize`` run, written by rank 0 from the committed shards.

manifest.jsonl, errors.jsonl, summary.json (+ the summary on stderr), index.parquet and
latents_stats.json: every one is rebuilt from what the shards hold, so it can never disagree
with them, and written atomically. Folder runs and sharded-input runs both end here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cat_foundations.atomic import atomic_write_json, write_jsonl
from cat_foundations.cli import FatalError
from cat_tokenizer import store
from cat_tokenizer.cli_summary import format_summary, log, summarize
from cat_tokenizer.index import write_index
from cat_tokenizer.latent_stats import LatentStats

LATENT_STATS = "latents_stats.json"


@dataclass
class RunOutputs:
    """What the shards say about the whole run (every rank, every resumed attempt)."""

    records: list[dict]
    origins: list[dict]  # provenance per record (router, VAE), same order
    errors: list[dict]
    stats: LatentStats
    skipped_without_caption: int
    scaling_factor: float


def write_run_outputs(
    out_dir: Path, run: RunOutputs, process_stats: list[dict], wall_s: float, quiet: bool
) -> None:
    """Write the five end-of-run files (see the module docstring)."""
    order = sorted(range(len(run.records)), key=lambda i: run.records[i]["id"])
    records = [run.records[i] for i in order]
    ids = Counter(r["id"] for r in records)
    duplicated = sorted(k for k, n in ids.items() if n > 1)
    if duplicated:
        raise FatalError(
            f"shards in {out_dir} hold duplicate images (e.g. {duplicated[0]}); the folder mixes runs"
        )
    store.write_jsonl(out_dir / store.MANIFEST, records)
    write_jsonl(out_dir / store.ERRORS, run.errors)
    write_index(out_dir, [(run.records[i], run.origins[i]) for i in order])
    atomic_write_json(out_dir / LATENT_STATS, run.stats.summary(run.scaling_factor))
    summary = summarize(records, run.errors, run.skipped_without_caption, wall_s, process_stats)
    atomic_write_json(out_dir / store.SUMMARY, summary)
    log(format_summary(summary), quiet)
