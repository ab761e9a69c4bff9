"""``cat-router``: prepare the default model, score a captions file.

    cat-router prepare [--cache-dir DIR]           assemble + verify + convert the default LLM once
    cat-router score --captions captions.jsonl [--out scores.jsonl] [--cache scores.sqlite]
                     [--model default] [--backend transformers|vllm] [--batch-size 32]

``score`` prints the mean score per ``domain`` (when the captions file has that key) and the
ratio counts under the default (or ``--policy``) thresholds.

Exit codes (:mod:`cat_foundations.cli`): 0 done; 2 scored, but some captions lines were rejected
(listed on stderr); 1 fatal (bad arguments or ``--policy``, missing model wheels, nothing to score).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from cat_foundations.atomic import write_jsonl
from cat_foundations.captions import read_captions_jsonl
from cat_foundations.cli import EXIT_OK, EXIT_PARTIAL, FatalError, OneLineParser, run_cli
from cat_foundations.ratios import RATIOS
from router import RoutingPolicy, load_scorer
from router.default_model import DefaultModelMissing, prepare_default_model


def _prepare(args) -> int:
    try:
        path = prepare_default_model(args.cache_dir, force=args.force)
    except DefaultModelMissing as error:
        raise FatalError(str(error)) from None
    print(path)
    return EXIT_OK


def domain_means(domains: list[str], values: list[float]) -> dict[str, tuple[int, float]]:
    """domain -> (count, mean value), domains in first-seen order."""
    groups: dict[str, list[float]] = defaultdict(list)
    for domain, value in zip(domains, values):
        groups[domain].append(value)
    return {domain: (len(v), sum(v) / len(v)) for domain, v in groups.items()}


def _load_policy(path: Path | None) -> RoutingPolicy:
    try:
        return RoutingPolicy.load(path) if path else RoutingPolicy()
    except ValueError as error:
        raise FatalError(f"--policy: {error}") from None


def _score(args) -> int:
    try:
        captions_file = read_captions_jsonl(args.captions)
    except OSError as error:
        raise FatalError(f"cannot read --captions {args.captions}: {error.strerror or error}") from None
    policy = _load_policy(args.policy)  # before the model loads: a bad file fails fast
    for error in captions_file.errors:
        print(f"cat-router: skipped {error}", file=sys.stderr)
    entries = [e for e in captions_file.entries if e.caption]
    skipped = len(captions_file.entries) - len(entries)
    if skipped:
        print(
            f"cat-router: {skipped} entries have no caption (the image fallback scores those)",
            file=sys.stderr,
        )
    if not entries:
        raise FatalError(f"{args.captions}: no captions to score")
    kwargs = {"batch_size": args.batch_size} if args.backend == "transformers" else {}
    scorer = load_scorer(args.model, backend=args.backend, cache_path=args.cache, **kwargs)
    scores = scorer.score([e.caption for e in entries])

    if args.out:
        write_jsonl(
            args.out,
            (
                {"image": e.image, "caption": e.caption, **score.to_dict(), "ratio": policy.route(score)}
                for e, score in zip(entries, scores)
            ),
        )
    _print_table(entries, scores, policy)
    return EXIT_PARTIAL if captions_file.errors else EXIT_OK


def _print_table(entries, scores, policy: RoutingPolicy) -> None:
    domains = [str(e.extra.get("domain", "all")) for e in entries]
    print(f"{'domain':<10} {'n':>4} {'score':>6} {'rating':>6} {'text':>5} {'faces':>5} {'charts':>6}")
    for domain, (count, mean_score) in domain_means(domains, [s.score for s in scores]).items():
        members = [s for s, d in zip(scores, domains) if d == domain]
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        print(
            f"{domain:<10} {count:>4} {mean_score:>6.2f} {mean([s.rating for s in members]):>6.2f} "
            f"{mean([s.flags['text'] for s in members]):>5.2f} {mean([s.flags['faces'] for s in members]):>5.2f} "
            f"{mean([s.flags['charts'] for s in members]):>6.2f}"
        )
    ratios = [policy.route(s) for s in scores]
    print("ratios: " + ", ".join(f"{r}x: {ratios.count(r)}" for r in RATIOS))


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="cat-router", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="assemble, verify and convert the default router model")
    prepare.add_argument("--cache-dir", type=Path, default=None, help="where to put the converted model")
    prepare.add_argument("--force", action="store_true", help="convert again even if already converted")
    score = commands.add_parser("score", help="score the captions of a captions.jsonl file")
    score.add_argument(
        "--captions", type=Path, required=True, help="captions.jsonl (image, caption[, domain])"
    )
    score.add_argument("--out", type=Path, default=None, help="write one JSON line of scores per caption")
    score.add_argument(
        "--cache", type=Path, default=None, help="SQLite score cache (re-runs skip scored captions)"
    )
    score.add_argument("--model", default="default", help="'default', an HF id, a local directory or a .gguf")
    score.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    score.add_argument("--batch-size", type=int, default=32)
    score.add_argument(
        "--policy", type=Path, default=None, help="routing thresholds JSON (RoutingPolicy.save)"
    )
    return parser


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return _prepare(args) if args.command == "prepare" else _score(args)


def main(argv: list[str] | None = None) -> int:
    """``cat-router``; returns the exit code (0 done, 2 some captions lines rejected, 1 fatal)."""
    return run_cli("cat-router", lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
