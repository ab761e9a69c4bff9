"""``cat-tokenize``: tokenize a folder of images adaptively (and ``cat-tokenize decode`` them back).

```
cat-tokenize --images DIR [--captions captions.jsonl] --out OUT [--ratio auto|8|16|32] ...
cat-tokenize decode --tokens OUT --out recon/
```

captions.jsonl: one JSON object per line with the image path relative to DIR under ``image``
(or ``file_name`` / ``path``) and the caption under ``caption`` (or ``text``); see
:mod:`cat_tokenizer.captions` and :mod:`cat_tokenizer.jobs` for every rule. Output layout and
the kill-safety guarantees: :mod:`cat_tokenizer.store`.

Exit codes: 0 every image was tokenized; 2 the run finished but some images or caption lines
failed (see errors.jsonl); 1 fatal error (bad arguments, unreadable input, unwritable output,
model that cannot load), reported as one line on stderr (set ``CAT_TOKENIZE_DEBUG=1`` for the
traceback).

Scale-out: run the same command under ``accelerate launch`` (multi-GPU, multi-node); the image
list is split with ``PartialState.split_between_processes``, each rank writes its own shards and
rank 0 merges the manifest. ``--router-backend vllm`` scores every caption of a process in one
vLLM pass before encoding starts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from cat_tokenizer import store
from cat_tokenizer.jobs import WorkItem, plan_work

RUN_FORMAT = "cat-tokenize-run-v1"
ROUTER_CHUNK = 32  # captions per router call in the main loop (the vLLM path scores all up front)


TOKENIZE_EPILOG = """\
images:
  Every file under --images whose extension Pillow opens is tokenized (hidden files skipped).
  EXIF orientation is applied; CMYK, 16-bit, palette and grayscale become 8-bit RGB; transparency
  (RGBA, palette) is composited on white. Images longer than --max-side are downscaled (Lanczos).
captions.jsonl:
  one JSON object per line: {"image": "sub/a.jpg", "caption": "..."}; "file_name" may replace
  "image" and "text" may replace "caption". Images without a line (or with an empty caption) are
  routed by the JPEG bits-per-pixel fallback, or skipped with --require-captions.
output (OUT):
  shards/*.safetensors (latents; each shard is written atomically and also holds its manifest
  records), manifest.jsonl, errors.jsonl (path, line, reason), summary.json, run.json.
exit codes:
  0 all images tokenized, 2 some images or caption lines failed (see errors.jsonl), 1 fatal.
scale-out:
  accelerate launch --multi_gpu --num_processes N -m cat_tokenizer.cli --images ... --out ...
  splits the images across processes (on a machine without GPUs the processes form a CPU/gloo
  group); add --router-backend vllm to score each process's captions in one vLLM pass first.
  Multi-node: --out must be on a filesystem every node sees (rank 0 merges the manifest there).
"""


class FatalError(Exception):
    """Stops the run with exit code 1 and a one-line message."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line and exit code 1 (the CLI's fatal code)."""

    def error(self, message):
        raise FatalError(f"{message} (see {self.prog} --help)")


# ---- arguments -------------------------------------------------------------------------------


def _ratio(value: str):
    if value == "auto":
        return None
    if value in ("8", "16", "32"):
        return int(value)
    raise argparse.ArgumentTypeError(f"--ratio must be auto, 8, 16 or 32, got {value!r}")


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _dtype(value: str):
    import torch

    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if value not in choices:
        raise argparse.ArgumentTypeError(f"--dtype must be one of {', '.join(choices)}")
    return choices[value]


def tokenize_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cat-tokenize",
        description="Tokenize every image in a folder with the caption-routed nested VAE. "
        "Use `cat-tokenize decode --tokens OUT --out DIR` to reconstruct.",
        epilog=TOKENIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument(
        "--captions",
        type=Path,
        help="captions.jsonl: {'image'|'file_name': path relative to --images, 'caption'|'text': str} per line",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder (shards/, manifest.jsonl, errors.jsonl, summary.json)",
    )
    parser.add_argument(
        "--ratio",
        type=_ratio,
        default=None,
        help="auto (router decides, default) or a fixed 8, 16 or 32 (no router)",
    )
    parser.add_argument(
        "--target-mean-tokens",
        type=float,
        help="calibrate the routing thresholds on this run's scores so the mean tokens per image, counted at 256x256 (1024/256/64 tokens at 8/16/32x), hits this budget",
    )
    parser.add_argument("--batch-size", type=_positive, default=8, help="images per VAE call (default 8)")
    parser.add_argument(
        "--shard-size",
        type=_positive,
        default=256,
        help="images per shard file, the unit of commit (default 256)",
    )
    parser.add_argument(
        "--device", help="torch device for the VAE (default: this process's accelerate device: cuda:N or cpu)"
    )
    parser.add_argument(
        "--dtype", type=_dtype, default=None, help="VAE dtype: float32 (default), bfloat16, float16"
    )
    parser.add_argument(
        "--vae",
        default="default",
        help="'default' (shipped checkpoint) or a NestedVAE.save_pretrained directory",
    )
    parser.add_argument(
        "--router-model",
        default="default",
        help="router LLM: 'default' (Qwen2.5-Coder-0.5B-Instruct), an HF id, a local directory or .gguf",
    )
    parser.add_argument(
        "--router-backend",
        choices=("transformers", "vllm"),
        default="transformers",
        help="transformers (default) or vllm (scores all captions in one pass first)",
    )
    parser.add_argument(
        "--score-cache",
        type=Path,
        help="SQLite cache of router scores (model, prompt version, caption): a rerun or --resume never scores a caption twice",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        help="routing thresholds JSON (RoutingPolicy.save); default thresholds otherwise",
    )
    parser.add_argument(
        "--max-side",
        type=_positive,
        default=2048,
        help="downscale (Lanczos, aspect kept) images whose longest side exceeds this (default 2048)",
    )
    parser.add_argument(
        "--tiling", action="store_true", help="tiled VAE encode/decode (for large --max-side)"
    )
    parser.add_argument(
        "--require-captions",
        action="store_true",
        help="skip images without a caption line instead of routing them by the image fallback",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run in --out: skip images its shards hold, redo the rest",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary on stderr")
    return parser


def decode_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cat-tokenize decode", description="Reconstruct a cat-tokenize output folder as PNG files."
    )
    parser.add_argument("--tokens", required=True, type=Path, help="the --out folder of a cat-tokenize run")
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for the reconstructed PNGs (subfolders kept)"
    )
    parser.add_argument(
        "--vae", help="NestedVAE to decode with (default: the one recorded in TOKENS/run.json)"
    )
    parser.add_argument("--batch-size", type=_positive, default=8, help="latents per VAE call (default 8)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return parser


# ---- helpers ---------------------------------------------------------------------------------


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def _prepare_out_dir(out_dir: Path) -> None:
    """Create the output folder and prove it is writable (fatal otherwise)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        store.atomic_write_text(probe, "ok")
        probe.unlink()
    except OSError as error:
        raise FatalError(f"output folder {out_dir} is not writable: {error.strerror or error}") from None


def _use_cpu(device: str | None) -> bool:
    """Whether the accelerate state should be CPU-only (gloo between processes when launched).

    accelerate only forms a multi-process CPU group when asked to (``PartialState(cpu=True)``),
    so ask whenever there is no GPU, ``--device cpu`` was given, or the launcher set
    ``ACCELERATE_USE_CPU``.
    """
    import torch

    wanted = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return wanted or (device is not None and device.startswith("cpu")) or not torch.cuda.is_available()


def _run_settings(args, policy) -> dict:
    vae = args.vae if args.vae == "default" else str(Path(args.vae).resolve())
    return {
        "format": RUN_FORMAT,
        "vae": vae,
        "router_model": args.router_model,
        "router_backend": args.router_backend,
        "ratio": args.ratio,
        "max_side": args.max_side,
        "policy": {"low": policy.low, "high": policy.high},
    }


def _check_resume_settings(out_dir: Path, settings: dict) -> None:
    previous_path = out_dir / store.RUN_INFO
    if not previous_path.exists():
        return
    previous = json.loads(previous_path.read_text())
    changed = [
        k for k in ("vae", "router_model", "ratio", "max_side", "policy") if previous.get(k) != settings[k]
    ]
    if changed:
        raise FatalError(
            f"--resume with different settings than the run in {out_dir} ({', '.join(changed)} changed)"
        )


def _load_tokenizer(args, policy):
    from cat_tokenizer.tokenizer import CATTokenizer
    from nested_vae import NestedVAE

    try:
        vae = NestedVAE.from_pretrained(args.vae, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as error:
        raise FatalError(f"cannot load the VAE {args.vae!r}: {error}") from None
    if args.tiling:
        vae.enable_tiling()
    router = None if args.ratio is not None else args.router_model
    options = {"cache_path": str(args.score_cache)} if args.score_cache else {}
    return CATTokenizer(
        vae,
        scorer=router,
        policy=policy,
        router_backend=args.router_backend,
        max_side=args.max_side,
        router_options=options,
    )


def _load_scorer_or_fail(tokenizer, quiet: bool):
    if quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        return tokenizer.scorer
    except Exception as error:  # any loader failure (missing files, bad id, no vllm) is fatal here
        raise FatalError(f"cannot load the router model {tokenizer.router_name!r}: {error}") from None


def _prescore(tokenizer, items: list[WorkItem]) -> dict:
    """Caption scores for ``items`` in ONE router call (vLLM path, calibration): id -> score."""
    started = time.perf_counter()
    captioned = [item for item in items if item.caption]
    scores = tokenizer.score_captions([item.caption for item in captioned])
    tokenizer.timings["router_s"] += time.perf_counter() - started
    return {item.id: score for item, score in zip(captioned, scores)}


def _fallback_scores(items: list[WorkItem], max_side: int) -> dict:
    """Image-only scores of uncaptioned items (for calibration); unreadable images are left out."""
    from cat_tokenizer.images import ImageLoadError, limit_max_side, load_image
    from router import image_complexity_score

    scores = {}
    for item in items:
        if item.caption:
            continue
        try:
            scores[item.id] = image_complexity_score(limit_max_side(load_image(item.path), max_side))
        except ImageLoadError:
            pass
    return scores


def _calibrated_policy(state, tokenizer, my_items, all_scores: dict, target: float, max_side: int):
    """Thresholds fitted on the scores of the whole run (gathered from every process)."""
    from accelerate.utils import gather_object

    from router import RoutingPolicy

    mine = dict(all_scores)
    mine.update(_fallback_scores(my_items, max_side))
    values = [score.score for score in mine.values()]
    if state.num_processes > 1:
        values = gather_object(values)
    if not values:
        raise FatalError("--target-mean-tokens: no image could be scored for calibration")
    try:
        return RoutingPolicy.calibrate(
            values, target_mean_tokens=target, image_size=256, base=tokenizer.policy
        )
    except ValueError as error:
        raise FatalError(f"--target-mean-tokens: {error}") from None


def _encode_chunk(
    tokenizer, chunk: list[WorkItem], args, prescored: dict | None, errors: list, writer
) -> int:
    """Load, route, encode and queue one chunk; bad images become error records. Returns #done."""
    from cat_tokenizer.images import ImageLoadError, load_image

    loaded: list[tuple[WorkItem, object]] = []
    for item in chunk:
        try:
            loaded.append((item, load_image(item.path)))
        except ImageLoadError as error:
            errors.append({"path": item.id, "line": item.line, "reason": error.reason})

    def encode(pairs):
        scores = None if prescored is None else [prescored.get(item.id) for item, _ in pairs]
        return tokenizer.encode_batch(
            [image for _, image in pairs],
            [item.caption for item, _ in pairs],
            args.ratio,
            scores=scores,
            batch_size=args.batch_size,
        )

    try:
        encoded = list(zip(loaded, encode(loaded)))
    except Exception:  # isolate the image that broke the batch: retry one by one
        encoded = []
        for pair in loaded:
            try:
                encoded.append((pair, encode([pair])[0]))
            except Exception as error:
                errors.append(
                    {
                        "path": pair[0].id,
                        "line": pair[0].line,
                        "reason": f"encoding failed: {type(error).__name__}: {error}",
                    }
                )
    for (item, _), result in encoded:
        writer.add(item.id, result, {"path": item.id, "caption": item.caption, "caption_line": item.line})
    return len(encoded)


def summarize(
    records: list[dict], errors: list[dict], skipped: int, wall_s: float, process_stats: list[dict]
) -> dict:
    """The end-of-run numbers: counts, tokens per ratio, mean tokens vs fixed 16x, speed, time split.

    ``process_stats``: per process, images done this run and seconds spent in setup (model
    loading), routing (``router_s``: caption LLM + image fallback) and the VAE encoder.
    """
    from router.policy import tokens_for

    per_ratio = {}
    for ratio in (8, 16, 32):
        chosen = [r for r in records if r["ratio"] == ratio]
        per_ratio[str(ratio)] = {"images": len(chosen), "tokens": sum(r["tokens"] for r in chosen)}
    total_tokens = sum(r["tokens"] for r in records)
    fixed16 = sum(tokens_for(16, tuple(r["size"])) for r in records)
    sources = Counter(r["score_source"] for r in records)
    done_this_run = sum(stats["done"] for stats in process_stats)
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
    return "\n".join(lines)


# ---- tokenize --------------------------------------------------------------------------------


def run_tokenize(args) -> int:
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from router import RoutingPolicy

    started = time.perf_counter()
    state = PartialState(cpu=_use_cpu(args.device))
    if args.device is None:
        args.device = str(state.device)
    if not args.images.is_dir():
        raise FatalError(f"--images {args.images} is not a folder")
    if args.captions is not None and not args.captions.is_file():
        raise FatalError(f"--captions {args.captions} is not a readable file")
    if args.target_mean_tokens is not None and args.ratio is not None:
        raise FatalError("--target-mean-tokens needs --ratio auto")
    out_dir = args.out
    _prepare_out_dir(out_dir)  # every rank: a failure must not leave the others waiting at a barrier

    try:
        policy = RoutingPolicy.load(args.policy) if args.policy else RoutingPolicy()
    except ValueError as error:
        raise FatalError(str(error)) from None
    saved_policy = out_dir / "policy.json"
    if args.resume and args.target_mean_tokens is not None and saved_policy.exists():
        policy = RoutingPolicy.load(saved_policy)  # keep the first run's calibration
    existing = store.shard_paths(out_dir)
    if existing and not args.resume:
        raise FatalError(
            f"{out_dir} already holds {len(existing)} shard(s) of an earlier run; pass --resume or use an empty folder"
        )
    if args.resume:
        _check_resume_settings(out_dir, _run_settings(args, policy))

    try:
        plan = plan_work(args.images, args.captions, args.require_captions)
    except OSError as error:
        raise FatalError(f"cannot read --captions {args.captions}: {error.strerror or error}") from None

    if args.resume and state.is_main_process:
        store.remove_temporary_files(out_dir)
    state.wait_for_everyone()
    done_ids = {record["id"] for record in store.read_shard_records(out_dir)} if args.resume else set()
    state.wait_for_everyone()  # every rank has read the shards before any rank writes new ones
    todo = [item for item in plan.items if item.id not in done_ids]

    tokenizer = _load_tokenizer(args, policy)
    if args.ratio is None and any(item.caption for item in todo):
        _load_scorer_or_fail(tokenizer, args.quiet)  # up front, so a model that cannot load is a fatal error
    setup_s = time.perf_counter() - started
    with state.split_between_processes(todo) as mine:
        my_items = list(mine)
    prescored = None
    if args.ratio is None and (args.router_backend == "vllm" or args.target_mean_tokens is not None):
        prescored = _prescore(tokenizer, my_items)
    if args.target_mean_tokens is not None and not (args.resume and saved_policy.exists()):
        tokenizer.policy = _calibrated_policy(
            state, tokenizer, my_items, prescored, args.target_mean_tokens, args.max_side
        )
        if state.is_main_process:
            tokenizer.policy.save(saved_policy)
    settings = _run_settings(args, tokenizer.policy)
    if state.is_main_process:
        store.atomic_write_text(out_dir / store.RUN_INFO, json.dumps(settings, indent=2) + "\n")

    writer = store.ShardWriter(out_dir, rank=state.process_index, shard_size=args.shard_size)
    errors: list[dict] = []
    done_this_rank = 0
    chunk_size = max(ROUTER_CHUNK, args.batch_size)
    show = not args.quiet and state.is_main_process
    with tqdm(total=len(my_items), unit="img", disable=not show, desc="tokenize", dynamic_ncols=True) as bar:
        for start in range(0, len(my_items), chunk_size):
            chunk = my_items[start : start + chunk_size]
            done_this_rank += _encode_chunk(tokenizer, chunk, args, prescored, errors, writer)
            bar.update(len(chunk))
        writer.flush()
    store.write_jsonl(out_dir / f"errors.rank{state.process_index:02d}.jsonl", errors)

    process_stats = [{"done": done_this_rank, "setup_s": setup_s, **tokenizer.timings}]
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        process_stats = gather_object(process_stats)
    state.wait_for_everyone()
    if state.is_main_process:
        _merge_outputs(out_dir, plan, process_stats, time.perf_counter() - started, args.quiet)
    state.wait_for_everyone()
    failed = len(store.read_jsonl(out_dir / store.ERRORS))
    return 2 if failed else 0


def _merge_outputs(out_dir: Path, plan, process_stats: list[dict], wall_s: float, quiet: bool) -> None:
    """Rank 0: manifest from the shards, errors from the rank parts, summary (all atomic)."""
    records = sorted(store.read_shard_records(out_dir), key=lambda r: r["id"])
    ids = [r["id"] for r in records]
    if len(ids) != len(set(ids)):
        duplicated = sorted(k for k, n in Counter(ids).items() if n > 1)
        raise FatalError(
            f"shards in {out_dir} hold duplicate images (e.g. {duplicated[0]}); the folder mixes runs"
        )
    store.write_jsonl(out_dir / store.MANIFEST, records)
    parts = sorted(out_dir.glob("errors.rank*.jsonl"))
    image_errors = [e for part in parts for e in store.read_jsonl(part)]
    errors = plan.errors + sorted(image_errors, key=lambda e: e["path"])
    store.write_jsonl(out_dir / store.ERRORS, errors)
    for part in parts:
        part.unlink()
    summary = summarize(records, errors, len(plan.skipped_without_caption), wall_s, process_stats)
    store.atomic_write_text(out_dir / store.SUMMARY, json.dumps(summary, indent=2) + "\n")
    _log(format_summary(summary), quiet)


# ---- decode ----------------------------------------------------------------------------------


def _png_names(ids: list[str]) -> dict[str, str]:
    """Image id -> output PNG path: ``a/b.jpg`` -> ``a/b.png``, or ``a/b.jpg.png`` if that collides."""
    stems = Counter(str(Path(i).with_suffix(".png")) for i in ids)
    return {
        i: (str(Path(i).with_suffix(".png")) if stems[str(Path(i).with_suffix(".png"))] == 1 else i + ".png")
        for i in ids
    }


def run_decode(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from cat_tokenizer.tokenizer import CATTokenizer
    from nested_vae import NestedVAE

    started = time.perf_counter()
    tokens_dir = args.tokens
    if not tokens_dir.is_dir():
        raise FatalError(f"--tokens {tokens_dir} is not a folder")
    manifest = tokens_dir / store.MANIFEST
    records = store.read_jsonl(manifest) if manifest.exists() else store.read_shard_records(tokens_dir)
    if not records:
        raise FatalError(f"{tokens_dir} holds no tokenized images (no manifest.jsonl, no shards)")
    run_info = tokens_dir / store.RUN_INFO
    vae_name = args.vae or (json.loads(run_info.read_text())["vae"] if run_info.exists() else "default")
    _prepare_out_dir(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        vae = NestedVAE.from_pretrained(vae_name, device=device)
    except (OSError, ValueError) as error:
        raise FatalError(f"cannot load the VAE {vae_name!r}: {error}") from None
    tokenizer = CATTokenizer(vae, scorer=None)
    names = _png_names([r["id"] for r in records])
    errors = []
    with tqdm(total=len(records), unit="img", disable=args.quiet, desc="decode", dynamic_ncols=True) as bar:
        for start in range(0, len(records), args.batch_size):
            chunk = records[start : start + args.batch_size]
            loaded = []
            for record in chunk:
                try:
                    loaded.append((record, store.load_latent(tokens_dir, record)))
                except Exception as error:
                    errors.append(
                        {"path": record["id"], "line": None, "reason": f"cannot read latent: {error}"}
                    )
            images = tokenizer.decode_batch([enc for _, enc in loaded], batch_size=args.batch_size)
            for (record, _), image in zip(loaded, images):
                target = args.out / names[record["id"]]
                target.parent.mkdir(parents=True, exist_ok=True)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                store.atomic_write_bytes(target, buffer.getvalue())
            bar.update(len(chunk))
    if errors:
        store.write_jsonl(args.out / store.ERRORS, errors)
    wall = time.perf_counter() - started
    _log(
        f"decoded {len(records) - len(errors)} image(s) to {args.out}, failed {len(errors)}, {wall:.1f} s",
        args.quiet,
    )
    return 2 if errors else 0


# ---- entry point -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 2 some items failed, 1 fatal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "decode":
            return run_decode(decode_parser().parse_args(argv[1:]))
        if argv and argv[0] == "tokenize":
            argv = argv[1:]
        return run_tokenize(tokenize_parser().parse_args(argv))
    except FatalError as error:
        print(f"cat-tokenize: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cat-tokenize: interrupted (finished shards are kept; rerun with --resume)", file=sys.stderr)
        return 1
    except Exception as error:
        if os.environ.get("CAT_TOKENIZE_DEBUG"):
            raise
        message = " ".join(str(error).split()) or "no message"
        print(
            f"cat-tokenize: error: {type(error).__name__}: {message} (CAT_TOKENIZE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
