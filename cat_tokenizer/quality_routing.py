"""Quality-targeted routing, measured: encode at every ratio, decode, measure, keep the cheapest that passes.

For each image: the 8x, 16x and 32x latents come from one trunk pass
(:func:`cat_tokenizer.all_exits.encode_all_exits`), each is decoded back to the size encoded, and
the reconstruction is measured against the input with the target's metric
(:class:`cat_tokenizer.quality.QualityMeter`). The image gets the ratio with the fewest tokens
(:func:`cat_foundations.ratios.tokens_for`) whose reconstruction meets the target; when none does,
the ratio with the most tokens (8x) and a recorded miss. ``Encoded.score_source`` is
``"quality_measured"`` and ``Encoded.extra["quality"]`` holds the target, every measured value and
whether it was met.

Cost: per image one encoder pass (as deep as a 32x encode), three decoder passes and three metric
evaluations, against one (16x-deep) encoder pass for a fixed-16x encode. The seconds of each part
go to ``timings`` (keys below); the first batch is also encoded once at fixed 16x, timed apart,
so a run can state its cost in fixed-16x seconds (:func:`cost_summary`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from cat_foundations.images import pil_to_tensor
from cat_foundations.ratios import RATIOS, tokens_for
from cat_tokenizer.all_exits import encode_all_exits, one_pass_supported
from cat_tokenizer.encoded import Encoded
from cat_tokenizer.quality import QualityMeter

SOURCE = "quality_measured"
REFERENCE_RATIO = 16  # what the cost is compared with: a fixed-16x encode of the same images
# timings keys this module adds to (summed over calls, like the tokenizer's own keys)
ENCODE_S, DECODE_S, METRIC_S = "quality_encode_s", "quality_decode_s", "quality_metric_s"
IMAGES, PIXELS = "quality_images", "quality_pixels"
REFERENCE_S, REFERENCE_PIXELS = "fixed16_reference_s", "fixed16_reference_pixels"
ENCODER_PASSES = "quality_encoder_passes_per_image"


def choose_ratio(target, measured: dict[int, float], size: tuple[int, int]) -> tuple[int, bool]:
    """The ratio with the fewest tokens whose measured value meets ``target``, and whether any did.

    Args:
        target: the :class:`~cat_tokenizer.quality.QualityTarget`.
        measured: the metric's value per ratio.
        size: ``(H, W)`` encoded (the token count depends on it).

    Returns:
        ``(ratio, met)``; with no ratio meeting the target, the one with the most tokens and False.
    """
    passing = [ratio for ratio in measured if target.met_by(measured[ratio])]
    if passing:
        return min(passing, key=lambda ratio: tokens_for(ratio, size)), True
    return max(measured, key=lambda ratio: tokens_for(ratio, size)), False


def _timed(timings: dict, key: str, started: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - started
    return now


def _time_reference_encode(vae, pixels: torch.Tensor, timings: dict) -> None:
    """Once per tokenizer: a fixed-16x encode of one batch, timed apart (its latents are dropped)."""
    if timings.get(REFERENCE_PIXELS):
        return
    started = time.perf_counter()
    vae.encode(pixels, REFERENCE_RATIO)
    _timed(timings, REFERENCE_S, started)
    timings[REFERENCE_PIXELS] = float(pixels.shape[0] * pixels.shape[2] * pixels.shape[3])


@torch.inference_mode()
def encode_to_quality(
    vae,
    meter: QualityMeter,
    images: Sequence,
    original_sizes: Sequence[tuple[int, int]],
    batch_size: int,
    timings: dict,
) -> list[Encoded]:
    """Encode RGB PIL ``images`` (already size-limited) at the ratio the quality target picks.

    Args:
        vae: the :class:`nested_vae.NestedVAE`.
        meter: measures reconstructions with the target's metric (its ``target`` decides).
        images: RGB PIL images, as they are to be encoded.
        original_sizes: ``(H, W)`` of each image before any ``max_side`` downscale.
        batch_size: images per VAE call.
        timings: dict the seconds, images and pixels of this work are added to (keys above).

    Returns:
        One :class:`Encoded` per image, in input order.
    """
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0))
    target = meter.target
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault((image.height, image.width), []).append(index)
    timings[ENCODER_PASSES] = 1 if one_pass_supported(vae) else len(RATIOS)

    results: list[Encoded | None] = [None] * len(images)
    for size, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            pixels = torch.stack([pil_to_tensor(images[i]) for i in chunk]).to(device, dtype)
            started = time.perf_counter()
            means, padding = encode_all_exits(vae, pixels)
            timings["vae_encode_s"] = timings.get("vae_encode_s", 0.0) + time.perf_counter() - started
            started = _timed(timings, ENCODE_S, started)
            reconstructions = {r: vae.decode(means[r], r, output_size=size).sample for r in RATIOS}
            started = _timed(timings, DECODE_S, started)
            measured = {r: meter.measure(reconstructions[r], pixels) for r in RATIOS}
            _timed(timings, METRIC_S, started)
            timings[IMAGES] = timings.get(IMAGES, 0) + len(chunk)
            timings[PIXELS] = timings.get(PIXELS, 0.0) + float(len(chunk) * size[0] * size[1])
            _time_reference_encode(vae, pixels, timings)
            for row, index in enumerate(chunk):
                values = {r: measured[r][row] for r in RATIOS}
                ratio, met = choose_ratio(target, values, size)
                results[index] = Encoded(
                    latent=means[ratio][row].float().cpu(),
                    ratio=ratio,
                    score=None,
                    score_source=SOURCE,
                    original_size=tuple(original_sizes[index]),
                    size=size,
                    padding=padding,
                    scaling_factor=scaling_factor,
                    extra={
                        "quality": {
                            "target": str(target),
                            "metric": target.metric,
                            "measured": {str(r): values[r] for r in RATIOS},
                            "met": met,
                        }
                    },
                )
    return results


def cost_summary(process_stats: list[dict]) -> dict | None:
    """The quality run's VAE cost against a fixed-16x encode of the same images (None: no quality work).

    ``vae_seconds`` is encode + decode (the metric's seconds are reported beside it);
    ``fixed16_equivalent_seconds`` scales each process's timed fixed-16x reference batch by the
    pixels that process encoded, so ``cost_vs_fixed16`` = ``vae_seconds / fixed16_equivalent_seconds``.
    """
    working = [stats for stats in process_stats if stats.get(IMAGES)]
    if not working:
        return None
    encode = sum(stats[ENCODE_S] for stats in working)
    decode = sum(stats[DECODE_S] for stats in working)
    metric = sum(stats[METRIC_S] for stats in working)
    equivalent = sum(
        stats[REFERENCE_S] / stats[REFERENCE_PIXELS] * stats[PIXELS]
        for stats in working
        if stats.get(REFERENCE_PIXELS)
    )
    return {
        "images_measured_this_run": int(sum(stats[IMAGES] for stats in working)),
        "vae_encode_seconds": encode,
        "vae_decode_seconds": decode,
        "metric_seconds": metric,
        "vae_seconds": encode + decode,
        "fixed16_equivalent_seconds": equivalent,
        "cost_vs_fixed16": (encode + decode) / equivalent if equivalent > 0 else None,
        "cost_vs_fixed16_with_metric": (encode + decode + metric) / equivalent if equivalent > 0 else None,
        "passes_per_image": {
            "vae_encode": max(stats.get(ENCODER_PASSES, 1) for stats in working),
            "vae_decode": len(RATIOS),
            "metric": len(RATIOS),
            "fixed16": {"vae_encode": 1, "vae_decode": 0, "metric": 0},
        },
    }
