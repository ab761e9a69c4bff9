"""Does the DEFAULT `cat-tokenize` beat fixed 16x at 16x's own token budget? ``python -m eval.bench_default_budget``

    python -m eval.bench_default_budget --dataset ../shared/data/devset \\
        --split-file nested_vae/weights/default/split.json --only-split heldout

Runs the real command, as a user would, on the same images (whole images, not crops; longest
side limited by ``--max-side``):

* ``cat-tokenize --ratio 16``;
* ``cat-tokenize --target-mean-tokens 16x`` -- the default router (``--router-head auto``: the
  head shipped with the checkpoint) with its thresholds calibrated on the run's own scores to
  the tokens ``--ratio 16`` spends on these images, counted at the encoded sizes;
* the same with ``--router-head none`` (the hand-made caption rule), for reference.

Each run's latents are decoded (``cat-tokenize decode``'s reader) and compared with the image as
encoded: mean LPIPS-VGG, PSNR and SSIM, and the run's mean tokens from its ``summary.json``.
Writes eval/results/bench_default_budget.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from cat_foundations.images import limit_max_side, load_image, pil_to_tensor
from cat_tokenizer.cli import main as cat_tokenize
from cat_tokenizer.readers import load_latent, read_records
from eval.datasets import iter_samples, read_split_file
from eval.engine import load_vae
from eval.metrics import LPIPSMetric, psnr_per_image, ssim_per_image
from eval.report import REPO_ROOT, run_record, write_results

RUNS = {
    "fixed 16x (--ratio 16)": ["--ratio", "16"],
    "default router at 16x's budget (--target-mean-tokens 16x)": ["--target-mean-tokens", "16x"],
    "caption rule at 16x's budget (--router-head none)": [
        "--target-mean-tokens",
        "16x",
        "--router-head",
        "none",
    ],
}


def write_inputs(dataset: str, split_file: str | None, only_split: str | None, folder: Path) -> list[str]:
    """``folder/images`` (links to the chosen images) and ``folder/captions.jsonl``; returns their ids."""
    samples = list(iter_samples(dataset))
    if only_split:
        samples = [s for s in samples if s.id in read_split_file(split_file)[only_split]]
    (folder / "images").mkdir()
    lines = []
    for sample in samples:
        name = Path(sample.id).name
        (folder / "images" / name).symlink_to(Path(sample.load()).resolve())
        lines.append(json.dumps({"image": name, "caption": sample.caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return [s.id for s in samples]


def measure_run(out: Path, images: Path, vae, lpips: LPIPSMetric, max_side: int) -> dict:
    records = read_records(out)
    values = {"lpips": [], "psnr": [], "ssim": []}
    with torch.inference_mode():
        for record in records:
            encoded = load_latent(out, record)
            recon = vae.decode(encoded.latent[None], encoded.ratio, output_size=encoded.size).sample.clamp(
                -1, 1
            )
            original = pil_to_tensor(limit_max_side(load_image(images / record["path"]), max_side))[None]
            values["lpips"].append(float(lpips(recon, original)[0]))
            values["psnr"].append(float(psnr_per_image(recon, original)[0]))
            values["ssim"].append(float(ssim_per_image(recon, original)[0]))
    summary = json.loads((out / "summary.json").read_text())
    ratios = [int(r["ratio"]) for r in records]
    return {
        "images": len(records),
        "mean_tokens": float(summary["mean_tokens"]),
        **{metric: float(np.mean(v)) for metric, v in values.items()},
        "ratio_counts": {str(r): ratios.count(r) for r in (8, 16, 32)},
        "sources": sorted({r["score_source"] for r in records}),
    }


def render(results: dict) -> str:
    lines = [
        "# The default `cat-tokenize` at fixed 16x's budget (`python -m eval.bench_default_budget`)",
        "",
        f"- {results['images']} images ({results['which']}), whole images, longest side <= {results['max_side']}; "
        f"git {str(results['run']['git']['commit'])[:12]}; {results['run']['time_utc']}",
        "",
        "| run | mean tokens | LPIPS | PSNR | SSIM | 8x / 16x / 32x | score sources |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["runs"].items():
        counts = row["ratio_counts"]
        lines.append(
            f"| {name} | {row['mean_tokens']:.1f} | {row['lpips']:.4f} | {row['psnr']:.2f} | {row['ssim']:.4f} "
            f"| {counts['8']} / {counts['16']} / {counts['32']} | {', '.join(row['sources'])} |"
        )
    fixed, routed = (results["runs"][name] for name in list(RUNS)[:2])
    lines += [
        "",
        f"Default router vs fixed 16x: LPIPS {routed['lpips'] - fixed['lpips']:+.4f} "
        f"({100 * (routed['lpips'] / fixed['lpips'] - 1):+.1f} %), PSNR {routed['psnr'] - fixed['psnr']:+.2f} dB, "
        f"tokens {routed['mean_tokens'] - fixed['mean_tokens']:+.1f} ({100 * (routed['mean_tokens'] / fixed['mean_tokens'] - 1):+.1f} %).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_default_budget", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split-file", default=None)
    parser.add_argument("--only-split", default=None)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--vae", default="default")
    parser.add_argument("--out", default=str(REPO_ROOT / "eval" / "results" / "bench_default_budget"))
    args = parser.parse_args(argv)
    vae = load_vae(args.vae, "cpu")
    lpips = LPIPSMetric("vgg")
    if not lpips.available:
        raise SystemExit(f"LPIPS-VGG weights are needed: {lpips.reason}")
    results = {"runs": {}, "max_side": args.max_side, "which": args.only_split or "all"}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        ids = write_inputs(args.dataset, args.split_file, args.only_split, scratch)
        for name, extra in RUNS.items():
            out = scratch / f"run{len(results['runs'])}"
            argv_run = ["--images", str(scratch / "images"), "--captions", str(scratch / "captions.jsonl"), "--out", str(out),
                        "--vae", args.vae, "--max-side", str(args.max_side), "--quiet", *extra]  # fmt: skip
            code = cat_tokenize(argv_run)
            if code != 0:
                raise SystemExit(f"cat-tokenize {' '.join(extra)} exited {code}")
            results["runs"][name] = {
                "argv": argv_run,
                **measure_run(out, scratch / "images", vae, lpips, args.max_side),
            }
    results["images"] = len(ids)
    results["run"] = run_record(
        "bench_default_budget", vars(args), "cpu", argv if argv is not None else sys.argv[1:]
    )
    out = Path(args.out)
    write_results(out.parent, out.name, results, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
