"""router: an LLM reads an image caption, scores its visual complexity and picks 8x, 16x or 32x.

Importing this package is light: transformers, torch and vLLM load only when a scorer is built.

    from router import load_scorer, RoutingPolicy
    scorer = load_scorer("default")                  # Qwen2.5-Coder-0.5B-Instruct (see router README)
    scores = scorer.score(["a plain blue sky"])      # list[ComplexityScore]
    ratio = RoutingPolicy().route(scores[0])         # 8, 16 or 32
"""

from __future__ import annotations

from router.fallback import JpegBppCalibration, image_complexity_score
from router.loading import load_scorer as _load_scorer
from router.policy import RoutingDecision, RoutingPolicy, routing_score, tokens_for
from router.scores import PROMPT_VERSION, CombinationRule, ComplexityScore, ComplexityScorer

__all__ = [
    "PROMPT_VERSION",
    "CombinationRule",
    "ComplexityScore",
    "ComplexityScorer",
    "JpegBppCalibration",
    "RoutingDecision",
    "RoutingPolicy",
    "image_complexity_score",
    "load_scorer",
    "routing_score",
    "tokens_for",
]


def load_scorer(model: str = "default", backend: str = "transformers", **kwargs) -> ComplexityScorer:
    """Build a scorer: ``model`` is "default", an HF id, a local directory or a .gguf file.

    Args:
        model: which causal LM reads the captions.
        backend: "transformers" (default, CPU-friendly) or "vllm" (GPU / large datasets).
        **kwargs: passed to the backend (dtype, batch_size, cache_path, rule, ...).
    """
    return _load_scorer(model, backend=backend, **kwargs)
