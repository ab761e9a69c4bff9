"""The argparse side of ``cat-tokenize``: parsers, argument types, and the typed settings out.

:func:`parse_tokenize` / :func:`parse_decode` are the only places a ``Namespace`` exists; they
return :class:`~cat_tokenizer.cli_settings.TokenizeSettings` / ``DecodeSettings``. Bad arguments
raise :class:`cat_foundations.cli.FatalError` (exit code 1, one line).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from cat_foundations.cli import FatalError, OneLineParser
from cat_foundations.ratios import RATIOS
from cat_tokenizer.cli_settings import DecodeSettings, TokenBudget, TokenizeSettings
from cat_tokenizer.quality import QualityTarget, QualityTargetError

TOKENIZE_EPILOG = """\
images:
  Every file under --images whose extension Pillow opens is tokenized (hidden files skipped).
  EXIF orientation is applied; CMYK, 16-bit, palette and grayscale become 8-bit RGB; transparency
  (RGBA, palette) is composited on white. Images longer than --max-side are downscaled (Lanczos).
captions.jsonl:
  one JSON object per line: {"image": "sub/a.jpg", "caption": "..."}; "file_name" may replace
  "image" and "text" may replace "caption". Images without a line (or with an empty caption) are
  routed by the JPEG bits-per-pixel fallback, or skipped with --require-captions.
sharded input (--shards, --hf-dataset):
  one output shard per input shard, named after it, with the input's sample keys (--format
  safetensors: shards/NAME.safetensors; webdataset: shards/NAME.tar), plus shards/NAME.meta.json,
  the commit marker. An input shard is done when both exist: --resume never redoes it and redoes
  a half-done one whole. Unreadable members, samples without a caption (routed by the image
  fallback), truncated shards and missing columns land in errors.jsonl with shard and key.
output (OUT):
  shards/ (latents; each shard is written atomically and also holds its manifest records),
  manifest.jsonl, index.parquet (one row per image: key, shard, ratio, latent shape, tokens,
  score, router and VAE provenance), latents_stats.json (per-channel mean/std per ratio),
  errors.jsonl (path, line, reason[, shard, key]), summary.json, run.json.
exit codes:
  0 all images tokenized, 2 some images or caption lines failed (see errors.jsonl), 1 fatal.
scale-out:
  accelerate launch --multi_gpu --num_processes N -m cat_tokenizer.cli --images ... --out ...
  splits the images across processes (on a machine without GPUs the processes form a CPU/gloo
  group); add --router-backend vllm to score each process's captions in one vLLM pass first.
  Multi-node: --out must be on a filesystem every node sees (rank 0 merges the manifest there).
  With --shards/--hf-dataset the input shards (not images) are split across the processes.
"""


# ---- argument types ------------------------------------------------------------------------


def _token_budget(value: str) -> TokenBudget:
    if value.endswith("x") and value[:-1] in {str(r) for r in RATIOS}:
        return TokenBudget(like_ratio=int(value[:-1]))
    try:
        tokens = float(value)
    except ValueError:
        tokens = math.nan
    if not math.isfinite(tokens) or tokens <= 0:
        raise argparse.ArgumentTypeError(
            f"--target-mean-tokens must be a positive number of tokens or 8x/16x/32x, got {value!r}"
        )
    return TokenBudget(tokens=tokens)


def _quality(value: str) -> QualityTarget:
    try:
        return QualityTarget.parse(value)
    except QualityTargetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _ratio(value: str):
    if value == "auto":
        return None
    if value in {str(r) for r in RATIOS}:
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_of(flag: str):
    def parse(value: str) -> torch.dtype:
        if value not in DTYPES:
            raise argparse.ArgumentTypeError(f"{flag} must be one of {', '.join(DTYPES)}")
        return DTYPES[value]

    return parse


_dtype = _dtype_of("--dtype")


def tokenize_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="cat-tokenize",
        description="Tokenize every image in a folder with the caption-routed nested VAE. "
        "Use `cat-tokenize decode --tokens OUT --out DIR` to reconstruct.",
        epilog=TOKENIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_io_arguments(parser)
    _add_routing_arguments(parser)
    _add_vae_arguments(parser)
    return parser


def _add_io_arguments(parser: argparse.ArgumentParser) -> None:
    """The input/output options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    source.add_argument(
        "--shards",
        help="webdataset tar shards, brace-expanded: 'in/{00000..00099}.tar' (KEY.jpg|png|webp + KEY.txt|json); "
        "local paths or any URL / pipe: form webdataset opens",
    )
    source.add_argument(
        "--hf-dataset", metavar="ID_OR_PATH", help="a Hugging Face dataset: Hub id or local folder (datasets)"
    )
    parser.add_argument("--split", default="train", help="--hf-dataset split (default train)")
    parser.add_argument("--image-column", default="image", help="--hf-dataset image column (default image)")
    parser.add_argument(
        "--caption-column", default="caption", help="--hf-dataset caption column (default caption)"
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="--hf-dataset: stream it (IterableDataset); its files are the input shards",
    )
    parser.add_argument(
        "--format",
        choices=("safetensors", "webdataset"),
        default="safetensors",
        help="output of --shards/--hf-dataset runs: safetensors (default) or webdataset "
        "(tar of KEY.latent.safetensors + KEY.json per input shard)",
    )
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
        "--shard-size",
        type=_positive,
        default=256,
        help="images per shard file, the unit of commit (default 256); --hf-dataset (map-style): rows per input shard",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run in --out: skip images its shards hold, redo the rest",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary on stderr")


def _add_routing_arguments(parser: argparse.ArgumentParser) -> None:
    """The routing options."""
    parser.add_argument(
        "--ratio",
        type=_ratio,
        default=None,
        help="auto (router decides, default) or a fixed 8, 16 or 32 (no router)",
    )
    parser.add_argument(
        "--target-mean-tokens",
        type=_token_budget,
        metavar="N|16x",
        help="calibrate the routing thresholds on this run's scores so the mean tokens per image hits this budget: "
        "a number, or 8x/16x/32x for as many tokens as that fixed ratio spends on these images; counted at the "
        "sizes encoded (after --max-side, padded to 32), as summary.json counts them",
    )
    parser.add_argument(
        "--quality",
        type=_quality,
        metavar="lpips<=X|psnr>=X|ssim>=X",
        help="measured routing: encode every image at 8x, 16x and 32x, decode and measure each against the "
        "input, keep the fewest tokens that meet this target (8x and a recorded miss when none does); no "
        "router. Costs 1 encode + 3 decodes + 3 measurements per image (summary.json reports it against "
        "fixed 16x). Not with --ratio N or --target-mean-tokens",
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
        "--router-dtype",
        type=_dtype_of("--router-dtype"),
        default=None,
        help="router LLM dtype; default float32 on CPUs, so every CPU kind routes alike (bfloat16 is ~3x "
        "faster where the CPU has it natively, but moves some images to another ratio), bf16/fp16 on GPUs",
    )
    parser.add_argument(
        "--router-head",
        default="auto",
        help="fitted router head: 'auto' (the one fitted to this VAE when its folder has one, as the "
        "shipped checkpoint does: hybrid caption + image features), 'none' (the hand-made rule), or a "
        "head directory (python -m eval.fit_router_head); transformers backend",
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
        "--require-captions",
        action="store_true",
        help="skip images without a caption line instead of routing them by the image fallback",
    )


def _add_vae_arguments(parser: argparse.ArgumentParser) -> None:
    """The vae options."""
    parser.add_argument("--batch-size", type=_positive, default=8, help="images per VAE call (default 8)")
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
        "--max-side",
        type=_positive,
        default=2048,
        help="downscale (Lanczos, aspect kept) images whose longest side exceeds this (default 2048)",
    )
    parser.add_argument(
        "--tiling", action="store_true", help="tiled VAE encode/decode (for large --max-side)"
    )


def decode_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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


def _settings(cls, namespace: argparse.Namespace):
    return cls(**vars(namespace))


def _check_routing_choice(settings: TokenizeSettings) -> TokenizeSettings:
    """One way to pick the ratios per run: the router, ``--ratio N`` or ``--quality``."""
    if settings.quality is not None and settings.ratio is not None:
        raise FatalError(
            f"--quality {settings.quality} picks each image's ratio by measurement; drop --ratio {settings.ratio}"
        )
    if settings.quality is not None and settings.target_mean_tokens is not None:
        raise FatalError(
            "--quality and --target-mean-tokens both decide the ratios (a quality floor vs a token "
            "budget); pass one of them"
        )
    return settings


def parse_tokenize(argv: list[str]) -> TokenizeSettings:
    """``cat-tokenize [tokenize] ...`` arguments -> settings."""
    return _check_routing_choice(_settings(TokenizeSettings, tokenize_parser().parse_args(argv)))


def parse_decode(argv: list[str]) -> DecodeSettings:
    """``cat-tokenize decode ...`` arguments -> settings."""
    return _settings(DecodeSettings, decode_parser().parse_args(argv))
