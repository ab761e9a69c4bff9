"""A scorer whose final score comes from a fitted :class:`~router.head.RouterHead`.

It runs the same one-pass transformers forward as :class:`TransformersScorer` (the raw rating and
flags are kept, and cached scores of the rule are unaffected), reads the LLM's hidden states at
the answer keys, and replaces the rule's score by the head's: the predicted LPIPS gain from 32x to
8x on the 1..9 scale, with the predicted LPIPS per ratio in ``ComplexityScore.predicted_lpips``.

A ``hybrid`` head also reads cheap image features, so :meth:`HeadScorer.score` takes the images
(PIL images, or zero-argument callables that load one, so pixels load only when needed). Head
scores are not stored in the SQLite score cache: they depend on the head and, for a hybrid head,
on the image, and the forward pass that makes them is the one a cache miss would cost anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from router.head import PREDICTED_RATIOS, SOURCE_CAPTION_HEAD, SOURCE_HYBRID_HEAD, RouterHead
from router.scores import PROMPT_VERSION, ComplexityScorer, cleaned_captions, make_score

logger = logging.getLogger(__name__)


class HeadScorer(ComplexityScorer):
    """Caption (or caption + image) scores from a fitted head on a transformers scorer.

    Args:
        inner: a :class:`router.transformers_backend.TransformersScorer` (it must expose
            ``score_raw_with_states``; the vLLM backend does not return hidden states).
        head: the fitted head, or the directory it was saved to.
    """

    def __init__(self, inner, head: RouterHead | str | Path):
        if not hasattr(inner, "score_raw_with_states"):
            raise ValueError(
                f"a router head needs the transformers backend (hidden states); {type(inner).__name__} has none"
            )
        self.inner = inner
        self.head = head if isinstance(head, RouterHead) else RouterHead.load(head)
        self.model_id = inner.model_id
        self.rule = inner.rule
        self.numerics = f"{inner.numerics} head={self.head.kind}:{self.head.digest}"
        self.source = SOURCE_HYBRID_HEAD if self.head.needs_image else SOURCE_CAPTION_HEAD
        fitted = self.head.fitted_to
        for name, mine, theirs in (
            ("router model", inner.model_id, fitted.get("router_model_id")),
            ("router numerics", inner.numerics, fitted.get("router_numerics")),
            ("prompt version", PROMPT_VERSION, fitted.get("prompt_version")),
        ):
            if theirs is not None and mine != theirs:
                logger.warning(
                    "router head %s was fitted with %s %r, not %r", self.head.digest, name, theirs, mine
                )

    @property
    def needs_image(self) -> bool:
        return self.head.needs_image

    def score_raw(self, captions: list[str]) -> list[tuple[list[float], dict[str, float]]]:
        return self.inner.score_raw(captions)

    def score(self, captions: list[str], images: Sequence | None = None) -> list:
        """Head scores for ``captions`` (and, for a hybrid head, ``images``, one per caption)."""
        cleaned = cleaned_captions(captions)
        if self.needs_image and (images is None or len(images) != len(captions)):
            raise ValueError("a hybrid router head needs one image per caption (score(captions, images=...))")
        results = self.inner.score_raw_with_states(cleaned)
        rows = []
        for index, (raw, states) in enumerate(results):
            image = None
            if self.needs_image:
                image = images[index]() if callable(images[index]) else images[index]
            rows.append(self.head.features(raw, states, image))
        predicted = self.head.predict(np.stack(rows))
        values = self.head.score(predicted)
        scores = []
        for (raw, _), value, lpips in zip(results, values, predicted):
            score = make_score(*raw, self.rule)
            score.score, score.source = float(value), self.source
            score.predicted_lpips = {str(r): float(v) for r, v in zip(PREDICTED_RATIOS, lpips)}
            scores.append(score)
        return scores
