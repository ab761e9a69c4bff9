"""``cat-bench``'s results.json (one section per command, merged) and the report.md built from it."""

from __future__ import annotations

import json
from pathlib import Path

from cat_foundations.atomic import atomic_write_text
from eval.recon import CALIBRATED
from eval.report import headline_table, provenance_markdown, recon_markdown_table, write_json
from eval.speed import speed_markdown


def _load_results(out: Path) -> dict:
    path = out / "results.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def save_section(out: Path, command: str, section: dict) -> dict:
    results = _load_results(out)
    results[command] = section
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", render_report(_load_results(out)))
    return results


def render_report(results: dict) -> str:
    """report.md from every section of results.json."""
    parts = ["# cat-bench report", ""]
    if "recon" in results:
        parts += _recon_section(results["recon"])
    if "router" in results:
        parts += _router_section(results["router"])
    if "speed" in results:
        parts += _speed_section(results["speed"])
    return "\n".join(parts) + "\n"


def _notes(section: dict) -> list[str]:
    return [f"> {note}" for note in section.get("notes", [])] + ([""] if section.get("notes") else [])


def _recon_section(section: dict) -> list[str]:
    tables = section["tables"]
    lines = ["## Reconstruction (`cat-bench recon`)", "", provenance_markdown(section["run"]), ""]
    lines += _notes(section)
    lines += [
        f"- images: {section['images']}; size {section['size']}x{section['size']} (center crop on the short side, bicubic resize)",
        f"- LPIPS-VGG v0.1: {section['lpips_status']}"
        + (f"; weights: {section['lpips_source']}" if section.get("lpips_source") else ""),
        f"- rFID: {section['fid_status']}",
        f"- routing policy: {section.get('policy')}; 16x-budget calibrated: {section.get('calibrated_policy')}",
        "",
        "### Headline: adaptive vs fixed 16x at equal mean tokens",
        "",
        f"`{CALIBRATED}`: thresholds calibrated on the whole set to fixed 16x's mean tokens (tokens move between domains).",
        "",
        headline_table(tables, CALIBRATED),
        "",
        "`adaptive@16x-budget-in-group`: thresholds calibrated inside each group to 16x's tokens (equal tokens in every row).",
        "",
        headline_table(tables, "adaptive@16x-budget-in-group"),
        "",
        "Δ: PSNR difference in dB, other metrics relative change vs fixed 16x. rFID of small groups is biased upwards "
        "(fewer than 2048 images): compare rFIDs only within one group.",
        "",
        "![rate-distortion](rate_distortion.png)",
        "",
        "![per-domain](per_domain.png)",
        "",
    ]
    if section.get("grid"):
        lines += ["![reconstructions](recon_grid.png)", ""]
    lines += ["### All tables", ""]
    for group, rows in tables.items():
        lines += [f"#### {group}", "", recon_markdown_table(rows), ""]
    return lines


def _router_section(section: dict) -> list[str]:
    lines = ["## Router quality (`cat-bench router`)", "", provenance_markdown(section["run"]), ""]
    lines += _notes(section)
    quality = section["quality"]
    counts = quality["oracle_ratio_counts"]
    lines += [
        f"- images: {section['images']} ({quality['captioned_images']} with captions); oracle bar: {quality['quality_bar']}",
        f"- oracle ratios 8x/16x/32x: {counts['8']}/{counts['16']}/{counts['32']}",
        "",
        "### Spearman correlation with oracle difficulty (PSNR(8x) - PSNR(32x))",
        "",
        "| group | caption LLM score | caption LLM rating | JPEG bpp | random |",
        "|---|---|---|---|---|",
    ]
    for group, row in quality["spearman"].items():
        cells = []
        for name in ("caption_llm_score", "caption_llm_rating", "jpeg_bpp", "random"):
            value = row[name]["vs_psnr_drop"]
            rho = value.get("rho")
            cells.append("n/a" if rho is None else f"{rho:+.3f} (n={value['n']})")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    effnet = quality["spearman"]["all"]["caption_llm_score"].get("vs_effnet_increase", {})
    if effnet.get("rho") is not None:
        lines += [
            "",
            f"Caption LLM score vs EfficientNet-distance increase (8x->32x): rho {effnet['rho']:+.3f}.",
        ]
    lines += [
        "",
        "### Routing accuracy vs oracle ratios",
        "",
        "| routing | accuracy | too coarse | too fine | mean tokens | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in quality["routing"].items():
        lines.append(
            f"| {name} | {row['accuracy']:.3f} | {row['too_coarse']:.3f} | {row['too_fine']:.3f} | {row['mean_tokens']:.1f} | {row['n']} |"
        )
    lines += ["", "![score vs oracle](router_scatter.png)", ""]
    return lines


def _speed_section(section: dict) -> list[str]:
    lines = ["## Speed (`cat-bench speed`)", "", provenance_markdown(section["run"]), ""]
    lines += _notes(section)
    lines += [speed_markdown(section["rows"]), ""]
    return lines
