"""Run records and reports: results.json (with provenance), report.md and its matplotlib plots."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from cat_foundations.atomic import atomic_write_text
from cat_foundations.hardware import cpu_model_name
from cat_foundations.ratios import RATIOS
from eval.metrics import format_metric
from eval.recon import ADAPTIVE, CALIBRATED, FIXED_REFERENCE

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "cat-tokenizer",
    "torch",
    "transformers",
    "torchmetrics",
    "datasets",
    "numpy",
    "scipy",
    "matplotlib",
)


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(directory: Path = REPO_ROOT) -> dict:
    """Commit hash and whether tracked files differ from it (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


def device_info(device: str) -> dict:
    info = {"device": device, "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    info["cpu"] = cpu_model_name()
    info["cpu_count"] = os.cpu_count()
    return info


def run_record(command: str, config: dict, device: str, argv: list[str] | None = None) -> dict:
    """The provenance block every results.json starts with (``argv``: the command line, without the program)."""
    return {
        "command": command,
        "argv": ["cat-bench", *(sys.argv[1:] if argv is None else argv)],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": package_versions(),
        "git": git_state(),
        "device": device_info(device),
        "config": config,
    }


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean_nan(value):
    """JSON has no NaN: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_nan(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(_clean_nan(data), indent=2, default=_json_default) + "\n")


def write_results(out: Path, name: str, result: dict, report: str) -> None:
    """A benchmark's ``out/<name>.json`` and ``out/<name>.md`` (atomically), and the report on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    atomic_write_text(out / f"{name}.md", report)
    print(report)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _pyplot():
    # Lazy on purpose: matplotlib is heavy (font cache, backends) and only plotting needs it.
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


METHOD_STYLE = {
    ADAPTIVE: {"marker": "*", "color": "tab:red", "s": 180},
    CALIBRATED: {"marker": "D", "color": "tab:green", "s": 80},
}


def plot_rate_distortion(table: dict[str, dict], path: Path, title: str) -> Path:
    """Tokens per image vs PSNR and vs rFID: fixed ratios as a curve, adaptive methods as points."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    fixed = sorted(
        (row["mean_tokens"], name, row) for name, row in table.items() if name.startswith("fixed-")
    )
    for axis, metric, label in (
        (axes[0], "psnr", "PSNR (dB, higher is better)"),
        (axes[1], "rfid", "rFID (lower is better)"),
    ):
        xs = [tokens for tokens, _, _ in fixed]
        ys = [_number(row[metric]) for _, _, row in fixed]
        if not any(math.isfinite(y) for y in ys):
            axis.text(0.5, 0.5, f"{metric} not computed", ha="center", va="center", transform=axis.transAxes)
            axis.set_xlabel("mean tokens per image")
            continue
        axis.plot(xs, ys, "o-", color="tab:blue", label="fixed ratio")
        for (tokens, name, _), y in zip(fixed, ys):
            axis.annotate(name.replace("fixed-", ""), (tokens, y), textcoords="offset points", xytext=(5, 5))
        for name, style in METHOD_STYLE.items():
            if name in table:
                axis.scatter(
                    [table[name]["mean_tokens"]],
                    [_number(table[name][metric])],
                    label=name,
                    zorder=3,
                    **style,
                )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("mean tokens per image")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_domain_bars(tables: dict[str, dict[str, dict]], path: Path, methods: list[str]) -> Path:
    """Per-domain grouped bars of PSNR, rFID and mean tokens for each method."""
    plt = _pyplot()
    domains = [g for g in tables if g.startswith("domain:")]
    names = [d.split(":", 1)[1] for d in domains]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / max(1, len(methods))
    positions = np.arange(len(domains))
    for axis, metric, label in (
        (axes[0], "psnr", "PSNR (dB)"),
        (axes[1], "rfid", "rFID (per-domain sets are small: biased, compare within a domain)"),
        (axes[2], "mean_tokens", "mean tokens per image"),
    ):
        drawn = False
        for k, method in enumerate(methods):
            values = [_number(tables[d].get(method, {}).get(metric)) for d in domains]
            axis.bar(positions + k * width, values, width, label=method)
            drawn = drawn or any(math.isfinite(v) for v in values)
        if not drawn:
            axis.text(0.5, 0.5, f"{metric} not computed", ha="center", va="center", transform=axis.transAxes)
        axis.set_xticks(positions + width * (len(methods) - 1) / 2, names)
        axis.set_title(label, fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_reconstruction_grid(rows: list[dict], path: Path, thumbnail: int = 160) -> Path:
    """Grid: one row per image: original, each fixed ratio, and the adaptive choice (when routed).

    Args:
        rows: ``{"id", "domain", "original": PIL, "recon": {ratio: PIL}, "adaptive_ratio": int | None}``;
            the "adaptive" column appears only when some row was routed (``cat-bench recon --ratios`` with ``auto``).
        thumbnail: pixel side of each cell.
    """
    plt = _pyplot()
    ratios = sorted(rows[0]["recon"]) if rows else []
    routed = any(row.get("adaptive_ratio") is not None for row in rows)
    columns = ["original"] + [f"{r}x" for r in ratios] + (["adaptive"] if routed else [])
    cell = thumbnail / 100
    figure, axes = plt.subplots(
        len(rows), len(columns), figsize=(cell * len(columns), cell * len(rows) * 1.08), squeeze=False
    )
    for i, row in enumerate(rows):
        adaptive = row.get("adaptive_ratio")
        images = (
            [row["original"]]
            + [row["recon"][r] for r in ratios]
            + ([row["recon"][adaptive]] if routed else [])
        )
        for j, (image, column) in enumerate(zip(images, columns)):
            axis = axes[i][j]
            axis.imshow(image.resize((thumbnail, thumbnail)))
            axis.set_xticks([])
            axis.set_yticks([])
            if i == 0:
                axis.set_title(column, fontsize=8)
            if j == 0:
                axis.set_ylabel(row["domain"], fontsize=7)
            if column == "adaptive":
                axis.set_xlabel(f"routed {adaptive}x", fontsize=7)
    figure.tight_layout(pad=0.3)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_score_vs_oracle(per_image: list[dict], path: Path) -> Path:
    """Scatter: caption-LLM score (and JPEG bpp) vs oracle difficulty, coloured by domain."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    domains = sorted({row["domain"] for row in per_image})
    colours = plt.get_cmap("tab10")
    for axis, key, label in (
        (axes[0], "caption_llm_score", "router score (caption LLM, 1-9)"),
        (axes[1], "jpeg_bpp", "JPEG bits per pixel (image-only baseline)"),
    ):
        for k, domain in enumerate(domains):
            points = [
                (row[key], row["difficulty_psnr_db"])
                for row in per_image
                if row["domain"] == domain
                and row.get(key) is not None
                and math.isfinite(row["difficulty_psnr_db"])
            ]
            if points:
                xs, ys = zip(*points)
                axis.scatter(xs, ys, s=12, alpha=0.7, color=colours(k % 10), label=domain)
        axis.set_xlabel(label)
        axis.set_ylabel("oracle difficulty: PSNR(8x) - PSNR(32x), dB")
        axis.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _cell(row: dict, metric: str, digits: int = 3) -> str:
    return format_metric(row.get(metric), digits)


def _change(row: dict, metric: str) -> str:
    change = row.get("vs_fixed16", {}).get(metric)
    if not change:
        return ""
    if metric == "psnr":
        return f" ({change['delta_db']:+.2f} dB)"
    return f" ({change['change_pct']:+.1f}%)"


def recon_markdown_table(rows: dict[str, dict]) -> str:
    lines = [
        "| method | n | mean tokens | rFID | PSNR | SSIM | LPIPS-VGG v0.1 | EffNet dist | ratios 8/16/32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        counts = row.get("ratio_counts", {})
        mix = "/".join(str(counts.get(str(r), 0)) for r in RATIOS)
        lines.append(
            f"| {name} | {row['n']} | {row['mean_tokens']:.1f} | {_cell(row, 'rfid', 2)}{_change(row, 'rfid')} "
            f"| {_cell(row, 'psnr', 2)}{_change(row, 'psnr')} | {_cell(row, 'ssim')}{_change(row, 'ssim')} "
            f"| {_cell(row, 'lpips', 4)}{_change(row, 'lpips')} | {_cell(row, 'effnet_dist', 4)}{_change(row, 'effnet_dist')} | {mix} |"
        )
    return "\n".join(lines)


def headline_table(tables: dict[str, dict[str, dict]], method: str = CALIBRATED) -> str:
    """Per group: fixed 16x vs an adaptive method at (about) the same mean tokens."""
    lines = [
        f"| group | tokens 16x | tokens {method} | PSNR 16x | PSNR adaptive (Δ) | SSIM 16x | SSIM adaptive "
        "| LPIPS-VGG v0.1 16x | LPIPS-VGG v0.1 adaptive (Δ%) | rFID 16x | rFID adaptive (Δ%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group, rows in tables.items():
        if FIXED_REFERENCE not in rows or method not in rows:
            continue
        base, row = rows[FIXED_REFERENCE], rows[method]
        lines.append(
            f"| {group} | {base['mean_tokens']:.0f} | {row['mean_tokens']:.0f} | {_cell(base, 'psnr', 2)} "
            f"| {_cell(row, 'psnr', 2)}{_change(row, 'psnr')} | {_cell(base, 'ssim')} | {_cell(row, 'ssim')}{_change(row, 'ssim')} "
            f"| {_cell(base, 'lpips', 4)} | {_cell(row, 'lpips', 4)}{_change(row, 'lpips')} "
            f"| {_cell(base, 'rfid', 2)} | {_cell(row, 'rfid', 2)}{_change(row, 'rfid')} |"
        )
    return "\n".join(lines)


def provenance_markdown(record: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
    git = record["git"]
    commit = (
        f"{git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}" if git.get("commit") else "unknown"
    )
    device = record["device"]
    where = device.get("gpu") or device.get("cpu", "")
    return (
        f"- command: `{' '.join(record['argv'])}`\n"
        f"- time: {record['time_utc']}; git commit: {commit}\n"
        f"- device: {device['device']} ({where}, {device['torch_threads']} torch threads)\n"
        f"- versions: {versions}"
    )
