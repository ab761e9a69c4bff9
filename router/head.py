"""A fitted router head: from the LLM's view of a caption (and cheap image features) to token value.

The hand-made :class:`~router.scores.CombinationRule` orders captions by "is this a
perception-sensitive domain", which is not where a given VAE gains from more tokens. A head is a
linear (ridge) model fitted to what the VAE itself measured (``cat-bench route-targets``):

    features  = [LLM hidden state at each answer key | rating, digit distribution, flag log-odds]
                (+ :data:`router.image_features.IMAGE_FEATURE_NAMES` for a ``hybrid`` head)
    predicted = ((features - mean) / scale) @ coef + intercept      # LPIPS at 32x, 16x, 8x

The routing score is the predicted LPIPS gain from 32x to 8x mapped linearly onto 1..9
(``score_range``: the train predictions' 2nd and 98th percentiles), so thresholds, budgets and
``RoutingPolicy.calibrate`` work unchanged; ``policy`` holds the thresholds fitted with it.

A head belongs to ONE VAE checkpoint (``fitted_to["vae_weights_sha256"]``) and one router model,
prompt and numerics; ``cat-tokenize`` warns when they differ. It is fitted by
``python -m eval.fit_router_head`` (scikit-learn, cross-validated) and stored as
``router_head.safetensors`` (arrays) + ``router_head.json`` (everything else); applying it needs
only numpy.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cat_foundations.atomic import atomic_write_json
from router.image_features import IMAGE_FEATURE_NAMES, image_features
from router.scores import FLAG_QUERIES, expected_rating, logit

FORMAT = "cat-router-head-v1"
KINDS = ("caption", "hybrid")
PREDICTED_RATIOS = (32, 16, 8)  # columns of coef: predicted LPIPS at each ratio, coarse first
SOURCE_CAPTION_HEAD = "caption_head"
SOURCE_HYBRID_HEAD = "hybrid_head"
ARRAY_FILE, META_FILE = "router_head.safetensors", "router_head.json"


def caption_features(raw: tuple[Sequence[float], Mapping[str, float]], states: Sequence[float]) -> np.ndarray:
    """The caption part of a head's input: hidden states, rating, digit distribution, flag log-odds."""
    distribution, flags = raw
    summary = [expected_rating(distribution), *distribution, *(logit(flags[name]) for name in FLAG_QUERIES)]
    return np.concatenate([np.asarray(states, dtype=np.float64), np.asarray(summary, dtype=np.float64)])


@dataclass
class RouterHead:
    """A fitted ridge head (see the module docstring).

    Args:
        kind: ``"caption"`` (caption features only) or ``"hybrid"`` (+ image features).
        mean: ``(F,)`` feature means of the train split.
        scale: ``(F,)`` feature standard deviations of the train split (zeros replaced by 1).
        coef: ``(F, 3)`` weights for predicted LPIPS at 32x, 16x and 8x.
        intercept: ``(3,)``.
        score_range: predicted gains mapped to scores 1 and 9.
        policy: ``{"low", "high"}`` thresholds on the score fitted with the head.
        fitted_to: provenance: ``vae_weights_sha256``, ``router_model_id``, ``router_numerics``,
            ``prompt_version``, ``image_side``, the targets file, cross-validated quality.
    """

    kind: str
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    score_range: tuple[float, float]
    policy: dict = field(default_factory=lambda: {"low": 4.0, "high": 6.0})
    fitted_to: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"head kind must be one of {KINDS}, got {self.kind!r}")
        features = self.mean.shape[0]
        if self.scale.shape != (features,) or self.coef.shape != (features, len(PREDICTED_RATIOS)):
            raise ValueError(
                f"inconsistent head arrays: mean {self.mean.shape}, scale {self.scale.shape}, coef {self.coef.shape}"
            )
        low, high = self.score_range
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"score_range needs low < high, got {self.score_range}")

    @property
    def needs_image(self) -> bool:
        return self.kind == "hybrid"

    @property
    def digest(self) -> str:
        """Hash of the fitted numbers: names this head in score caches and manifests."""
        hasher = hashlib.sha256(self.kind.encode())
        for array in (self.mean, self.scale, self.coef, self.intercept):
            hasher.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
        return hasher.hexdigest()[:16]

    def features(self, raw, states, image=None) -> np.ndarray:
        """The head's input row for one caption (and, for a hybrid head, its image)."""
        row = caption_features(raw, states)
        if self.needs_image:
            if image is None:
                raise ValueError(
                    "a hybrid router head needs the image; use a caption head for captions alone"
                )
            row = np.concatenate([row, image_features(image, self.fitted_to.get("image_side", 256))])
        if row.shape[0] != self.mean.shape[0]:
            raise ValueError(
                f"the head expects {self.mean.shape[0]} features, got {row.shape[0]}: it was fitted with "
                f"another router model ({self.fitted_to.get('router_model_id')})"
            )
        return row

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Predicted LPIPS ``(N, 3)`` at 32x, 16x, 8x for feature rows ``(N, F)``."""
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        return ((rows - self.mean) / self.scale) @ self.coef + self.intercept

    def score(self, predicted: np.ndarray) -> np.ndarray:
        """Routing scores in [1, 9] from predictions ``(N, 3)``: the predicted 32x -> 8x gain, rescaled."""
        gain = predicted[:, 0] - predicted[:, 2]
        low, high = self.score_range
        return np.clip(1.0 + 8.0 * (gain - low) / (high - low), 1.0, 9.0)

    # ---- persistence -------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept}
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, directory / ARRAY_FILE
        )
        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "digest": self.digest,
            "score_range": list(self.score_range),
            "policy": dict(self.policy),
            "predicted_ratios": list(PREDICTED_RATIOS),
            "image_features": list(IMAGE_FEATURE_NAMES) if self.needs_image else [],
            "fitted_to": self.fitted_to,
        }
        atomic_write_json(directory / META_FILE, meta)

    @classmethod
    def load(cls, directory: str | Path) -> RouterHead:
        """Read a head written by :meth:`save` (a directory holding router_head.json + .safetensors)."""
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta_path, array_path = directory / META_FILE, directory / ARRAY_FILE
        try:
            meta = json.loads(meta_path.read_text())
            arrays = load_file(str(array_path))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{directory}: cannot read a router head ({error}); fit one with `python -m eval.fit_router_head`"
            ) from error
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not a {FORMAT} file")
        if meta.get("image_features", []) not in ([], list(IMAGE_FEATURE_NAMES)):
            raise ValueError(
                f"{meta_path}: fitted with other image features than this version computes; refit it"
            )
        return cls(
            kind=meta["kind"],
            mean=arrays["mean"],
            scale=arrays["scale"],
            coef=arrays["coef"],
            intercept=arrays["intercept"],
            score_range=(float(meta["score_range"][0]), float(meta["score_range"][1])),
            policy={k: float(v) for k, v in meta["policy"].items()},
            fitted_to=dict(meta.get("fitted_to", {})),
        )
