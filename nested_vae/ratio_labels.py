"""Oracle ratio labels for routed training: the cheapest ratio whose reconstruction meets a bar.

CAT trains each image at the ratio its complexity picks, so the exits specialise. Besides the
caption router's labels (a ``cat-tokenize`` manifest), a previous checkpoint can label the
training set itself: for every image, the largest ratio (fewest tokens) whose reconstruction
meets a quality bar such as ``lpips<=0.25`` or ``psnr>=26``; images that meet it nowhere get 8x.

``cat-train ratio-labels --vae DIR --source captions.jsonl --split-file split.json --subset train
--bar 'lpips<=0.25' --out labels.jsonl`` writes ``{"image", "ratio", <metric per ratio>}`` lines
that ``data.ratio_labels`` reads. ``--from-targets route_targets.json`` (``cat-bench route-targets``,
which measured every image at every ratio already) gives the same labels without re-measuring.
"""

from __future__ import annotations

import argparse
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from cat_foundations.atomic import write_jsonl
from cat_foundations.images import center_crop_resize, load_image, pil_to_tensor
from cat_foundations.ratios import RATIOS

from .data import DataConfig, load_training_dataset, row_image_path
from .model import NestedVAE
from .perceptual import load_lpips

_BAR = re.compile(r"^\s*(lpips|psnr)\s*(<=|>=)\s*([0-9.]+)\s*$")


@dataclass(frozen=True)
class QualityBar:
    """A per-image quality requirement: ``metric`` compared to ``value`` (``lpips<=0.25``).

    Args:
        metric: ``"lpips"`` (LPIPS-VGG v0.1, lower is better) or ``"psnr"`` (dB, higher is better).
        value: the threshold.
    """

    metric: str
    value: float

    @classmethod
    def parse(cls, text: str) -> QualityBar:
        """``"lpips<=0.25"`` or ``"psnr>=26"``; the comparison must point the metric's good way."""
        match = _BAR.match(text)
        if not match:
            raise ValueError(f"quality bar {text!r} must look like 'lpips<=0.25' or 'psnr>=26'")
        metric, comparison, value = match.groups()
        if (metric, comparison) not in (("lpips", "<="), ("psnr", ">=")):
            raise ValueError(f"quality bar {text!r}: use lpips<=X (lower is better) or psnr>=X")
        return cls(metric, float(value))

    def met(self, value: float) -> bool:
        compare = operator.le if self.metric == "lpips" else operator.ge
        return compare(value, self.value)


def cheapest_ratio(quality: dict[int, float], bar: QualityBar) -> int:
    """The largest ratio whose quality meets ``bar`` (the smallest ratio when none does)."""
    for ratio in sorted(quality, reverse=True):
        if bar.met(quality[ratio]):
            return ratio
    return min(quality)


def label_record(image: str, quality: dict[int, float], bar: QualityBar) -> dict:
    """One labels-file line: the image name, its cheapest ratio meeting ``bar`` and the metric per ratio."""
    return {
        "image": image,
        "ratio": cheapest_ratio(quality, bar),
        bar.metric: {str(r): round(v, 5) for r, v in quality.items()},
    }


@torch.no_grad()
def image_quality(vae: NestedVAE, image: torch.Tensor, bar: QualityBar, lpips=None) -> dict[int, float]:
    """``{ratio: metric}`` of one image ``(3, H, W)`` in [-1, 1] reconstructed at every ratio."""
    batch = image.unsqueeze(0).to(next(vae.parameters()).dtype)
    quality = {}
    for ratio in RATIOS:
        rebuilt = vae(batch, ratio).sample.float().clamp(-1, 1)  # posterior mean, cropped to the input
        if bar.metric == "lpips":
            quality[ratio] = float(lpips(rebuilt, image.unsqueeze(0)))
        else:
            quality[ratio] = float(peak_signal_noise_ratio(rebuilt, image.unsqueeze(0), data_range=2.0))
    return quality


def oracle_labels(vae: NestedVAE, data: DataConfig, bar: QualityBar, size: int = 256) -> list[dict]:
    """One label record per image of ``data`` (center crops of ``size``), in dataset order."""
    lpips = load_lpips("vgg") if bar.metric == "lpips" else None
    vae = vae.eval()
    records = []
    for row in load_training_dataset(data):
        path = row_image_path(row)
        image = pil_to_tensor(center_crop_resize(load_image(path), size))
        records.append(label_record(Path(path).name, image_quality(vae, image, bar, lpips), bar))
    return records


def labels_from_targets(path: str | Path, bar: QualityBar, subset: str | None = None) -> list[dict]:
    """Label records from a ``cat-route-targets-v1`` file's per-image metrics (no model run).

    Args:
        path: the route-targets JSON (``images[].id``, ``.split``, ``.metrics[ratio][metric]``).
        bar: the quality bar; its metric must have been measured in the file.
        subset: keep only images of this split (``None``: all).

    Raises:
        ValueError: not a route-targets file, or an image lacks the bar's metric (image named).
    """
    targets = json.loads(Path(path).read_text())
    if not isinstance(targets, dict) or not str(targets.get("format", "")).startswith("cat-route-targets"):
        raise ValueError(f"{path}: not a route-targets file (written by 'cat-bench route-targets')")
    records = []
    for image in targets["images"]:
        if subset is not None and image.get("split") != subset:
            continue
        try:
            quality = {int(r): float(image["metrics"][str(r)][bar.metric]) for r in RATIOS}
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{path}: image {image.get('id')!r} has no {bar.metric} at every ratio"
            ) from None
        records.append(label_record(image["id"], quality, bar))
    if not records:
        raise ValueError(f"{path}: no image in split {subset!r}")
    return records


def main(argv: list[str]) -> int:
    """``cat-train ratio-labels``: write oracle labels for ``data.ratio_labels``."""
    parser = argparse.ArgumentParser(prog="cat-train ratio-labels", description=__doc__.split("\n\n")[1])
    origin = parser.add_mutually_exclusive_group(required=True)
    origin.add_argument("--vae", help="checkpoint directory or 'default' (with --source: measure now)")
    origin.add_argument("--from-targets", help="route_targets.json with every image's metrics per ratio")
    parser.add_argument("--source", help="captions.jsonl / image folder / dataset id (with --vae)")
    parser.add_argument(
        "--split-file", help="JSON split file (with --vae; --from-targets uses each image's recorded split)"
    )
    parser.add_argument("--subset", default="train")
    parser.add_argument("--bar", required=True, help="quality bar, e.g. 'lpips<=0.25' or 'psnr>=26'")
    parser.add_argument("--size", type=int, default=256, help="center-crop side (default 256)")
    parser.add_argument("--out", required=True, help="labels .jsonl to write")
    args = parser.parse_args(argv)
    bar = QualityBar.parse(args.bar)
    if args.from_targets:
        records = labels_from_targets(args.from_targets, bar, args.subset)
    elif not args.source:
        parser.error("--vae needs --source (the images to measure)")
    else:
        data = DataConfig(source=args.source, split_file=args.split_file, subset=args.subset)
        records = oracle_labels(NestedVAE.from_pretrained(args.vae).float(), data, bar, args.size)
    write_jsonl(Path(args.out), records)
    counts = {r: sum(record["ratio"] == r for record in records) for r in RATIOS}
    print(json.dumps({"images": len(records), "labels_per_ratio": counts, "bar": args.bar}))
    return 0
