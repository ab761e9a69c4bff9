"""``cat-gen``: train the reference generator on tokenized images, and sample it.

```
cat-gen train  --tokens TOKENS --objective flow|masked --steps N --out RUN [--batching pack|bucket] ...
cat-gen sample --run RUN --n K [--ratio 8|16|32|auto --caption TEXT] --out DIR
```

``train`` runs under ``accelerate launch`` unchanged. ``sample`` decodes with the nested VAE the
tokens were made with and writes ``sample_*.png``, ``grid.png`` and ``samples.json``.

Exit codes (:mod:`cat_foundations.cli`): 0 done; 1 fatal (bad arguments, unreadable tokens or run,
a model that cannot load), reported as one line on stderr (``CAT_TOKENIZER_DEBUG=1`` for the
traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cat_foundations.cli import EXIT_OK, FatalError, OneLineParser, run_cli
from cat_foundations.ratios import RATIOS

from .batching import BATCHING_MODES
from .config import OBJECTIVES
from .data import LABEL_RULES
from .sample import AUTO, SampleSettings, generate, save_samples
from .train import TrainSettings, train

PROG = "cat-gen"
MODEL_OPTIONS = (
    "hidden_size",
    "depth",
    "num_heads",
    "patch_size",
    "caption_dim",
    "head_hidden_size",
    "head_depth",
)


def _ratio(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    if text.isdigit() and int(text) in RATIOS:
        return int(text)
    raise argparse.ArgumentTypeError(f"--ratio takes {', '.join(map(str, RATIOS))} or auto, got {text!r}")


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--size takes H or HxW (positive integers), got {text!r}")
    return int(parts[0]), int(parts[1])


def train_parser() -> OneLineParser:
    parser = OneLineParser(
        prog=f"{PROG} train", description="Train the reference generator on cat-tokenize output."
    )
    parser.add_argument("--tokens", type=Path, required=True, help="a cat-tokenize output folder")
    parser.add_argument("--out", type=Path, required=True, help="the run folder to write")
    parser.add_argument(
        "--objective", choices=OBJECTIVES, default="flow", help="flow matching or masked generation"
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--batching", choices=BATCHING_MODES, default="pack", help="pack (default) or bucket")
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens per packed row (default 1024)")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per batch (default 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per bucket batch (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--labels", choices=sorted(LABEL_RULES), default="none", help="class labels from the id"
    )
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    for name in MODEL_OPTIONS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"model {name}")
    return parser


def sample_parser() -> OneLineParser:
    parser = OneLineParser(prog=f"{PROG} sample", description="Generate images from a cat-gen train run.")
    parser.add_argument("--run", type=Path, required=True, help="a cat-gen train run folder")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for sample_*.png, grid.png, samples.json"
    )
    parser.add_argument("--n", type=int, default=4, help="images to generate (default 4)")
    parser.add_argument(
        "--ratio", type=_ratio, default=None, help="8, 16, 32 or auto (router reads --caption)"
    )
    parser.add_argument("--caption", default=None, help="the caption to route (and condition on)")
    parser.add_argument("--label", default=None, help="a class/domain name of the run")
    parser.add_argument(
        "--size", type=_size, default=None, help="H or HxW (default: the run's most common size)"
    )
    parser.add_argument("--steps", type=int, default=32, help="sampling steps (default 32)")
    parser.add_argument("--head-steps", type=int, default=16, help="masked head Euler steps (default 16)")
    parser.add_argument("--temperature", type=float, default=1.0, help="masked head noise scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae", default=None, help="VAE to decode with (default: the tokens')")
    parser.add_argument("--router-model", default=None, help="router LLM for auto (default: the tokens')")
    parser.add_argument("--device", default=None)
    return parser


def _run_train(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    if not args.tokens.is_dir():
        raise FatalError(f"--tokens {args.tokens} is not a folder")
    model = {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name) is not None}
    try:
        settings = TrainSettings(
            tokens=args.tokens,
            out=args.out,
            objective=args.objective,
            steps=args.steps,
            batching=args.batching,
            max_tokens=args.max_tokens,
            rows=args.rows,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
            label_rule=args.labels,
            log_every=args.log_every,
            mixed_precision=args.mixed_precision,
            model=model,
        )
        result = train(settings)
    except (ValueError, FileNotFoundError) as error:
        raise FatalError(str(error)) from None
    first, last = result.losses[0][1], result.losses[-1][1]
    print(
        f"{PROG}: trained {settings.steps} steps in {result.wall_s:.1f} s ({result.tokens_per_s:.0f} tokens/s, "
        f"padding {result.padding_fraction:.1%}); loss {first:.4f} -> {last:.4f}; run in {settings.out}",
        file=sys.stderr,
    )
    return EXIT_OK


def _run_sample(argv: list[str]) -> int:
    args = sample_parser().parse_args(argv)
    settings = SampleSettings(
        run=args.run,
        n=args.n,
        ratio=args.ratio,
        caption=args.caption,
        label=args.label,
        size=args.size,
        steps=args.steps,
        head_steps=args.head_steps,
        temperature=args.temperature,
        seed=args.seed,
        vae=args.vae,
        router_model=args.router_model,
        device=args.device,
    )
    try:
        result = generate(settings)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise FatalError(str(error).strip("'\"")) from None
    save_samples(result, args.out, settings)
    routed = f", routed by score {result.score:.2f}" if result.score is not None else ""
    print(
        f"{PROG}: {settings.n} image(s) at {result.ratio}x ({result.tokens} tokens{routed}), "
        f"{result.size[0]}x{result.size[1]}, in {args.out}",
        file=sys.stderr,
    )
    return EXIT_OK


COMMANDS = {"train": _run_train, "sample": _run_sample}


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        raise FatalError(f"expected a command: {' or '.join(COMMANDS)} (see {PROG} train --help)")
    return COMMANDS[argv[0]](argv[1:])


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 fatal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: _dispatch(argv))


if __name__ == "__main__":
    sys.exit(main())
