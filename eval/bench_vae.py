"""Benchmark: NestedVAE encode/decode time and peak memory per ratio, beside diffusers' AutoencoderKL.

    python -m eval.bench_vae                       # 256 and 512, 3 interleaved repeats, 1 thread
    python -m eval.bench_vae --sizes 256 --repeats 5 --threads 2 --out eval/results/bench_vae.json

For every image size and ratio r in (8, 16, 32) it measures, in one process:

* ``nested``: ``NestedVAE.encode(x, r)`` and ``NestedVAE.decode(z, r)`` (default config unless
  ``--checkpoint``; random weights time the same as trained ones).
* ``autoencoderkl``: a ``diffusers.AutoencoderKL`` of matching width compressing by the same r:
  ``block_out_channels`` = the nested VAE's widths up to the r exit (32, 64, 128, 128 for 8x;
  + 256 for 16x; + 256, 256 for 32x, since the nested trunk has only five stages),
  ``layers_per_block`` 1, 16 latent channels, 32 GroupNorm groups: diffusers' standard blocks
  (mid-block attention at the latent resolution included).

Time: median over ``--repeats`` rounds; each round times every (model, ratio, encode|decode)
once, interleaved, so load changes on a shared machine hit all rows alike. Two clocks: wall time
(``perf_counter``) and this process's CPU time (``process_time``). On a loaded shared machine wall
time mostly measures the neighbours (a call waits while others run), whereas CPU time counts only
the work done; with one thread (the default) the two agree on a quiet machine. Targets are checked
on both. Ratios in the summary are between rows of the same run. Also reported: GFLOPs from
``torch.utils.flop_counter`` (exact, load-independent).

Peak memory: the largest amount of tensor memory held at once during one call, beyond what was
held before it (weights excluded), from replaying the allocations and frees that
``torch.profiler`` records with ``profile_memory=True``. ``resource.getrusage().ru_maxrss`` is
the process-wide high-water mark and only grows, so it cannot separate rows measured in one
process; ``tracemalloc`` does not see torch's allocations at all.

Targets (issue 2): 8x encode+decode within 1.2x of AutoencoderKL at equal width; the 32x path at
most 1.15x the 8x path's time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from cat_foundations.atomic import atomic_write_json
from nested_vae import RATIOS, NestedVAE

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_vae.json"
TARGET_8X_VS_AUTOENCODERKL = 1.2
TARGET_32X_VS_8X = 1.15


def autoencoderkl_matching(vae: NestedVAE, ratio: int):
    """diffusers AutoencoderKL with the nested VAE's widths that compresses by ``ratio``."""
    from diffusers import AutoencoderKL  # optional (the bench extra) and slow to import: only here

    config = vae.config
    blocks = ratio.bit_length()  # AutoencoderKL downsamples len(blocks) - 1 times: 8x -> 4 blocks
    widths = [config.widths[min(i, len(config.widths) - 1)] for i in range(blocks)]
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(widths),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
    ).eval()


def peak_tensor_memory_bytes(call: Callable[[], object]) -> int:
    """Peak tensor memory allocated during ``call()`` above what was held before (see module doc)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    changes = []
    for event in prof.events():
        # Frees outside any op appear as "[memory]" events; ops carry their own net allocation.
        change = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if change:
            changes.append((event.time_range.start, change))
    held = peak = 0
    for _, change in sorted(changes):
        held += change
        peak = max(peak, held)
    return peak


def gflops(call: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops() / 1e9


def interleaved_times_ms(
    calls: dict[str, Callable[[], object]], repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU milliseconds of every call in each round; one warm-up each, then ``repeats`` rounds."""
    for call in calls.values():
        call()
    times = {name: {"wall": [], "cpu": []} for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            times[name]["cpu"].append((time.process_time() - cpu) * 1000)
            times[name]["wall"].append((time.perf_counter() - wall) * 1000)
    return times


def run(sizes: list[int], ratios: list[int], repeats: int, checkpoint: str | None) -> dict:
    torch.manual_seed(0)
    nested = NestedVAE.from_pretrained(checkpoint) if checkpoint else NestedVAE().eval()
    references = {ratio: autoencoderkl_matching(nested, ratio) for ratio in ratios}
    rows = []
    for size in sizes:
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
        calls: dict[str, Callable[[], object]] = {}
        with torch.no_grad():
            for ratio in ratios:
                reference = references[ratio]
                latent = nested.encode(image, ratio).latent_dist.mode()
                reference_latent = reference.encode(image).latent_dist.mode()
                calls[f"nested/{ratio}/encode"] = lambda r=ratio, x=image: nested.encode(x, r)
                calls[f"nested/{ratio}/decode"] = lambda r=ratio, z=latent: nested.decode(z, r)
                calls[f"autoencoderkl/{ratio}/encode"] = lambda m=reference, x=image: m.encode(x)
                calls[f"autoencoderkl/{ratio}/decode"] = lambda m=reference, z=reference_latent: m.decode(z)
            times = interleaved_times_ms(calls, repeats)
            for ratio in ratios:
                for model in ("nested", "autoencoderkl"):
                    encode, decode = calls[f"{model}/{ratio}/encode"], calls[f"{model}/{ratio}/decode"]
                    encode_times, decode_times = (
                        times[f"{model}/{ratio}/encode"],
                        times[f"{model}/{ratio}/decode"],
                    )
                    row = {
                        "size": size,
                        "ratio": ratio,
                        "model": model,
                        "encode_ms": statistics.median(encode_times["wall"]),
                        "decode_ms": statistics.median(decode_times["wall"]),
                        "encode_cpu_ms": statistics.median(encode_times["cpu"]),
                        "decode_cpu_ms": statistics.median(decode_times["cpu"]),
                        "rounds_ms": {"encode": encode_times, "decode": decode_times},
                        "encode_peak_mb": peak_tensor_memory_bytes(encode) / 2**20,
                        "decode_peak_mb": peak_tensor_memory_bytes(decode) / 2**20,
                        "gflops": gflops(encode) + gflops(decode),
                    }
                    row["total_ms"] = row["encode_ms"] + row["decode_ms"]
                    row["total_cpu_ms"] = row["encode_cpu_ms"] + row["decode_cpu_ms"]
                    rows.append(row)
    return {
        "rows": rows,
        "summary": summarize(rows),
        "setup": {
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "machine": platform.processor() or platform.machine(),
            "nested_config": nested.config.to_dict(),
            "nested_parameters": sum(p.numel() for p in nested.parameters()),
            "autoencoderkl_parameters": {
                str(r): sum(p.numel() for p in m.parameters()) for r, m in references.items()
            },
        },
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per size: our/their time per ratio and the 32x/8x cost of the nested VAE, against targets."""
    summary = []
    for size in sorted({row["size"] for row in rows}):
        at = {(row["model"], row["ratio"]): row for row in rows if row["size"] == size}
        entry: dict = {"size": size}
        for ratio in RATIOS:
            if ("nested", ratio) in at:
                ours, theirs = at["nested", ratio], at["autoencoderkl", ratio]
                for measure in ("total_ms", "total_cpu_ms", "gflops"):
                    entry[f"nested_vs_autoencoderkl_{ratio}x_{measure}"] = ours[measure] / theirs[measure]
        if ("nested", 8) in at and ("nested", 32) in at:
            for measure in ("total_ms", "total_cpu_ms", "gflops"):
                entry[f"nested_32x_vs_8x_{measure}"] = at["nested", 32][measure] / at["nested", 8][measure]
        for measure in ("total_ms", "total_cpu_ms"):
            if f"nested_vs_autoencoderkl_8x_{measure}" in entry:
                ratio_8x = entry[f"nested_vs_autoencoderkl_8x_{measure}"]
                entry[f"target_8x_vs_autoencoderkl_met_{measure}"] = ratio_8x <= TARGET_8X_VS_AUTOENCODERKL
            if f"nested_32x_vs_8x_{measure}" in entry:
                entry[f"target_32x_vs_8x_met_{measure}"] = (
                    entry[f"nested_32x_vs_8x_{measure}"] <= TARGET_32X_VS_8X
                )
        summary.append(entry)
    return summary


def format_table(result: dict) -> str:
    header = (
        f"{'size':>5} {'ratio':>5} {'model':>14} {'enc ms':>8} {'dec ms':>8} {'total ms':>9} {'cpu ms':>9} "
        f"{'enc MB':>7} {'dec MB':>7} {'GFLOP':>7} {'ours/theirs wall':>16} {'cpu':>6}"
    )
    lines = [header, "-" * len(header)]
    rows = {(r["size"], r["ratio"], r["model"]): r for r in result["rows"]}
    for row in result["rows"]:
        wall = cpu = ""
        if row["model"] == "nested":
            theirs = rows[row["size"], row["ratio"], "autoencoderkl"]
            wall = f"{row['total_ms'] / theirs['total_ms']:.2f}x"
            cpu = f"{row['total_cpu_ms'] / theirs['total_cpu_ms']:.2f}x"
        lines.append(
            f"{row['size']:>5} {row['ratio']:>5} {row['model']:>14} {row['encode_ms']:>8.1f} "
            f"{row['decode_ms']:>8.1f} {row['total_ms']:>9.1f} {row['total_cpu_ms']:>9.1f} "
            f"{row['encode_peak_mb']:>7.1f} {row['decode_peak_mb']:>7.1f} {row['gflops']:>7.2f} {wall:>16} {cpu:>6}"
        )
    lines.append("")

    def verdict(entry: dict, name: str, measure: str) -> str:
        return "met" if entry[f"target_{name}_met_{measure}"] else "MISSED"

    for entry in result["summary"]:
        parts = [f"size {entry['size']}:"]
        if "nested_vs_autoencoderkl_8x_total_ms" in entry:
            parts.append(
                f"8x ours/AutoencoderKL wall {entry['nested_vs_autoencoderkl_8x_total_ms']:.2f}x "
                f"({verdict(entry, '8x_vs_autoencoderkl', 'total_ms')}), "
                f"cpu {entry['nested_vs_autoencoderkl_8x_total_cpu_ms']:.2f}x "
                f"({verdict(entry, '8x_vs_autoencoderkl', 'total_cpu_ms')}), "
                f"GFLOP {entry['nested_vs_autoencoderkl_8x_gflops']:.2f}x [target <= {TARGET_8X_VS_AUTOENCODERKL}];"
            )
        if "nested_32x_vs_8x_total_ms" in entry:
            parts.append(
                f"32x/8x wall {entry['nested_32x_vs_8x_total_ms']:.2f}x ({verdict(entry, '32x_vs_8x', 'total_ms')}), "
                f"cpu {entry['nested_32x_vs_8x_total_cpu_ms']:.2f}x ({verdict(entry, '32x_vs_8x', 'total_cpu_ms')}), "
                f"GFLOP {entry['nested_32x_vs_8x_gflops']:.2f}x [target <= {TARGET_32X_VS_8X}]"
            )
        lines.append(" ".join(parts))
    setup = result["setup"]
    lines.append(
        f"threads {setup['threads']}, median of {setup['repeats']} interleaved rounds, torch {setup['torch']}, "
        f"diffusers {setup['diffusers']}; params nested {setup['nested_parameters']:,}, "
        f"AutoencoderKL {setup['autoencoderkl_parameters']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sizes")
    parser.add_argument("--ratios", type=int, nargs="+", default=list(RATIOS), choices=RATIOS)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 by default: on a shared 2-core machine, 2 threads spin-wait "
        "on each other and time mostly the contention)",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="NestedVAE directory or 'default' (random weights if unset)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.sizes, args.ratios, args.repeats, args.checkpoint)
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
