"""Benchmark: ``cat-tokenize`` images/s from a folder vs from webdataset tar shards, at equal work, on CPU.

    python -m eval.bench_shards                          # 64 devset images at 128x128, 4 shards, shipped VAE
    python -m eval.bench_shards --images 256 --size 256 --shards 8 --repeats 3

The same images, byte for byte (devset images center-cropped and resized to ``--size``, saved as
JPEG quality 95, with their captions), are laid out twice: as a folder plus captions.jsonl, and as
``--shards`` img2dataset-style tars (``KEY.jpg`` + ``KEY.txt``). Every mode tokenizes all of them
with the same VAE at a fixed ``--ratio 16`` (no router: this measures the input and output paths,
not the LLM) in its own ``python -m cat_tokenizer.cli`` process:

* ``folder``: ``--images DIR --captions captions.jsonl`` (today's path, shards of ``--shard-size``);
* ``shards-safetensors``: ``--shards 'DIR/{00000..N}.tar' --format safetensors``;
* ``shards-webdataset``: the same with ``--format webdataset``.

``images/s steady`` excludes setup (imports + model load, from summary.json); ``end to end`` is
over the whole process. Each mode runs ``--repeats`` times, interleaved, and the median is
reported (the machine may be shared). ``OMP_NUM_THREADS`` of the timed processes is ``--threads``.

Writes ``eval/results/bench_shards.json`` and ``bench_shards.md`` (override with ``--out``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from cat_foundations.images import center_crop_resize, load_image
from eval.bench_cli import default_devset, describe_context, process_run_context, resolve_vae
from eval.report import REPO_ROOT, write_results

MODES = ("folder", "shards-safetensors", "shards-webdataset")


def prepare_inputs(devset: Path, count: int, size: int, shards: int, folder: Path) -> tuple[Path, str]:
    """Write ``count`` images twice: a folder + captions.jsonl, and ``shards`` tars. Returns (folder, pattern)."""
    records = [
        json.loads(line)
        for line in (devset / "captions.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    picked = [records[i % len(records)] for i in range(count)]
    images, tars = folder / "images", folder / "tars"
    images.mkdir(parents=True)
    tars.mkdir()
    lines, per_shard = [], -(-count // shards)
    for shard in range(shards):
        with tarfile.open(tars / f"{shard:05d}.tar", "w") as tar:
            for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                record = picked[index]
                buffer = io.BytesIO()
                center_crop_resize(load_image(devset / record["image"]), size).save(
                    buffer, "JPEG", quality=95
                )
                key = f"{index:09d}"
                (images / f"{key}.jpg").write_bytes(buffer.getvalue())
                lines.append(json.dumps({"image": f"{key}.jpg", "caption": record["caption"]}) + "\n")
                for name, data in (
                    (f"{key}.jpg", buffer.getvalue()),
                    (f"{key}.txt", record["caption"].encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "captions.jsonl").write_text("".join(lines), encoding="utf-8")
    return images, str(tars / f"{{00000..{shards - 1:05d}}}.tar")


def run_mode(
    mode: str, inputs: tuple[Path, str], out: Path, vae: str, batch_size: int, shard_size: int, threads: int
) -> dict:
    images, pattern = inputs
    if mode == "folder":
        source = ["--images", str(images), "--captions", str(images.parent / "captions.jsonl")]
        source += ["--shard-size", str(shard_size)]
    else:
        source = ["--shards", pattern, "--format", mode.removeprefix("shards-")]
    command = [sys.executable, "-m", "cat_tokenizer.cli", *source, "--out", str(out), "--vae", vae]
    command += ["--ratio", "16", "--batch-size", str(batch_size), "--quiet"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    process_wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{mode}: cat-tokenize exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    setup = summary["processes"][0]["setup_s"]
    images_done = summary["images_done_this_run"]
    return {
        "mode": mode,
        "images": images_done,
        "process_wall_s": process_wall,
        "setup_s": setup,
        "vae_encode_s": summary["processes"][0]["vae_encode_s"],
        "images_per_s_end_to_end": images_done / process_wall,
        "images_per_s_steady": images_done / (summary["wall_s"] - setup),
        "output_bytes": sum(p.stat().st_size for p in (out / "shards").iterdir()),
    }


def _median_rows(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for mode, results in runs.items():
        row = {"mode": mode, "repeats": len(results), "images": results[0]["images"]}
        for field in (
            "process_wall_s",
            "setup_s",
            "vae_encode_s",
            "images_per_s_end_to_end",
            "images_per_s_steady",
        ):
            row[field] = statistics.median(r[field] for r in results)
        row["output_bytes"] = results[0]["output_bytes"]
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| input | images | wall s | setup s | VAE encode s | images/s end to end | images/s steady | output MB |",
        "|" + " --- |" * 8,
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['images']} | {row['process_wall_s']:.1f} | {row['setup_s']:.1f} "
            f"| {row['vae_encode_s']:.1f} | {row['images_per_s_end_to_end']:.2f} | {row['images_per_s_steady']:.2f} "
            f"| {row['output_bytes'] / 1e6:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devset", type=Path, default=default_devset())
    parser.add_argument(
        "--images", type=int, default=64, help="images (devset, repeated if needed; default 64)"
    )
    parser.add_argument("--size", type=int, default=128, help="square side after crop + resize (default 128)")
    parser.add_argument(
        "--shards", type=int, default=4, help="tar shards the images are split into (default 4)"
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        help="folder mode: images per output shard (default: as many as per tar shard)",
    )
    parser.add_argument("--vae", default="default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS of the timed processes (default 1)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, interleaved; median reported")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "eval" / "results")
    args = parser.parse_args(argv)
    if args.shard_size is None:
        args.shard_size = -(-args.images // args.shards)  # equal work: as many output shards as tar shards

    with tempfile.TemporaryDirectory(prefix="bench_shards_") as scratch:
        scratch = Path(scratch)
        inputs = prepare_inputs(args.devset, args.images, args.size, args.shards, scratch)
        vae, vae_description = resolve_vae(args.vae, scratch)
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode in MODES:
                out = scratch / f"out_{mode}_{repeat}"
                runs[mode].append(
                    run_mode(mode, inputs, out, vae, args.batch_size, args.shard_size, args.threads)
                )
    rows = _median_rows(runs)
    context = process_run_context(args.threads)
    result = {
        "benchmark": "cat-tokenize folder vs tar-shard input",
        "images": args.images,
        "size": args.size,
        "shards": args.shards,
        "folder_shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "ratio": 16,
        "vae": vae_description,
        **context,
        "rows": rows,
        "runs": runs,
    }
    note = (
        f"# cat-tokenize input paths: {args.images} images at {args.size}x{args.size}, CPU, fixed 16x\n\n"
        f"Folder + captions.jsonl vs {args.shards} webdataset tar shards of the same JPEG bytes. VAE: {vae_description}. "
        f"Batch size {args.batch_size}; median of {args.repeats} interleaved runs per mode. "
        f"{describe_context(context)}\n\n"
        f"{format_table(rows)}\n"
    )
    write_results(args.out, "bench_shards", result, note)


if __name__ == "__main__":
    main()
