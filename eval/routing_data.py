"""Everything a router is fitted and judged on, per image, in one table.

:func:`load_routing_table` joins a ``route_targets.json`` (the VAE's measured quality at every
ratio, :mod:`eval.route_targets`) with what each router mode reads: the caption LLM's raw score
and hidden states at the answer keys (one forward pass per batch, cached under the bench cache
by model, numerics and prompt version), the JPEG bits-per-pixel fallback score and the cheap
image features of :mod:`router.image_features` -- all on the image exactly as it was measured
(the evaluation protocol's center crop at the targets' size).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cat_foundations.atomic import atomic_write_bytes
from eval.datasets import iter_samples
from eval.engine import default_cache_dir
from eval.oracle import COARSE_FIRST
from router.cache import cache_key
from router.fallback import image_complexity_score
from router.head import caption_features
from router.image_features import image_features
from router.scores import PROMPT_VERSION, cleaned_captions, make_score

METRICS = ("lpips", "psnr", "ssim")


@dataclass
class RoutingTable:
    """Per image (rows in the targets file's order); quality arrays are ``(N, 3)`` coarse first (32, 16, 8).

    Attributes:
        ids, domains, splits, captions: per image.
        quality: metric name -> ``(N, 3)`` measured values.
        tokens: ``(N, 3)`` tokens at the measured size.
        caption_rows: ``(N, F)`` caption features (:func:`router.head.caption_features`).
        image_rows: ``(N, len(IMAGE_FEATURE_NAMES))``.
        rule_scores: the default rule's final score per caption.
        jpeg_scores: the JPEG bits-per-pixel fallback score per image.
        targets: the route_targets.json it came from (provenance).
    """

    ids: list[str]
    domains: np.ndarray
    splits: np.ndarray
    captions: list[str]
    quality: dict[str, np.ndarray]
    tokens: np.ndarray
    caption_rows: np.ndarray
    image_rows: np.ndarray
    rule_scores: np.ndarray
    jpeg_scores: np.ndarray
    targets: dict

    def rows(self, kind: str) -> np.ndarray:
        """Head input rows: ``"caption"``, ``"image"`` or ``"hybrid"`` (caption then image)."""
        if kind == "caption":
            return self.caption_rows
        if kind == "image":
            return self.image_rows
        return np.concatenate([self.caption_rows, self.image_rows], axis=1)

    def subset(self, rows: np.ndarray) -> RoutingTable:
        """The table of the images at ``rows`` (same provenance)."""
        return replace(
            self,
            ids=[self.ids[i] for i in rows],
            domains=self.domains[rows],
            splits=self.splits[rows],
            captions=[self.captions[i] for i in rows],
            quality={metric: values[rows] for metric, values in self.quality.items()},
            tokens=self.tokens[rows],
            caption_rows=self.caption_rows[rows],
            image_rows=self.image_rows[rows],
            rule_scores=self.rule_scores[rows],
            jpeg_scores=self.jpeg_scores[rows],
        )

    def gain(self, metric: str = "lpips") -> np.ndarray:
        """Quality gained from 32x to 8x (positive = tokens help)."""
        values = self.quality[metric]
        return values[:, 0] - values[:, 2] if metric == "lpips" else values[:, 2] - values[:, 0]


def _caption_states(scorer, captions: list[str], cache_dir: Path) -> list:
    """``scorer.score_raw_with_states`` for every caption, cached as one .npz per caption list."""
    key = hashlib.sha256("\n".join([cache_key(scorer), PROMPT_VERSION, *captions]).encode()).hexdigest()[:20]
    path = cache_dir / "router-states" / f"{key}.npz"
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        flags = [dict(zip(data["flag_names"].tolist(), row)) for row in data["flags"].tolist()]
        return [
            ((dist, flag), states) for dist, flag, states in zip(data["dist"].tolist(), flags, data["states"])
        ]
    results = scorer.score_raw_with_states(cleaned_captions(captions))  # as score() cleans
    names = sorted(results[0][0][1])
    buffer = io.BytesIO()
    np.savez(
        buffer,
        dist=np.array([raw[0] for raw, _ in results]),
        flags=np.array([[raw[1][n] for n in names] for raw, _ in results]),
        flag_names=np.array(names),
        states=np.array([states for _, states in results], dtype=np.float32),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return results


def load_routing_table(
    targets: dict, dataset: str, scorer, cache_dir: str | Path | None = None
) -> RoutingTable:
    """Join the measured targets with every mode's inputs (see the module docstring).

    Args:
        targets: a loaded route_targets.json (:func:`eval.route_targets.load_route_targets`).
        dataset: the dataset it was measured on (images and captions are read from it).
        scorer: a transformers :class:`router.transformers_backend.TransformersScorer` (hidden states).
        cache_dir: bench cache root (default :func:`eval.engine.default_cache_dir`).
    """
    images = targets["images"]
    samples = {sample.id: sample for sample in iter_samples(dataset)}
    missing = [image["id"] for image in images if image["id"] not in samples]
    if missing:
        raise ValueError(f"{len(missing)} images of the targets are not in {dataset}, e.g. {missing[:3]}")
    if any(not image.get("caption") for image in images):
        raise ValueError(
            "every image needs a caption to compare caption routing (the targets have some without)"
        )
    captions = [image["caption"] for image in images]
    raw_states = _caption_states(scorer, captions, Path(cache_dir) if cache_dir else default_cache_dir())
    size = int(targets["size"])
    pixels = [samples[image["id"]].image(size) for image in images]
    return RoutingTable(
        ids=[image["id"] for image in images],
        domains=np.array([image["domain"] for image in images]),
        splits=np.array([str(image["split"]) for image in images]),
        captions=captions,
        quality={
            metric: np.array(
                [[image["metrics"][str(r)][metric] for r in COARSE_FIRST] for image in images], float
            )
            for metric in METRICS
        },
        tokens=np.array([[image["tokens"][str(r)] for r in COARSE_FIRST] for image in images], dtype=float),
        caption_rows=np.array([caption_features(raw, states) for raw, states in raw_states]),
        image_rows=np.array([image_features(image, size) for image in pixels]),
        rule_scores=np.array([make_score(*raw, scorer.rule).score for raw, _ in raw_states]),
        jpeg_scores=np.array([image_complexity_score(image).score for image in pixels]),
        targets=targets,
    )
