"""Benchmark: `cat-tokenize` end to end on devset images, adaptive routing vs fixed 16x.

    python -m eval.bench_cli                        # 40 devset images at 256x256, CPU
    python -m eval.bench_cli --images 40 --size 256 --vae default --router-model default

What it measures, in one run, for two modes side by side:

* ``auto``: the default router LLM scores each caption and routes to 8x/16x/32x (the product).
* ``fixed16``: ``--ratio 16``, no router: what the VAE alone costs.

The images are the first ``--images / 5`` devset images of each domain (photo, face, chart,
clipart, text), center-cropped and resized to ``--size`` squared (the evaluation protocol of
:func:`cat_tokenizer.images.center_crop_resize`) and written as PNG with their captions, so both
modes read the same files. Each mode runs as its own ``python -m cat_tokenizer.cli`` process, so
"end to end" includes interpreter start, imports, model loading, reading images and writing
shards. From the run's ``summary.json``: ``setup`` (imports + model loading), ``router``
(caption LLM + image fallback), ``VAE encode``, and ``other`` (image IO, shards, manifest).
``images/s (steady)`` excludes setup: the rate a long run approaches.

``--vae default`` uses the shipped checkpoint; while it is not installed, a randomly initialised
NestedVAE of the same default configuration is timed instead (same architecture, same cost) and
the results say so.

Threads: ``--threads`` (default 1) sets ``OMP_NUM_THREADS`` of the timed processes. On a shared
machine OpenMP spin-waiting makes 2 threads many times slower than 1 once other jobs compete for
the cores; on a quiet dedicated machine try ``--threads`` = number of cores.

Writes ``eval/results/bench_cli.json`` and ``bench_cli.md`` (override with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cat_foundations.images import center_crop_resize, load_image
from eval.report import REPO_ROOT, git_state, write_results
from nested_vae import NestedVAE
from nested_vae.model import DEFAULT_WEIGHTS_DIR

DOMAINS = ("photo", "face", "chart", "clipart", "text")
MODES = {"auto": [], "fixed16": ["--ratio", "16"]}


def default_devset() -> Path:
    return Path(os.environ.get("CAT_DEVSET", REPO_ROOT.parent / "shared" / "data" / "devset"))


def prepare_images(devset: Path, count: int, size: int, folder: Path) -> Path:
    """Write ``count`` devset images (equal share per domain) at size x size plus captions.jsonl."""
    records = [
        json.loads(line)
        for line in (devset / "captions.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    per_domain = -(-count // len(DOMAINS))
    picked = [r for d in DOMAINS for r in [r for r in records if r["domain"] == d][:per_domain]][:count]
    images = folder / "images"
    images.mkdir(parents=True)
    lines = []
    for record in picked:
        name = Path(record["image"]).with_suffix(".png").name
        center_crop_resize(load_image(devset / record["image"]), size).save(images / name)
        lines.append(json.dumps({"image": name, "caption": record["caption"]}) + "\n")
    (folder / "captions.jsonl").write_text("".join(lines), encoding="utf-8")
    return images


def resolve_vae(name: str, folder: Path) -> tuple[str, str]:
    """(VAE argument for the CLI, description). Falls back to a random default-config VAE."""
    if name != "default":
        return name, f"checkpoint {name}"
    if (DEFAULT_WEIGHTS_DIR / "model.safetensors").is_file():
        return "default", "shipped checkpoint (nested_vae/weights/default)"
    path = NestedVAE().save_pretrained(folder / "random_default_vae")
    return str(path), "random init, default NestedVAEConfig (shipped checkpoint not installed; same cost)"


def run_mode(
    mode: str,
    images: Path,
    captions: Path,
    out: Path,
    vae: str,
    router_model: str,
    batch_size: int,
    threads: int,
) -> dict:
    command = [
        sys.executable,
        "-m",
        "cat_tokenizer.cli",
        "--images",
        str(images),
        "--captions",
        str(captions),
        "--out",
        str(out),
        "--vae",
        vae,
        "--router-model",
        router_model,
        "--batch-size",
        str(batch_size),
        "--quiet",
        *MODES[mode],
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    process_wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{mode}: cat-tokenize exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    main_process = summary["processes"][0]
    images_done = summary["images_done_this_run"]
    accounted = main_process["setup_s"] + main_process["router_s"] + main_process["vae_encode_s"]
    steady = summary["wall_s"] - main_process["setup_s"]
    return {
        "mode": mode,
        "images": images_done,
        "process_wall_s": process_wall,
        "images_per_s_end_to_end": images_done / process_wall,
        "images_per_s_steady": images_done / steady if steady > 0 else None,
        "setup_s": main_process["setup_s"],
        "router_s": main_process["router_s"],
        "vae_encode_s": main_process["vae_encode_s"],
        "other_s": process_wall - accounted,
        "mean_tokens": summary["mean_tokens"],
        "per_ratio": {r: row["images"] for r, row in summary["per_ratio"].items()},
    }


def format_table(rows: list[dict]) -> str:
    header = (
        "| mode | images | wall s | images/s end to end | images/s steady | setup s | router s | VAE encode s "
        "| other s | mean tokens | 8x/16x/32x |"
    )
    lines = [header, "|" + " --- |" * 11]
    for row in rows:
        split = "/".join(str(row["per_ratio"][r]) for r in ("8", "16", "32"))
        lines.append(
            f"| {row['mode']} | {row['images']} | {row['process_wall_s']:.1f} | {row['images_per_s_end_to_end']:.2f} "
            f"| {row['images_per_s_steady']:.2f} | {row['setup_s']:.1f} | {row['router_s']:.1f} "
            f"| {row['vae_encode_s']:.1f} | {row['other_s']:.1f} | {row['mean_tokens']:.0f} | {split} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devset", type=Path, default=default_devset())
    parser.add_argument("--images", type=int, default=40, help="number of devset images (default 40)")
    parser.add_argument(
        "--size", type=int, default=256, help="square image side after crop + resize (default 256)"
    )
    parser.add_argument("--vae", default="default")
    parser.add_argument("--router-model", default="default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS of the timed processes (default 1)"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "eval" / "results")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_cli_") as scratch:
        scratch = Path(scratch)
        images = prepare_images(args.devset, args.images, args.size, scratch)
        vae, vae_description = resolve_vae(args.vae, scratch)
        rows = [
            run_mode(
                mode,
                images,
                scratch / "captions.jsonl",
                scratch / f"out_{mode}",
                vae,
                args.router_model,
                args.batch_size,
                args.threads,
            )
            for mode in MODES
        ]
    context = process_run_context(args.threads)
    result = {
        "benchmark": "cat-tokenize end to end",
        "images": args.images,
        "size": args.size,
        "batch_size": args.batch_size,
        "vae": vae_description,
        "router_model": args.router_model,
        **context,
        "rows": rows,
    }
    note = (
        f"# cat-tokenize end to end: {args.images} devset images at {args.size}x{args.size}, CPU\n\n"
        f"VAE: {vae_description}. Router: {args.router_model}. Batch size {args.batch_size}. "
        f"{describe_context(context)}\n\n"
        f"{format_table(rows)}\n"
    )
    write_results(args.out, "bench_cli", result, note)


def process_run_context(threads: int) -> dict:
    """Where benchmarked ``cat-tokenize`` processes ran: CPU, threads, load, versions, commit."""
    return {
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "omp_num_threads": threads,
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": (git_state(REPO_ROOT)["commit"] or "")[:7],
    }


def describe_context(context: dict) -> str:
    """The report's sentence about :func:`process_run_context`."""
    return (
        f"{context['cpu_count']} CPU cores, {context['omp_num_threads']} thread(s) per process, load average "
        f"{context['load_average_1min']:.1f} at the end, commit {context['git_commit']}."
    )


if __name__ == "__main__":
    main()
