"""One pass over a dataset that measures everything the benchmarks need, per image, with a cache.

For every image (prepared with the fixed crop protocol) :func:`evaluate_dataset` records:

* the reconstruction at each ratio (posterior mode, so results are deterministic) and its
  PSNR, SSIM, EfficientNet feature distance and LPIPS (when available);
* the 2048-d Inception features of the original and of each reconstruction (rFID for any
  routing is computed later from these, without more Inception passes);
* the router's caption score (when the image has a caption) and the JPEG bits-per-pixel score.

Adaptive routing picks, per image, one of the fixed-ratio reconstructions: the nested VAE
encodes every ratio with the same weights, so "encode at the routed ratio" and "take the
reconstruction of that ratio" are the same computation.

Resumable: each image's results are written to its own file as soon as its batch is done,
keyed by the model's weights fingerprint, the image size and the image id. A killed run
restarts where it stopped. Model-independent parts (original features, JPEG score) have their
own cache keys, so they survive a model change; caption scores live in the router's SQLite cache.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cat_foundations.atomic import atomic_write_bytes
from cat_foundations.cache import cache_root
from cat_foundations.images import pil_to_tensor
from cat_foundations.ratios import RATIOS
from eval.datasets import EvalSample
from eval.metrics import DeepFeatureDistance, LPIPSMetric, psnr_per_image, ssim_per_image, to_uint8
from nested_vae import NestedVAE
from router import image_complexity_score, routing_score
from router.fallback import jpeg_bits_per_pixel

CACHE_FORMAT = "cat-bench-cache-v1"


def default_cache_dir() -> Path:
    """``$CAT_BENCH_CACHE``, else ``bench/`` under the one cache root (:func:`cat_foundations.cache.cache_root`)."""
    if os.environ.get("CAT_BENCH_CACHE"):
        return Path(os.environ["CAT_BENCH_CACHE"])
    return cache_root() / "bench"


def load_vae(spec: str, device: str, seed: int = 0):
    """The VAE under test: 'default', a checkpoint directory, or 'random' (untrained, seeded)."""
    if spec == "random":
        torch.manual_seed(seed)
        vae = NestedVAE()
    else:
        vae = NestedVAE.from_pretrained(spec)
    return vae.to(device).eval()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-1 of a model's config and weights: a cache key that changes whenever a weight does."""
    digest = hashlib.sha1()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(repr(config).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:20]


class ResultCache:
    """Per-item files under ``root/<namespace>/`` (``torch.save`` dicts), written atomically."""

    def __init__(self, root: str | os.PathLike, namespace: str):
        self.directory = Path(root) / namespace
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, item_id: str) -> Path:
        return self.directory / f"{_key(item_id)}.pt"

    def get(self, item_id: str) -> dict | None:
        path = self.path(item_id)
        if not path.is_file():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a file cut short by a kill: recompute it
            return None
        return data if data.get("id") == item_id and data.get("format") == CACHE_FORMAT else None

    def put(self, item_id: str, data: dict) -> None:
        buffer = io.BytesIO()
        torch.save({**data, "id": item_id, "format": CACHE_FORMAT}, buffer)
        atomic_write_bytes(self.path(item_id), buffer.getvalue())


@dataclass
class ImageResult:
    """Everything measured for one image.

    Args:
        id / domain / caption: from the :class:`~eval.datasets.EvalSample`.
        metrics: ratio -> {"psnr", "ssim", "effnet_dist", "lpips"} (a missing metric is None).
        features: "original" and each ratio -> 2048-d Inception features (absent without FID).
        jpeg_bpp / jpeg_score: JPEG bits per pixel and the router's 1-9 fallback score.
        caption_score: the router's :class:`~router.ComplexityScore` as a dict, None without caption.
    """

    id: str
    domain: str
    caption: str | None
    metrics: dict[int, dict[str, float | None]]
    features: dict[str | int, torch.Tensor] = field(default_factory=dict)
    jpeg_bpp: float = math.nan
    jpeg_score: float = math.nan
    caption_score: dict | None = None

    def router_score(self) -> float:
        """The score routing uses (:func:`router.routing_score`): the caption LLM's, else the JPEG score."""
        return routing_score(
            self.caption_score["score"] if self.caption_score else None, image_score=self.jpeg_score
        )


@dataclass
class EvalSettings:
    """What :func:`evaluate_dataset` measures.

    Args:
        size: images are center-cropped and resized to ``size`` x ``size``.
        ratios: compression ratios to reconstruct at.
        batch_size: images per VAE / metric batch.
        device: where the VAE and the metric networks run.
        fid: compute Inception features (needed for rFID).
        effnet: compute the EfficientNet-Lite0 feature distance.
        lpips: compute LPIPS-VGG v0.1 (reported unavailable only when no weights are installed).
    """

    size: int = 256
    ratios: tuple[int, ...] = RATIOS
    batch_size: int = 8
    device: str = "cpu"
    fid: bool = True
    effnet: bool = True
    lpips: bool = True


class Measurers:
    """The metric networks, loaded once (Inception, EfficientNet, LPIPS)."""

    def __init__(self, settings: EvalSettings, inception: torch.nn.Module | None = None):
        self.inception = inception if settings.fid else None
        self.effnet = DeepFeatureDistance(settings.device) if settings.effnet else None
        self.lpips = LPIPSMetric(device=settings.device) if settings.lpips else None

    @property
    def lpips_status(self) -> str:
        if self.lpips is None:
            return "not requested"
        return "available" if self.lpips.available else f"unavailable: {self.lpips.reason}"

    @property
    def lpips_source(self) -> str | None:
        """Where the LPIPS-VGG v0.1 weights came from (trunk and heads), or None when not running."""
        return self.lpips.source if self.lpips is not None and self.lpips.available else None

    def features(self, images: torch.Tensor) -> torch.Tensor | None:
        return self.inception(to_uint8(images)) if self.inception is not None else None

    def compare(
        self, reconstructions: torch.Tensor, originals: torch.Tensor
    ) -> list[dict[str, float | None]]:
        psnr = psnr_per_image(reconstructions, originals).tolist()
        ssim = ssim_per_image(reconstructions, originals).tolist()
        effnet = self.effnet(reconstructions, originals).tolist() if self.effnet else [None] * len(psnr)
        lpips = self.lpips(reconstructions, originals) if self.lpips else None
        lpips = lpips.tolist() if lpips is not None else [None] * len(psnr)
        return [
            {"psnr": p, "ssim": s, "effnet_dist": e, "lpips": lp}
            for p, s, e, lp in zip(psnr, ssim, effnet, lpips)
        ]


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, ratio: int) -> torch.Tensor:
    """Deterministic reconstruction (posterior mode) at one ratio, clamped to ``[-1, 1]``."""
    height, width = images.shape[-2:]
    latents = vae.encode(images, ratio).latent_dist.mode()
    return vae.decode(latents, ratio, output_size=(height, width)).sample.clamp(-1, 1)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_dataset(
    samples: Iterable[EvalSample],
    vae,
    settings: EvalSettings,
    measurers: Measurers,
    scorer=None,
    cache_dir: str | os.PathLike | None = None,
    total: int | None = None,
    keep_images_per_domain: int = 0,
    progress: bool = True,
    cached_only: bool = False,
) -> tuple[list[ImageResult], dict[str, list]]:
    """Measure every sample (see the module docstring); reuse cached results.

    Args:
        samples: the images (any iterable; consumed once, so hub streams work).
        vae: a NestedVAE (``encode(x, ratio)`` / ``decode(z, ratio, output_size)``), in eval mode;
            None with ``settings.ratios == ()`` fills only the model-independent caches (original
            features, JPEG and caption scores), e.g. while a checkpoint is still training.
        settings: what to measure.
        measurers: the loaded metric networks.
        scorer: a router scorer (``score(list[str])``), or None to score by JPEG bpp only. Caption
            scores are cached by the router itself (``load_scorer(..., cache_path=...)``).
        cache_dir: root of the per-image cache (default :func:`default_cache_dir`).
        total: number of samples, for the progress bar.
        keep_images_per_domain: keep this many prepared images per domain (for the report grid).
        progress: show a tqdm progress bar.
        cached_only: measure nothing; return only the images whose results are all cached
            (a report from a partial run; the report says how many images it covers).

    Returns:
        (results in sample order, {domain: [(id, PIL image), ...]} kept images).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if vae is None and settings.ratios:
        raise ValueError("evaluate_dataset needs a VAE unless settings.ratios is empty")
    model_cache, original_cache = _caches(root, vae, settings, measurers)
    results: list[ImageResult] = []
    kept: dict[str, list] = {}
    bar = tqdm(total=total, desc="images", unit="img", disable=not progress)
    for batch in _batches(samples, settings.batch_size):
        cached_recon, cached_original = _lookup(batch, settings, model_cache, original_cache)
        if cached_only:
            bar.update(len(batch))
            batch, cached_recon, cached_original = _only_cached(batch, cached_recon, cached_original)
            if not batch:
                continue
        wanted_kept = [len(kept.get(s.domain, [])) < keep_images_per_domain for s in batch]
        needs_pixels = [
            r is None or o is None or keep for r, o, keep in zip(cached_recon, cached_original, wanted_kept)
        ]
        images = {s.id: s.image(settings.size) for s, need in zip(batch, needs_pixels) if need}
        for sample, keep in zip(batch, wanted_kept):
            if keep:
                kept.setdefault(sample.domain, []).append((sample.id, images[sample.id]))
        _fill_originals(batch, images, cached_original, measurers, settings, original_cache)
        _fill_reconstructions(batch, images, cached_recon, vae, measurers, settings, model_cache)
        results += _image_results(batch, cached_recon, cached_original, scorer)
        if not cached_only:
            bar.update(len(batch))
    bar.close()
    return results, kept


def _caches(root: Path, vae, settings: EvalSettings, measurers: Measurers) -> tuple[ResultCache, ResultCache]:
    """(model-dependent cache, model-independent cache), keyed by what their entries depend on."""
    fid_tag = "fid" if measurers.inception is not None else "nofid"
    metric_tag = (
        f"e{int(measurers.effnet is not None)}l{int(bool(measurers.lpips and measurers.lpips.available))}"
    )
    model_key = model_fingerprint(vae)[:16] if vae is not None else "none"
    model_cache = ResultCache(root, f"recon-{model_key}-s{settings.size}-{fid_tag}-{metric_tag}")
    original_cache = ResultCache(root, f"original-s{settings.size}-{fid_tag}")
    return model_cache, original_cache


def _lookup(batch, settings: EvalSettings, model_cache: ResultCache, original_cache: ResultCache):
    """Cached entries of a batch (None where missing): (reconstructions, originals)."""
    cached_recon = [model_cache.get(s.id) for s in batch]
    # An entry from a run with fewer ratios is recomputed rather than mixed.
    cached_recon = [r if r and set(settings.ratios) <= set(r["metrics"]) else None for r in cached_recon]
    if not settings.ratios:
        cached_recon = [{"metrics": {}, "features": {}} for _ in batch]
    return cached_recon, [original_cache.get(s.id) for s in batch]


def _only_cached(batch, cached_recon, cached_original):
    """The items of a batch whose results are all cached (``cached_only``)."""
    keep = [r is not None and o is not None for r, o in zip(cached_recon, cached_original)]
    return tuple(
        [item for item, k in zip(column, keep) if k] for column in (batch, cached_recon, cached_original)
    )


def _fill_originals(batch, images, cached_original, measurers, settings, original_cache) -> None:
    """Model-independent: JPEG score and original Inception features of the uncached items."""
    todo = [i for i, o in enumerate(cached_original) if o is None]
    if not todo:
        return
    tensors = torch.stack([pil_to_tensor(images[batch[i].id]) for i in todo]).to(settings.device)
    features = measurers.features(tensors)
    for row, i in enumerate(todo):
        image = images[batch[i].id]
        entry = {
            "jpeg_bpp": jpeg_bits_per_pixel(image),
            "jpeg_score": image_complexity_score(image).score,
            "features": features[row].clone() if features is not None else None,
        }
        original_cache.put(batch[i].id, entry)
        cached_original[i] = entry


def _fill_reconstructions(batch, images, cached_recon, vae, measurers, settings, model_cache) -> None:
    """Model-dependent: reconstructions at every ratio, their metrics and features."""
    todo = [i for i, r in enumerate(cached_recon) if r is None]
    if not todo:
        return
    tensors = torch.stack([pil_to_tensor(images[batch[i].id]) for i in todo]).to(settings.device)
    per_image = [{"metrics": {}, "features": {}} for _ in todo]
    for ratio in settings.ratios:
        recon = reconstruct(vae, tensors, ratio)
        compared = measurers.compare(recon, tensors)
        features = measurers.features(recon)
        for row in range(len(todo)):
            per_image[row]["metrics"][ratio] = compared[row]
            if features is not None:
                per_image[row]["features"][ratio] = features[row].clone()
    for row, i in enumerate(todo):
        model_cache.put(batch[i].id, per_image[row])
        cached_recon[i] = per_image[row]


def _image_results(batch, cached_recon, cached_original, scorer) -> list[ImageResult]:
    """Assemble a batch's :class:`ImageResult` s (caption scores in one router call)."""
    captioned = [s.caption for s in batch if s.caption]
    scored = scorer.score(captioned) if scorer is not None and captioned else []
    caption_scores = iter(score.to_dict() for score in scored)
    results = []
    for sample, recon, original in zip(batch, cached_recon, cached_original):
        features = dict(recon["features"])
        if original["features"] is not None:
            features["original"] = original["features"]
        results.append(
            ImageResult(
                id=sample.id,
                domain=sample.domain,
                caption=sample.caption,
                metrics={int(r): m for r, m in recon["metrics"].items()},
                features=features,
                jpeg_bpp=float(original["jpeg_bpp"]),
                jpeg_score=float(original["jpeg_score"]),
                caption_score=next(caption_scores) if (sample.caption and scorer is not None) else None,
            )
        )
    return results
