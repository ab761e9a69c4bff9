"""`cat-bench headroom`: how much an oracle allocation of ratios gains over fixed 16x, per metric.

For every image: PSNR, SSIM and LPIPS-VGG at 8x, 16x and 32x for three codecs of the same size --
the model (``model``), the model's own parameter-free pixel shortcut (``own_shortcut``, "none"
when the model has none) and the bicubic colour thumbnail with the same number of latent values
(``bicubic``, ``PixelShortcut("smooth", latent_channels)``). The baselines show what the learned
exits add.

The oracle (:mod:`eval.oracle`) picks each image's ratio for the best mean quality within a
budget (default: fixed 16x's mean tokens). Reported per codec, metric and group (all, each domain):
headroom at equal tokens (oracle - fixed 16x; LPIPS as % reduction), the fewest mean tokens
with which the oracle matches fixed 16x's mean (and the saving vs 16x's tokens), and the share of
every image's 32x-to-16x quality gap the 32x exit would have to close for that saving to reach the
issue's 35 % (:func:`eval.oracle.coarsest_gap_to_close`).

Tokens are counted at the encoded size: ``router.tokens_for`` (padding to multiples of 32).
Measurements go through :func:`eval.engine.evaluate_dataset` (per-image, resumable cache); the
baselines are wrapped as parameter-free "models" so they share that cache.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cat_foundations.atomic import atomic_write_text
from cat_foundations.cli import EXIT_OK, EXIT_PARTIAL
from cat_foundations.ratios import RATIOS, tokens_for
from eval.cli_settings import HeadroomSettings
from eval.datasets import iter_samples, read_split_file
from eval.engine import EvalSettings, Measurers, evaluate_dataset, load_vae
from eval.oracle import COARSE_FIRST, TARGET_SAVING_PCT, oracle_row
from eval.report import _pyplot, run_record, write_json
from nested_vae.model import DEFAULT_WEIGHTS_DIR, reflect_pad_to_multiple
from nested_vae.shortcuts import PixelShortcut, build_pixel_shortcut

__all__ = ["HeadroomSettings", "add_headroom_arguments", "cmd_headroom", "measure", "run_headroom"]

CODECS = ("model", "own_shortcut", "bicubic")
METRICS = ("psnr", "ssim", "lpips")


def add_headroom_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", required=True, help="DIR with captions.jsonl (domain field), or any cat-bench source"
    )
    parser.add_argument("--vae", default="default", help="'default' or a checkpoint directory")
    parser.add_argument("--size", type=int, default=256, help="center-crop + resize side (default 256)")
    parser.add_argument(
        "--split-file", help="JSON {split: [image ids]} (e.g. nested_vae/weights/default/split.json)"
    )
    parser.add_argument("--only-split", help="evaluate only this split of --split-file (e.g. heldout)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most N images")
    parser.add_argument(
        "--budget", type=float, default=None, help="oracle mean tokens per image (default: 16x's)"
    )
    parser.add_argument("--out", default="runs/headroom", help="output directory (results.json, report.md)")
    parser.add_argument("--cache-dir", default=None, help="per-image result cache (cat-bench's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS-VGG")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--note", dest="notes", action="append", default=[], help="a line for the report")


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


class ShortcutCodec(torch.nn.Module):
    """A :class:`PixelShortcut` behind NestedVAE's encode/decode interface (reflect-pads like the VAE).

    It has no weights; ``config`` names it, so :func:`eval.engine.model_fingerprint` keys its cache.
    """

    def __init__(self, shortcut: PixelShortcut):
        super().__init__()
        self.shortcut = shortcut
        self.config = f"PixelShortcut(kind={shortcut.kind!r}, latent_channels={shortcut.latent_channels})"

    def encode(self, images: torch.Tensor, ratio: int):
        padded, _ = reflect_pad_to_multiple(images)
        latent = self.shortcut.encode(padded, ratio)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: latent))

    def decode(self, latents: torch.Tensor, ratio: int, output_size: tuple[int, int]):
        height, width = output_size
        return SimpleNamespace(sample=self.shortcut.decode(latents, ratio)[..., :height, :width])


def checkpoint_record(spec: str) -> dict:
    directory = DEFAULT_WEIGHTS_DIR if spec == "default" else Path(spec)
    weights = directory / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return {"spec": spec, "path": str(directory.resolve()), "weights_sha256": digest}


def select_samples(settings: HeadroomSettings) -> tuple[list, list[dict], dict[str, set[str]]]:
    """The samples to measure (split applied, unloadable images dropped), the failures, the splits."""
    samples = list(iter_samples(settings.dataset))
    splits = read_split_file(settings.split_file)
    if settings.only_split:
        if settings.only_split not in splits:
            raise ValueError(f"split {settings.only_split!r} not in {settings.split_file}: {sorted(splits)}")
        samples = [s for s in samples if s.id in splits[settings.only_split]]
    samples = samples[: settings.limit] if settings.limit is not None else samples
    good, failures = [], []
    for sample in samples:
        try:
            sample.image(settings.size)
            good.append(sample)
        except Exception as error:  # any unreadable image is recorded and skipped
            failures.append({"id": sample.id, "reason": f"{type(error).__name__}: {error}"})
    if not good:
        raise ValueError(f"no loadable images in {settings.dataset} ({len(failures)} failed)")
    return good, failures, splits


def measure(
    settings: HeadroomSettings, samples: list, vae, codecs: tuple[str, ...] = CODECS
) -> tuple[list[dict], str]:
    """Per-image rows (see the module docstring; a codec not in ``codecs`` is None) and the LPIPS status."""
    config = EvalSettings(
        size=settings.size, ratios=RATIOS, batch_size=settings.batch_size, device=settings.device,
        fid=False, effnet=False, lpips=settings.lpips,
    )  # fmt: skip
    measurers = Measurers(config)
    channels = vae.config.latent_channels
    own = build_pixel_shortcut(vae.config.pixel_shortcut, channels)
    available = {"model": vae, "bicubic": ShortcutCodec(PixelShortcut("smooth", channels))}
    if own is not None:
        available["own_shortcut"] = ShortcutCodec(own)
    measured = {}
    for name, codec in available.items():
        if name not in codecs:
            continue
        results, _ = evaluate_dataset(
            samples, codec, config, measurers, cache_dir=settings.cache_dir, total=len(samples),
            progress=settings.progress,
        )  # fmt: skip
        measured[name] = {r.id: r for r in results}
    lpips_ok = bool(measurers.lpips and measurers.lpips.available)
    rows = []
    for sample in samples:
        row = {"id": sample.id, "domain": sample.domain, "size": [settings.size, settings.size]}
        row["tokens"] = {str(r): tokens_for(r, settings.size) for r in RATIOS}
        for name in CODECS:
            result = measured.get(name, {}).get(sample.id)
            row[name] = None if result is None else {
                str(r): {m: (result.metrics[r].get(m) if m != "lpips" or lpips_ok else None) for m in METRICS}
                for r in RATIOS
            }  # fmt: skip
        rows.append(row)
    return rows, measurers.lpips_status


# --------------------------------------------------------------------------------------------
# Aggregates and targets
# --------------------------------------------------------------------------------------------


def table(rows: list[dict], codec: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(N, L)`` metric values and tokens in COARSE_FIRST order, or None when any value is missing."""
    if any(row[codec] is None for row in rows):
        return None
    values = [[row[codec][str(r)][metric] for r in COARSE_FIRST] for row in rows]
    if any(v is None for line in values for v in line):
        return None
    return np.asarray(values, dtype=float), np.asarray(
        [[row["tokens"][str(r)] for r in COARSE_FIRST] for row in rows], dtype=float
    )


def summarize(rows: list[dict], budget: float | None) -> dict:
    """Per codec: mean of every metric at every ratio and the oracle per metric."""
    summary = {"n": len(rows)}
    for codec in CODECS:
        means, oracles = {}, {}
        for metric in METRICS:
            found = table(rows, codec, metric)
            if found is None:
                continue
            values, tokens = found
            for i, ratio in enumerate(COARSE_FIRST):
                means.setdefault(str(ratio), {"mean_tokens": float(tokens[:, i].mean())})[metric] = float(
                    values[:, i].mean()
                )
            oracles[metric] = oracle_row(values, tokens, metric, budget)
        summary[codec] = {"fixed": means, "oracle": oracles} if means else None
    return summary


def groups(rows: list[dict], splits: dict[str, set[str]]) -> dict[str, list[dict]]:
    """``all``, every domain, and every split that holds some but not all of the rows."""
    found = {"all": rows}
    for domain in sorted({row["domain"] for row in rows}):
        found[f"domain:{domain}"] = [row for row in rows if row["domain"] == domain]
    for name, ids in splits.items():
        members = [row for row in rows if row["id"] in ids]
        if 0 < len(members) < len(rows):
            found[f"split:{name}"] = members
    return found


def check_targets(summaries: dict[str, dict]) -> list[dict]:
    """The issue's targets on the evaluated set (model codec); a missing metric is not checked."""
    checks = []

    def check(name: str, value, passed) -> None:
        checks.append({"target": name, "value": value, "passed": None if value is None else bool(passed)})

    overall = summaries["all"]
    model, bicubic = overall["model"]["fixed"], overall["bicubic"]["fixed"]
    for r in map(str, RATIOS):
        margin = model[r]["psnr"] - bicubic[r]["psnr"]
        check(f"{r}x beats bicubic thumbnail by >= 3 dB PSNR", margin, margin >= 3)
        lp = model[r].get("lpips"), bicubic[r].get("lpips")
        cut = None if None in lp else 100 * (1 - lp[0] / lp[1])
        check(
            f"{r}x LPIPS >= 10% below the bicubic thumbnail's ('clearly')", cut, cut is not None and cut >= 10
        )
    for r, floor in (("8", 28), ("16", 24), ("32", 21)):
        check(f"{r}x PSNR >= {floor} dB", model[r]["psnr"], model[r]["psnr"] >= floor)
    check("8x LPIPS <= 0.10", model["8"].get("lpips"), (model["8"].get("lpips") or 1) <= 0.10)
    for group, summary in summaries.items():
        psnr = [summary["model"]["fixed"][str(r)]["psnr"] for r in RATIOS]
        check(f"PSNR ordered 8x > 16x > 32x ({group})", psnr, psnr[0] > psnr[1] > psnr[2])
        lpips = [summary["model"]["fixed"][str(r)].get("lpips") for r in RATIOS]
        lpips = None if None in lpips else lpips
        check(f"LPIPS ordered 8x < 16x < 32x ({group})", lpips, lpips and lpips[0] < lpips[1] < lpips[2])
    oracle = overall["model"]["oracle"]
    for metric, label in (("lpips", "LPIPS"), ("psnr", "PSNR")):
        saving = oracle.get(metric, {}).get("fewest_saving_pct")
        check(
            f"oracle matches 16x's {label} with >= {TARGET_SAVING_PCT:.0f}% fewer tokens",
            saving,
            (saving or 0) >= TARGET_SAVING_PCT,
        )
    gain_db = oracle["psnr"]["gain"]
    check("oracle at 16x's tokens: >= +0.8 dB PSNR", gain_db, gain_db >= 0.8)
    cut = oracle.get("lpips", {}).get("gain_pct")
    check("oracle at 16x's tokens: >= 10% lower LPIPS", cut, (cut or 0) >= 10)
    return checks


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, list):
        return " / ".join(_f(v, 2) for v in value)
    return f"{value:.{digits}f}"


def ratio_table(summary: dict) -> list[str]:
    lines = ["| ratio | tokens | " + " | ".join(f"{c} PSNR / SSIM / LPIPS" for c in CODECS) + " |"]
    lines.append("|---" * (2 + len(CODECS)) + "|")
    for r in map(str, RATIOS):
        cells = []
        for codec in CODECS:
            fixed = (summary[codec] or {}).get("fixed", {}).get(r)
            cells.append("none" if fixed is None else " / ".join(_f(fixed.get(m)) for m in METRICS))
        tokens = summary["model"]["fixed"][r]["mean_tokens"]
        lines.append(f"| {r}x | {tokens:.0f} | " + " | ".join(cells) + " |")
    return lines


def oracle_table(summaries: dict[str, dict]) -> list[str]:
    lines = [
        "| group (n) | codec | metric | fixed 16x | oracle @ budget | headroom | greedy oracle "
        f"| fewest mean tokens to match 16x (saving) | share of the 32x-16x gap to close for {TARGET_SAVING_PCT:.0f} % |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for group, summary in summaries.items():
        for codec in CODECS:
            for metric, row in ((summary[codec] or {}).get("oracle") or {}).items():
                gain = (
                    f"{round(row['gain_pct'], 2) + 0.0:+.2f} % lower"
                    if "gain_pct" in row
                    else f"{row['gain']:+.3f}"
                )
                fewest = "never" if row["fewest_mean_tokens"] is None else (
                    f"{row['fewest_mean_tokens']:.1f} ({row['fewest_saving_pct']:.1f} % fewer)"
                )  # fmt: skip
                share = row["gap_32x_to_close"]
                share = "never" if share is None else f"{100 * share:.0f} %"
                lines.append(
                    f"| {group} ({summary['n']}) | {codec} | {metric} | {_f(row['fixed16'])} | {_f(row['oracle'])}"
                    f" @ {row['mean_tokens']:.1f} tok | {gain} | {_f(row['greedy_oracle'])} | {fewest} | {share} |"
                )
    return lines


def plot_gains(rows: list[dict], summary: dict, path: Path) -> None:
    """Per-image gain 8x over 32x (PSNR vs LPIPS) by domain, and the oracle curves vs fixed ratios."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    domains = sorted({row["domain"] for row in rows})
    metric = "lpips" if summary["model"]["oracle"].get("lpips") else "psnr"
    for codec, marker in (("model", "o"), ("bicubic", "x")):
        for colour, domain in enumerate(domains):
            picked = [row[codec] for row in rows if row["domain"] == domain and row[codec]]
            x = [p["8"]["psnr"] - p["32"]["psnr"] for p in picked]
            y = [(p["32"][metric] - p["8"][metric]) * (1 if metric == "lpips" else -1) for p in picked]
            left.scatter(x, y, marker=marker, color=f"C{colour}", alpha=0.7, label=f"{codec}: {domain}")
    left.set(
        xlabel="PSNR gain 8x over 32x (dB)",
        ylabel=f"{metric.upper()} improvement 8x over 32x",
        title="per image",
    )
    left.legend(fontsize=7, ncol=2)
    for codec in CODECS:
        oracle = ((summary[codec] or {}).get("oracle") or {}).get(metric)
        if oracle:
            curve = oracle["frontier"]
            line = right.plot(curve["mean_tokens"], curve["mean"], label=f"{codec} oracle")[0]
            fixed = summary[codec]["fixed"]
            right.scatter([fixed[str(r)]["mean_tokens"] for r in RATIOS], [fixed[str(r)][metric] for r in RATIOS],
                          color=line.get_color(), marker="s", label=f"{codec} fixed 8/16/32x")  # fmt: skip
    right.set(
        xscale="log", xlabel="mean tokens per image", ylabel=f"mean {metric.upper()}", title="oracle vs fixed"
    )
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render_report(results: dict) -> str:
    run, summaries = results["run"], results["groups"]
    lines = [
        "# Headroom (`cat-bench headroom`)", "",
        f"- command: `{' '.join(run['argv'])}`; git {str(run['git'].get('commit'))[:12]}; {run['time_utc']}",
        f"- checkpoint: {results['checkpoint']['path']} (sha256 {results['checkpoint']['weights_sha256']})",
        f"- images: {summaries['all']['n']} measured, {len(results['failures'])} failed; size {results['size']}",
        f"- own shortcut: {results['own_shortcut']}; bicubic thumbnail: smooth PixelShortcut, "
        f"{results['latent_channels']} latent channels; LPIPS-VGG: {results['lpips_status']}",
        f"- oracle budget: {results['budget'] or 'fixed 16x tokens'} (mean tokens per image, per group)",
        *[f"> {note}" for note in results["notes"]], "",
    ]  # fmt: skip
    for group, summary in summaries.items():
        lines += [f"## {group} ({summary['n']} images)", "", *ratio_table(summary), ""]
    lines += ["## Oracle headroom over fixed 16x", "", *oracle_table(summaries), ""]
    lines += ["## Targets (issue #16)", "", "| target | value | passed |", "|---|---|---|"]
    lines += [f"| {t['target']} | {_f(t['value'])} | {t['passed']} |" for t in results["targets"]]
    lines += ["", "![per-image gains and oracle curves](headroom.png)", ""]
    if results["failures"]:
        lines += ["## Failed images", ""] + [f"- {f['id']}: {f['reason']}" for f in results["failures"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


def run_headroom(settings: HeadroomSettings) -> dict:
    vae = load_vae(settings.vae, settings.device)
    samples, failures, splits = select_samples(settings)
    rows, lpips_status = measure(settings, samples, vae)
    summaries = {name: summarize(members, settings.budget) for name, members in groups(rows, splits).items()}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()}
    results = {
        "run": run_record("headroom", config, settings.device, settings.argv),
        "checkpoint": checkpoint_record(settings.vae),
        "size": settings.size,
        "latent_channels": vae.config.latent_channels,
        "own_shortcut": str(vae.config.pixel_shortcut),
        "lpips_status": lpips_status,
        "budget": settings.budget,
        "notes": settings.notes,
        "failures": failures,
        "groups": summaries,
        "targets": check_targets(summaries),
        "images": rows,
    }
    settings.out.mkdir(parents=True, exist_ok=True)
    write_json(settings.out / "results.json", results)
    plot_gains(rows, summaries["all"], settings.out / "headroom.png")
    atomic_write_text(settings.out / "report.md", render_report(results))
    return results


def cmd_headroom(settings: HeadroomSettings) -> int:
    """Exit code: 0 done, 2 partial (some images failed, recorded); a fatal error raises (``run_cli``: 1).

    ``settings`` come from the parser edge (:func:`eval.cli_args.parse_settings`)."""
    results = run_headroom(settings)
    print("\n".join(ratio_table(results["groups"]["all"])))
    print("\n".join(oracle_table({"all": results["groups"]["all"]})))
    return EXIT_PARTIAL if results["failures"] else EXIT_OK
