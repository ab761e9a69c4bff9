"""`cat-bench route-targets`: what each image gains from more tokens, measured with the VAE itself.

Routing should send tokens where they pay, and what pays depends on the checkpoint: the same
image can gain 0.1 LPIPS from 32x to 8x with one VAE and nothing with another. This command
measures, for a captioned dataset and a checkpoint, every image's PSNR, SSIM and LPIPS-VGG at
8x, 16x and 32x (the same per-image measurement and cache as ``cat-bench headroom``, model
codec only) and writes them with each image's split, caption and gains to
``route_targets.json`` -- by default beside the split file, i.e. next to the checkpoint.

The file records the checkpoint's weights hash. A router head fitted on it
(``python -m eval.fit_router_head``) copies that hash, and ``cat-tokenize`` warns when the head
is used with another VAE. Re-run this command whenever the checkpoint changes.

Gains (positive = more tokens help): ``lpips`` = LPIPS(32x) - LPIPS(8x), ``psnr`` = PSNR(8x) -
PSNR(32x); ``*_per_1k_tokens`` divides by the extra tokens (in thousands) 8x costs over 32x.
Train rows are for fitting, held-out rows for reporting only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from cat_foundations.cli import EXIT_OK, EXIT_PARTIAL
from eval.cli_settings import HeadroomSettings
from eval.engine import load_vae
from eval.headroom import checkpoint_record, measure, select_samples
from eval.report import run_record, write_json

__all__ = ["FORMAT", "cmd_route_targets", "default_output", "load_route_targets", "route_targets"]

FORMAT = "cat-route-targets-v1"
FILE_NAME = "route_targets.json"
logger = logging.getLogger(__name__)


def default_output(settings: HeadroomSettings) -> Path:
    """``--out`` when it names a .json file, else ``route_targets.json`` in that directory (which
    :mod:`eval.cli_args` sets to the split file's when ``--out`` is not given)."""
    return settings.out if settings.out.suffix == ".json" else settings.out / FILE_NAME


def _split_of(image_id: str, splits: dict[str, set[str]]) -> str | None:
    """The image's split among those that are not part of another (``train``, ``heldout``)."""
    for name, ids in splits.items():
        inside_another = any(ids < other for other_name, other in splits.items() if other_name != name)
        if image_id in ids and not inside_another:
            return name
    return None


def _gains(metrics: dict, tokens: dict) -> dict:
    fine, coarse = metrics["8"], metrics["32"]
    extra_k = (tokens["8"] - tokens["32"]) / 1000.0
    gains = {"psnr": fine["psnr"] - coarse["psnr"], "ssim": fine["ssim"] - coarse["ssim"]}
    if fine.get("lpips") is not None and coarse.get("lpips") is not None:
        gains["lpips"] = coarse["lpips"] - fine["lpips"]
    gains.update({f"{name}_per_1k_tokens": value / extra_k for name, value in list(gains.items())})
    return gains


def route_targets(settings: HeadroomSettings) -> dict:
    """Measure every image (no ``--only-split``: train rows are what heads are fitted on)."""
    vae = load_vae(settings.vae, settings.device)
    samples, failures, splits = select_samples(replace(settings, only_split=None))
    rows, lpips_status = measure(settings, samples, vae, codecs=("model",))
    captions = {sample.id: sample.caption for sample in samples}
    images = []
    for row in rows:
        images.append(
            {
                "id": row["id"],
                "domain": row["domain"],
                "split": _split_of(row["id"], splits),
                "caption": captions[row["id"]],
                "size": row["size"],
                "tokens": row["tokens"],
                "metrics": row["model"],
                "gain": _gains(row["model"], row["tokens"]),
            }
        )
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()}
    return {
        "format": FORMAT,
        "run": run_record("route-targets", config, settings.device, list(settings.argv)),
        "checkpoint": checkpoint_record(settings.vae),
        "size": settings.size,
        "split_file": settings.split_file,
        "lpips_status": lpips_status,
        "failures": failures,
        "images": images,
    }


def load_route_targets(path: str | Path, weights_sha256: str | None = None) -> dict:
    """Read a route_targets.json; warn when it was measured with another checkpoint than ``weights_sha256``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read route targets ({error})") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (make one with `cat-bench route-targets`)")
    measured_with = data.get("checkpoint", {}).get("weights_sha256")
    if weights_sha256 is not None and measured_with != weights_sha256:
        logger.warning(
            "%s was measured with checkpoint %s, not %s: re-run `cat-bench route-targets`",
            path, str(measured_with)[:12], weights_sha256[:12],
        )  # fmt: skip
    return data


def cmd_route_targets(settings: HeadroomSettings) -> int:
    """Exit code: 0 done, 2 partial (some images failed, recorded in the file)."""
    results = route_targets(settings)
    out = default_output(settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    by_split: dict[str, int] = {}
    for image in results["images"]:
        by_split[str(image["split"])] = by_split.get(str(image["split"]), 0) + 1
    print(f"route targets: {len(results['images'])} images {by_split} -> {out}")
    return EXIT_PARTIAL if results["failures"] else EXIT_OK
