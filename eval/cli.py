"""`cat-bench`: reconstruction, router-quality and speed benchmarks.

    cat-bench recon  --dataset ../shared/data/devset --ratios 8,16,32,auto --out runs/bench
    cat-bench router --dataset ../shared/data/devset --out runs/bench
    cat-bench speed  --dataset ../shared/data/devset --resolutions 256,512 --out runs/bench

Every command merges its section into ``<out>/results.json`` (with versions, config, git commit
and device) and rewrites ``<out>/report.md`` from all sections present, with PNG plots beside it.
Per-image results are cached (``--cache-dir``), so a killed run continues where it stopped and
``recon`` followed by ``router`` measures each image once.

Exit codes (:mod:`cat_foundations.cli`, the same for every command): 0 done, 1 fatal (bad
arguments, a missing dataset or checkpoint, ...) as one line on stderr. Files: :mod:`eval.cli_args`
(parser), :mod:`eval.cli_report` (results.json + report.md), this module (loading + commands).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

from cat_foundations.cli import EXIT_OK, FatalError, run_cli
from cat_foundations.images import pil_to_tensor, tensor_to_pil
from cat_foundations.ratios import RATIOS
from eval import datasets as eval_datasets
from eval.cli_args import build_parser
from eval.cli_report import render_report, save_section
from eval.engine import EvalSettings, Measurers, default_cache_dir, evaluate_dataset, reconstruct
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
from eval.router_quality import router_quality
from eval.speed import speed_markdown, speed_rows
from nested_vae import NestedVAE
from router import RoutingPolicy, load_scorer

__all__ = ["build_parser", "main", "read_split_file", "render_report"]


HELDOUT_SPLIT_NAMES = ("val", "validation", "heldout", "held_out", "test")


# ---- loading -------------------------------------------------------------------------------


def load_vae(spec: str, device: str, seed: int = 0):
    if spec == "random":
        torch.manual_seed(seed)
        vae = NestedVAE()
    else:
        vae = NestedVAE.from_pretrained(spec)
    return vae.to(device).eval()


def load_router(spec: str, backend: str, cache_dir: str | None = None):
    """The caption scorer, with the router's SQLite score cache under the benchmark cache dir."""
    if spec == "none":
        return None
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return load_scorer(spec, backend=backend, cache_path=root / "router-scores.sqlite")


def load_policy(path: str | None):
    return RoutingPolicy.load(path) if path else RoutingPolicy()


def read_split_file(path: str | None) -> dict[str, set[str]]:
    """Split name -> image ids, from JSON ``{name: [ids]}``, ``{id: name}``, a JSON list or a text file."""
    if not path:
        return {}
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {"heldout": {line.strip() for line in text.splitlines() if line.strip()}}
    if isinstance(data, list):
        return {"heldout": {str(item) for item in data}}
    if isinstance(data, dict):
        lists = {str(k): {str(i) for i in v} for k, v in data.items() if isinstance(v, list)}
        if lists:  # {split: [ids]}; scalar keys (seed, source, ...) are metadata
            # A list inside another (e.g. held-out images that share a source photo with training
            # images) also gets the difference, so numbers come "with and without" them.
            for name, ids in list(lists.items()):
                for other, other_ids in list(lists.items()):
                    if other != name and other_ids and other_ids < ids:
                        lists[f"{name} minus {other}"] = ids - other_ids
            return lists
        splits: dict[str, set[str]] = {}
        for key, value in data.items():  # {image id: split name}
            if isinstance(value, str):
                splits.setdefault(value, set()).add(str(key))
        if splits:
            return splits
    raise ValueError(
        f"{path}: expected {{split: [image ids]}}, {{image id: split}}, a list or one id per line"
    )


def heldout_ids(splits: dict[str, set[str]]) -> set[str] | None:
    for name in HELDOUT_SPLIT_NAMES:
        if name in splits:
            return splits[name]
    return None


def _samples(args, limit=None):
    samples = eval_datasets.iter_samples(
        args.dataset,
        limit=limit if limit is not None else args.limit,
        hf_id=args.hf_id,
        config=args.hf_config,
        split=args.split,
        image_column=args.image_column,
        caption_column=args.caption_column,
        data_files=args.data_files,
    )
    if getattr(args, "shuffle_seed", None) is not None:
        samples = list(samples)
        random.Random(args.shuffle_seed).shuffle(samples)
    shard = getattr(args, "shard", None)
    if shard is None:
        return samples
    index, count = shard
    return (sample for position, sample in enumerate(samples) if position % count == index)


def _count(args) -> int | None:
    """Number of samples for the progress bar, when it is cheap to know (local sources)."""
    source = eval_datasets.resolve_source(args.dataset, hf_id=args.hf_id, data_files=args.data_files)
    if isinstance(source, eval_datasets.HubDatasetSpec):
        return args.limit
    return sum(1 for _ in _samples(args))


def _config(args) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


# ---- commands ------------------------------------------------------------------------------


def _evaluate(args, ratios, keep_per_domain: int):
    vae = load_vae(args.vae, args.device, args.seed)
    scorer = load_router(args.router, args.router_backend, args.cache_dir)
    inception, fid_status = None, "skipped (--no-fid)"
    if not args.no_fid:
        try:
            inception = load_inception(args.inception, args.device)
            fid_status = (
                f"pt_inception-2015-12-05 via torchmetrics FrechetInceptionDistance ({inception.source})"
            )
        except FIDUnavailableError as error:
            fid_status = f"unavailable: {error}"
    settings = EvalSettings(
        size=args.size,
        ratios=tuple(ratios),
        batch_size=args.batch_size,
        device=args.device,
        fid=inception is not None,
        effnet=not args.no_effnet,
        lpips=not args.no_lpips,
    )
    measurers = Measurers(settings, inception)
    started = time.perf_counter()
    results, kept = evaluate_dataset(
        _samples(args),
        vae,
        settings,
        measurers,
        scorer=scorer,
        cache_dir=args.cache_dir,
        total=_count(args),
        keep_images_per_domain=keep_per_domain,
        progress=not args.no_progress,
        cached_only=args.cached_only,
    )
    seconds = time.perf_counter() - started
    return vae, results, kept, measurers, fid_status, seconds, scorer


def _scorer_name(scorer) -> str:
    return (
        "none (JPEG bpp fallback for every image)"
        if scorer is None
        else getattr(scorer, "model_id", type(scorer).__name__)
    )


def cmd_recon(args) -> dict:
    fixed, adaptive = args.ratios
    ratios = RATIOS if adaptive else tuple(sorted(set(fixed)))
    vae, results, kept, measurers, fid_status, seconds, scorer = _evaluate(args, ratios, args.grid_per_domain)
    if args.shard is not None:
        return _shard_done(args, results, seconds)
    policy = load_policy(args.policy)
    methods, calibrated = build_methods(results, fixed, adaptive, policy, args.size)
    lpips_available = bool(measurers.lpips and measurers.lpips.available)
    splits = read_split_file(args.split_file)
    tables = recon_tables(results, methods, args.size, lpips_available, splits, policy if adaptive else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    plot_rate_distortion(tables["all"], out / "rate_distortion.png", f"{args.dataset}: {len(results)} images")
    shown = [fixed_name(r) for r in fixed] + ([ADAPTIVE, CALIBRATED] if adaptive else [])
    plot_domain_bars(tables, out / "per_domain.png", shown)
    grid = []
    if kept:
        routed = {
            r.id: ratio
            for r, ratio in zip(results, next((m.ratios for m in methods if m.name == ADAPTIVE), []))
        }
        grid = grid_rows(vae, kept, ratios, routed, args.device)
        plot_reconstruction_grid(grid, out / "recon_grid.png")

    section = {
        "run": run_record("recon", _config(args), args.device, args.argv),
        "images": len(results),
        "size": args.size,
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
        "notes": args.notes,
    }
    save_section(out, "recon", section)
    _print_summary(tables)
    return section


def _shard_done(args, results, seconds: float) -> dict:
    index, count = args.shard
    print(
        f"shard {index}/{count}: {len(results)} images cached in {seconds:.0f} s; "
        "run again without --shard (all shards done) to build the report"
    )
    return {"shard": [index, count], "images": len(results), "seconds": seconds}


def cmd_prepare(args) -> dict:
    """Fill the model-independent caches (original Inception features, JPEG and caption scores)."""
    scorer = load_router(args.router, args.router_backend, args.cache_dir)
    inception = None if args.no_fid else load_inception(args.inception, args.device)
    settings = EvalSettings(
        size=args.size, ratios=(), batch_size=args.batch_size, device=args.device, fid=inception is not None
    )
    settings.effnet = settings.lpips = False
    started = time.perf_counter()
    results, _ = evaluate_dataset(
        _samples(args),
        None,
        settings,
        Measurers(settings, inception),
        scorer=scorer,
        cache_dir=args.cache_dir,
        total=_count(args),
        progress=not args.no_progress,
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


def cmd_router(args) -> dict:
    _, results, _, _, _, seconds, scorer = _evaluate(args, RATIOS, 0)
    if args.shard is not None:
        return _shard_done(args, results, seconds)
    policy = load_policy(args.policy)
    splits = read_split_file(args.split_file)
    quality = router_quality(
        results,
        policy,
        args.size,
        bar_db=args.bar_db,
        bar_psnr=args.bar_psnr,
        heldout_ids=heldout_ids(splits),
        seed=args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_score_vs_oracle(quality["per_image"], out / "router_scatter.png")
    section = {
        "run": run_record("router", _config(args), args.device, args.argv),
        "images": len(results),
        "seconds": seconds,
        "router": _scorer_name(scorer),
        "policy": {"low": policy.low, "high": policy.high},
        "quality": quality,
        "notes": args.notes,
    }
    save_section(out, "router", section)
    rho = quality["spearman"]["all"]["caption_llm_score"]["vs_psnr_drop"]["rho"]
    print(f"Spearman(caption score, PSNR drop 8x->32x) = {rho}")
    for name, row in quality["routing"].items():
        print(f"{name:55s} accuracy {row['accuracy']:.3f}  too coarse {row['too_coarse']:.3f}")
    return section


def cmd_speed(args) -> dict:
    vae = load_vae(args.vae, args.device, args.seed)
    scorer = load_router(args.router, args.router_backend, args.cache_dir)
    samples = list(itertools.islice(_samples(args, limit=args.batch_size), args.batch_size))
    rows = speed_rows(
        vae,
        samples,
        args.resolutions,
        args.ratios,
        scorer,
        load_policy(args.policy),
        args.repeats,
        args.device,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    section = {
        "run": run_record("speed", _config(args), args.device, args.argv),
        "router": _scorer_name(scorer),
        "rows": rows,
    }
    save_section(out, "speed", section)
    print(speed_markdown(rows))
    return section


COMMANDS = {
    "recon": cmd_recon,
    "router": cmd_router,
    "speed": cmd_speed,
    "prepare": cmd_prepare,
    "headroom": cmd_headroom,  # returns its exit code (2 when some images failed)
}


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise FatalError(f"{args.command}: {error}") from None
    return code if isinstance(code, int) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``cat-bench``; returns the exit code (0 done, 1 fatal)."""
    return run_cli("cat-bench", lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
