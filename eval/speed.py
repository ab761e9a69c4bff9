"""`cat-bench speed`: images per second for the router, VAE encode, decode and end to end.

Each component is timed on the same real images (first ``batch_size`` of the dataset, prepared
with the fixed crop protocol at each resolution), after one warm-up call, as the median of
``repeats`` calls. All rows of one run come from one process on one machine, so their ratios
are comparable; absolute numbers depend on the machine and its load.

End to end = router score of the captions + encode + decode at the ratio under test (fixed
ratio rows) or at the routed ratio of every image (``adaptive`` rows).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

from cat_foundations.images import pil_to_tensor
from router import RoutingPolicy, image_complexity_score


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``call()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _encode_decode(vae, pixels: torch.Tensor, ratio: int) -> torch.Tensor:
    latents = vae.encode(pixels, ratio).latent_dist.mode()
    return vae.decode(latents, ratio, output_size=pixels.shape[-2:]).sample


def _encode_decode_routed(vae, pixels: torch.Tensor, routed: list[int]) -> list[torch.Tensor]:
    """Adaptive path: one encode call with a per-image ratio list, then one decode per image."""
    distributions = vae.encode(pixels, routed).latent_dist
    if not isinstance(distributions, list):
        distributions = [distributions]
    outputs = []
    for distribution, ratio in zip(distributions, routed):
        latent = distribution.mode()
        latent = latent if latent.dim() == 4 else latent[None]
        outputs.append(vae.decode(latent, ratio, output_size=pixels.shape[-2:]).sample)
    return outputs


def speed_rows(
    vae,
    samples: Sequence,
    resolutions: Sequence[int],
    ratios: Sequence[int],
    scorer=None,
    policy=None,
    repeats: int = 3,
    device: str = "cpu",
) -> list[dict]:
    """Timing rows: ``{"component", "ratio", "resolution", "batch", "seconds", "images_per_s"}``."""
    policy = policy or RoutingPolicy()
    captions = [s.caption for s in samples]
    batch = len(samples)

    def route(images) -> list[int]:
        if scorer is not None and all(captions):
            scores = scorer.score(list(captions))
        else:
            scores = [image_complexity_score(image) for image in images]
        return [policy.route(s) for s in scores]

    def row(component: str, ratio, resolution: int, seconds: float) -> dict:
        return {
            "component": component,
            "ratio": ratio,
            "resolution": resolution,
            "batch": batch,
            "seconds": seconds,
            "images_per_s": batch / seconds if seconds > 0 else float("inf"),
        }

    rows: list[dict] = []
    for resolution in resolutions:
        images = [s.image(resolution) for s in samples]
        pixels = torch.stack([pil_to_tensor(image) for image in images]).to(device)
        rows.append(row("router", None, resolution, median_seconds(partial(route, images), repeats)))
        with torch.no_grad():
            for ratio in ratios:
                latents = vae.encode(pixels, ratio).latent_dist.mode()
                encode = partial(lambda p, r: vae.encode(p, r).latent_dist.mode(), pixels, ratio)
                decode = partial(
                    lambda z, r, hw: vae.decode(z, r, output_size=hw).sample,
                    latents,
                    ratio,
                    pixels.shape[-2:],
                )
                rows.append(row("vae_encode", ratio, resolution, median_seconds(encode, repeats)))
                rows.append(row("vae_decode", ratio, resolution, median_seconds(decode, repeats)))
                # The router runs even at a fixed ratio: end to end is what a user of the tokenizer pays.
                end_to_end = partial(
                    lambda p, r, imgs: (route(imgs), _encode_decode(vae, p, r)), pixels, ratio, images
                )
                rows.append(row("end_to_end", ratio, resolution, median_seconds(end_to_end, repeats)))
            adaptive = partial(lambda p, imgs: _encode_decode_routed(vae, p, route(imgs)), pixels, images)
            rows.append(row("end_to_end", "adaptive", resolution, median_seconds(adaptive, repeats)))
    return rows


def speed_markdown(rows: Sequence[dict]) -> str:
    lines = [
        "| component | ratio | resolution | batch | s / batch | images / s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['ratio']}x" if isinstance(row["ratio"], int) else (row["ratio"] or "-")
        lines.append(
            f"| {row['component']} | {ratio} | {row['resolution']} | {row['batch']} "
            f"| {row['seconds']:.3f} | {row['images_per_s']:.2f} |"
        )
    return "\n".join(lines)
