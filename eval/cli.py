"""`cat-bench`: reconstruction, router-quality and speed benchmarks.

    cat-bench recon  --dataset ../shared/data/devset --ratios 8,16,32,auto --out runs/bench
    cat-bench router --dataset ../shared/data/devset --out runs/bench
    cat-bench speed  --dataset ../shared/data/devset --resolutions 256,512 --out runs/bench

Every command merges its section into ``<out>/results.json`` (with versions, config, git commit
and device) and rewrites ``<out>/report.md`` from all sections present, with PNG plots beside it.
Per-image results are cached (``--cache-dir``), so a killed run continues where it stopped and
``recon`` followed by ``router`` measures each image once.

Exit codes (:mod:`cat_foundations.cli`, the same for every command): 0 done, 2 partial (headroom:
some images failed), 1 fatal (bad arguments, a missing dataset or checkpoint, ...) as one line on
stderr. Files: :mod:`eval.cli_args` (parser -> the typed settings of :mod:`eval.cli_settings`; no
``Namespace`` gets past it), :mod:`eval.cli_report` (results.json + report.md), this module
(loading + commands).
"""

from __future__ import annotations

import itertools
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from cat_foundations.cli import EXIT_OK, FatalError, run_cli
from cat_foundations.images import pil_to_tensor, tensor_to_pil
from cat_foundations.ratios import RATIOS
from eval import datasets as eval_datasets
from eval.cli_args import build_parser, parse_settings
from eval.cli_report import render_report, save_section
from eval.cli_settings import (
    BenchSettings,
    CommandSettings,
    PrepareSettings,
    ReconSettings,
    RouterSettings,
    SpeedSettings,
)
from eval.datasets import heldout_ids, read_split_file
from eval.engine import EvalSettings, Measurers, default_cache_dir, evaluate_dataset, load_vae, reconstruct
from eval.headroom import cmd_headroom
from eval.metrics import FIDUnavailableError, load_inception
from eval.recon import ADAPTIVE, CALIBRATED, FIXED_REFERENCE, build_methods, fixed_name, recon_tables
from eval.report import (
    headline_table,
    plot_domain_bars,
    plot_rate_distortion,
    plot_reconstruction_grid,
    plot_score_vs_oracle,
    recon_markdown_table,
    run_record,
)
from eval.route_targets import cmd_route_targets
from eval.router_quality import router_quality
from eval.speed import speed_markdown, speed_rows
from router import RoutingPolicy, load_scorer

# load_vae, read_split_file and heldout_ids live in eval.engine / eval.datasets; kept importable here.
__all__ = ["build_parser", "heldout_ids", "load_vae", "main", "read_split_file", "render_report"]


# ---- loading -------------------------------------------------------------------------------


def load_router(spec: str, backend: str, cache_dir: str | None = None):
    """The caption scorer, with the router's SQLite score cache under the benchmark cache dir."""
    if spec == "none":
        return None
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return load_scorer(spec, backend=backend, cache_path=root / "router-scores.sqlite")


def load_policy(path: str | None):
    return RoutingPolicy.load(path) if path else RoutingPolicy()


def _samples(settings: BenchSettings, limit: int | None = None) -> Iterable:
    data, run = settings.data, settings.run
    samples = eval_datasets.iter_samples(
        data.dataset,
        limit=limit if limit is not None else data.limit,
        hf_id=data.hf_id,
        config=data.hf_config,
        split=data.split,
        image_column=data.image_column,
        caption_column=data.caption_column,
        data_files=data.data_files,
    )
    if run.shuffle_seed is not None:
        samples = list(samples)
        random.Random(run.shuffle_seed).shuffle(samples)
    if run.shard is None:
        return samples
    index, count = run.shard
    return (sample for position, sample in enumerate(samples) if position % count == index)


def _count(settings: BenchSettings) -> int | None:
    """Number of samples for the progress bar, when it is cheap to know (local sources)."""
    data = settings.data
    source = eval_datasets.resolve_source(data.dataset, hf_id=data.hf_id, data_files=data.data_files)
    if isinstance(source, eval_datasets.HubDatasetSpec):
        return data.limit
    return sum(1 for _ in _samples(settings))


def _run_record(settings: BenchSettings) -> dict:
    """results.json's provenance block: the command line and every parsed option, as parsed."""
    provenance = settings.provenance
    return run_record(settings.command, dict(provenance.config), settings.run.device, list(provenance.argv))


# ---- commands ------------------------------------------------------------------------------


def _evaluate(settings: ReconSettings | RouterSettings, ratios, keep_per_domain: int):
    models, run, metrics = settings.models, settings.run, settings.metrics
    vae = load_vae(models.vae, run.device, run.seed)
    scorer = load_router(models.router, models.router_backend, run.cache_dir)
    inception, fid_status = None, "skipped (--no-fid)"
    if metrics.fid:
        try:
            inception = load_inception(metrics.inception, run.device)
            fid_status = (
                f"pt_inception-2015-12-05 via torchmetrics FrechetInceptionDistance ({inception.source})"
            )
        except FIDUnavailableError as error:
            fid_status = f"unavailable: {error}"
    config = EvalSettings(
        size=settings.data.size,
        ratios=tuple(ratios),
        batch_size=run.batch_size,
        device=run.device,
        fid=inception is not None,
        effnet=metrics.effnet,
        lpips=metrics.lpips,
    )
    measurers = Measurers(config, inception)
    started = time.perf_counter()
    results, kept = evaluate_dataset(
        _samples(settings),
        vae,
        config,
        measurers,
        scorer=scorer,
        cache_dir=run.cache_dir,
        total=_count(settings),
        keep_images_per_domain=keep_per_domain,
        progress=run.progress,
        cached_only=run.cached_only,
    )
    seconds = time.perf_counter() - started
    return vae, results, kept, measurers, fid_status, seconds, scorer


def _scorer_name(scorer) -> str:
    return (
        "none (JPEG bpp fallback for every image)"
        if scorer is None
        else getattr(scorer, "model_id", type(scorer).__name__)
    )


def cmd_recon(settings: ReconSettings) -> dict:
    fixed, adaptive, size = list(settings.fixed_ratios), settings.adaptive, settings.data.size
    ratios = RATIOS if adaptive else tuple(sorted(set(fixed)))
    vae, results, kept, measurers, fid_status, seconds, scorer = _evaluate(
        settings, ratios, settings.grid_per_domain
    )
    if settings.run.shard is not None:
        return _shard_done(settings, results, seconds)
    policy = load_policy(settings.models.policy)
    methods, calibrated = build_methods(results, fixed, adaptive, policy, size)
    lpips_available = bool(measurers.lpips and measurers.lpips.available)
    splits = read_split_file(settings.data.split_file)
    tables = recon_tables(results, methods, size, lpips_available, splits, policy if adaptive else None)
    out = settings.run.out
    out.mkdir(parents=True, exist_ok=True)

    plot_rate_distortion(
        tables["all"], out / "rate_distortion.png", f"{settings.data.dataset}: {len(results)} images"
    )
    shown = [fixed_name(r) for r in fixed] + ([ADAPTIVE, CALIBRATED] if adaptive else [])
    plot_domain_bars(tables, out / "per_domain.png", shown)
    grid = []
    if kept:
        routed = {
            r.id: ratio
            for r, ratio in zip(results, next((m.ratios for m in methods if m.name == ADAPTIVE), []))
        }
        grid = grid_rows(vae, kept, ratios, routed, settings.run.device)
        plot_reconstruction_grid(grid, out / "recon_grid.png")

    section = {
        "run": _run_record(settings),
        "images": len(results),
        "size": size,
        "seconds": seconds,
        "router": _scorer_name(scorer),
        "lpips_status": measurers.lpips_status,
        "lpips_source": measurers.lpips_source,
        "fid_status": fid_status,
        "policy": {"low": policy.low, "high": policy.high},
        "calibrated_policy": {"low": calibrated.low, "high": calibrated.high} if calibrated else None,
        "tables": tables,
        "grid": [
            {"id": row["id"], "domain": row["domain"], "adaptive_ratio": row["adaptive_ratio"]}
            for row in grid
        ],
        "notes": list(settings.run.notes),
    }
    save_section(out, "recon", section)
    _print_summary(tables)
    return section


def _shard_done(settings: BenchSettings, results, seconds: float) -> dict:
    index, count = settings.run.shard
    print(
        f"shard {index}/{count}: {len(results)} images cached in {seconds:.0f} s; "
        "run again without --shard (all shards done) to build the report"
    )
    return {"shard": [index, count], "images": len(results), "seconds": seconds}


def cmd_prepare(settings: PrepareSettings) -> dict:
    """Fill the model-independent caches (original Inception features, JPEG and caption scores)."""
    models, run, metrics = settings.models, settings.run, settings.metrics
    scorer = load_router(models.router, models.router_backend, run.cache_dir)
    inception = None if not metrics.fid else load_inception(metrics.inception, run.device)
    config = EvalSettings(
        size=settings.data.size, ratios=(), batch_size=run.batch_size, device=run.device,
        fid=inception is not None, effnet=False, lpips=False,
    )  # fmt: skip
    started = time.perf_counter()
    results, _ = evaluate_dataset(
        _samples(settings),
        None,
        config,
        Measurers(config, inception),
        scorer=scorer,
        cache_dir=run.cache_dir,
        total=_count(settings),
        progress=run.progress,
    )
    seconds = time.perf_counter() - started
    print(
        f"prepared {len(results)} images in {seconds:.0f} s (originals' Inception features, JPEG and caption scores)"
    )
    return {"images": len(results), "seconds": seconds}


def grid_rows(vae, kept: dict[str, list], ratios, routed: dict[str, int], device: str) -> list[dict]:
    """Originals and reconstructions (PIL) of the kept images, for the report grid."""
    rows = []
    for domain, items in kept.items():
        for image_id, image in items:
            pixels = pil_to_tensor(image)[None].to(device)
            recon = {r: tensor_to_pil(reconstruct(vae, pixels, r)[0].cpu()) for r in ratios}
            rows.append(
                {
                    "id": image_id,
                    "domain": domain,
                    "original": image,
                    "recon": recon,
                    "adaptive_ratio": routed.get(image_id),
                }
            )
    return rows


def _print_summary(tables: dict) -> None:
    rows = tables["all"]
    print(recon_markdown_table(rows))
    if FIXED_REFERENCE in rows and CALIBRATED in rows:
        print()
        print(headline_table(tables, CALIBRATED))


def cmd_router(settings: RouterSettings) -> dict:
    _, results, _, _, _, seconds, scorer = _evaluate(settings, RATIOS, 0)
    if settings.run.shard is not None:
        return _shard_done(settings, results, seconds)
    policy = load_policy(settings.models.policy)
    splits = read_split_file(settings.data.split_file)
    quality = router_quality(
        results,
        policy,
        settings.data.size,
        bar_db=settings.bar_db,
        bar_psnr=settings.bar_psnr,
        heldout_ids=heldout_ids(splits),
        seed=settings.run.seed,
    )
    out = settings.run.out
    out.mkdir(parents=True, exist_ok=True)
    plot_score_vs_oracle(quality["per_image"], out / "router_scatter.png")
    section = {
        "run": _run_record(settings),
        "images": len(results),
        "seconds": seconds,
        "router": _scorer_name(scorer),
        "policy": {"low": policy.low, "high": policy.high},
        "quality": quality,
        "notes": list(settings.run.notes),
    }
    save_section(out, "router", section)
    rho = quality["spearman"]["all"]["caption_llm_score"]["vs_psnr_drop"]["rho"]
    print(f"Spearman(caption score, PSNR drop 8x->32x) = {rho}")
    for name, row in quality["routing"].items():
        print(f"{name:55s} accuracy {row['accuracy']:.3f}  too coarse {row['too_coarse']:.3f}")
    return section


def cmd_speed(settings: SpeedSettings) -> dict:
    models, run = settings.models, settings.run
    vae = load_vae(models.vae, run.device, run.seed)
    scorer = load_router(models.router, models.router_backend, run.cache_dir)
    samples = list(itertools.islice(_samples(settings, limit=run.batch_size), run.batch_size))
    rows = speed_rows(
        vae,
        samples,
        list(settings.resolutions),
        list(settings.ratios),
        scorer,
        load_policy(models.policy),
        settings.repeats,
        run.device,
    )
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    section = {"run": _run_record(settings), "router": _scorer_name(scorer), "rows": rows}
    save_section(out, "speed", section)
    print(speed_markdown(rows))
    return section


COMMANDS = {
    "recon": cmd_recon,
    "router": cmd_router,
    "speed": cmd_speed,
    "prepare": cmd_prepare,
    "headroom": cmd_headroom,  # returns its exit code (2 when some images failed)
    "route-targets": cmd_route_targets,  # the same
}


def _run(argv: list[str] | None) -> int:
    settings: CommandSettings = parse_settings(argv)
    try:
        code = COMMANDS[settings.command](settings)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise FatalError(f"{settings.command}: {error}") from None
    return code if isinstance(code, int) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``cat-bench``; returns the exit code (0 done, 2 partial, 1 fatal)."""
    return run_cli("cat-bench", lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
