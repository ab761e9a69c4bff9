"""transformers backend: next-token probabilities from any causal LM, one forward pass per batch.

How a batch is scored (see router.scores for the prompt layout):

1. The instruction prefix is the same for every caption, so its KV cache is computed once when the
   scorer is built and copied into every batch.
2. Each row of a batch is ``[pads] caption caption_suffix key_1 .. key_Q`` where ``key_q`` are the
   short answer keys (``complexity:``, ``text:``, ``face:``, ``chart:``; 2-4 tokens each). Captions are
   left-padded inside their segment so every row ends at the same column.
3. A custom 4D attention mask lets every key block see the prefix, its caption and itself, but not
   the other key blocks or the pads; explicit position ids make each key start right after its
   caption. So all Q queries of all captions come out of ONE forward pass over about
   ``len(caption) + len(caption_suffix) + sum(len(key_q))`` new tokens per caption, and the
   result equals scoring each (caption, query) prompt on its own.
4. Only the last token of each key block goes through the LM head (``logits_to_keep``); the
   answer distribution is the softmax over the candidate tokens (digits 1..9, or a flag's two
   answers), where spelling variants (``"5"``/``" 5"``, ``"yes"``/``" Yes"``...) that are single
   tokens are summed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from router.scores import FLAG_QUERIES, CombinationRule, ComplexityScorer, PromptTokens


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on every CPU; bf16 (fp16 without bf16) on GPUs.

    Not bf16 on CPUs that have it natively, although it is ~3x faster there: bf16 and fp32 scores
    of one caption differ by up to ~0.3, which moved 6 of 120 held-out images to another ratio, so
    the same command would route differently on an AVX-512-BF16 machine and an AVX2 one. In fp32
    two CPU kinds differ only by summation order (~1e-6 in a score), which changes a route only for
    a score that close to a threshold. Pass ``dtype=torch.bfloat16`` (``--router-dtype bfloat16``)
    for the speed; the dtype is recorded in the manifest/index and keys the score cache.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def answer_distribution(logits: torch.Tensor, answer_ids: list[list[int]]) -> torch.Tensor:
    """Softmax over answers, each answer's spellings merged by logsumexp: (batch, n_answers).

    ``logits`` is (batch, vocab) or any tensor indexable by token id on its last axis; tokens
    outside ``answer_ids`` do not matter (the distribution is conditional on answering).
    """
    per_answer = torch.stack([torch.logsumexp(logits[:, ids], dim=-1) for ids in answer_ids], dim=-1)
    return torch.softmax(per_answer, dim=-1)


class TransformersScorer(ComplexityScorer):
    """Caption complexity from a transformers causal LM.

    Args:
        model: a loaded ``AutoModelForCausalLM`` (put in eval mode here).
        tokenizer: its tokenizer (chat template used when present).
        model_id: name used in score caches.
        batch_size: captions per forward pass.
        rule: how rating and flags combine (default :class:`CombinationRule`).
    """

    def __init__(
        self, model, tokenizer, model_id: str, batch_size: int = 32, rule: CombinationRule | None = None
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.batch_size = batch_size
        self.rule = rule or CombinationRule()
        self.prompt = PromptTokens(tokenizer)
        self.forward_calls = 0  # model forward passes over captions (tests and benchmarks read it)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.numerics = f"transformers:{self.dtype}"
        self._prefix_cache = self._compute_prefix_cache()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        gguf_file: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        model_id: str | None = None,
        **kwargs,
    ) -> TransformersScorer:
        """Load an HF id, a local directory, or (with ``gguf_file`` / a path ending in .gguf) a GGUF.

        ``dtype`` defaults to :func:`default_dtype`: fp32 on CPUs (the same routes on every CPU
        kind), bf16/fp16 on GPUs.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(str(name_or_path))
        source = str(name_or_path)
        if gguf_file is None and path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            source, gguf_file = str(path.parent), path.name
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or default_dtype(device)
        load_args = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(source, **load_args)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **load_args).to(device)
        return cls(model, tokenizer, model_id=model_id or str(name_or_path), **kwargs)

    # ---- the forward pass ----------------------------------------------------------------------

    @torch.inference_mode()
    def _compute_prefix_cache(self):
        ids = torch.tensor([self.prompt.prefix_ids], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.past_key_values

    def _batch_inputs(self, caption_ids: list[list[int]]):
        """Input ids, position ids, 4D additive mask and read-out columns for one batch."""
        prefix_len = len(self.prompt.prefix_ids)
        body_len = max(len(ids) for ids in caption_ids) + len(self.prompt.suffix_ids)
        key_lens = [len(k) for k in self.prompt.key_ids]
        new_len = body_len + sum(key_lens)
        batch = len(caption_ids)

        input_ids = torch.full((batch, new_len), self.pad_id, dtype=torch.long)
        position_ids = torch.full((batch, new_len), prefix_len, dtype=torch.long)
        # allowed[b, i, j]: new token i may attend to key/value column j (prefix columns first).
        allowed = torch.zeros((batch, new_len, prefix_len + new_len), dtype=torch.bool)
        allowed[:, :, :prefix_len] = True
        causal = torch.ones((new_len, new_len), dtype=torch.bool).tril()

        for row, ids in enumerate(caption_ids):
            body = ids + self.prompt.suffix_ids
            start = body_len - len(body)  # left padding inside the caption segment
            input_ids[row, start:body_len] = torch.tensor(body)
            position_ids[row, start:body_len] = prefix_len + torch.arange(len(body))
            body_cols = slice(prefix_len + start, prefix_len + body_len)
            allowed[row, start:body_len, body_cols] = causal[start:body_len, start:body_len]
            offset = body_len
            for key, length in zip(self.prompt.key_ids, key_lens):
                block = slice(offset, offset + length)
                input_ids[row, block] = torch.tensor(key)
                position_ids[row, block] = prefix_len + len(body) + torch.arange(length)
                allowed[row, block, body_cols] = True
                allowed[row, block, prefix_len + offset : prefix_len + offset + length] = causal[
                    :length, :length
                ]
                offset += length

        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        read_columns = torch.tensor([body_len + sum(key_lens[: q + 1]) - 1 for q in range(len(key_lens))])
        return input_ids, position_ids, mask[:, None], read_columns

    @torch.inference_mode()
    def _forward_batch(self, caption_ids: list[list[int]], hidden: bool = False):
        """One forward pass: logits ``(batch, n_queries, vocab)`` at the answer keys, and with
        ``hidden`` the last layer's hidden states there, ``(batch, n_queries, hidden_size)``."""
        input_ids, position_ids, mask, read_columns = self._batch_inputs(caption_ids)
        cache = copy.deepcopy(self._prefix_cache)
        cache.batch_repeat_interleave(len(caption_ids))
        out = self.model(
            input_ids=input_ids.to(self.device),
            position_ids=position_ids.to(self.device),
            attention_mask=mask.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=read_columns.to(self.device),
            output_hidden_states=hidden,
        )
        self.forward_calls += 1
        states = out.hidden_states[-1][:, read_columns.to(self.device)].float() if hidden else None
        return out.logits.float(), states

    def _raw_from_logits(self, logits: torch.Tensor) -> list[tuple[list[float], dict[str, float]]]:
        digit_dist = answer_distribution(logits[:, 0], self.prompt.digit_ids)
        flag_dists = [
            answer_distribution(logits[:, q + 1], self.prompt.answer_ids(name))
            for q, name in enumerate(FLAG_QUERIES)
        ]
        results = []
        for row in range(logits.shape[0]):
            flags = {name: float(dist[row, 0]) for name, dist in zip(FLAG_QUERIES, flag_dists)}
            results.append((digit_dist[row].tolist(), flags))
        return results

    def _in_length_order(self, captions: list[str], run_batch) -> list:
        """``run_batch(ids)`` over length-sorted batches (little padding); results in input order."""
        caption_ids = [self.prompt.encode(c) for c in captions]
        order = sorted(range(len(captions)), key=lambda i: len(caption_ids[i]))
        results: list = [None] * len(captions)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for index, result in zip(chunk, run_batch([caption_ids[i] for i in chunk])):
                results[index] = result
        return results

    def score_raw(self, captions: list[str]) -> list[tuple[list[float], dict[str, float]]]:
        return self._in_length_order(captions, lambda ids: self._raw_from_logits(self._forward_batch(ids)[0]))

    def score_raw_with_states(
        self, captions: list[str]
    ) -> list[tuple[tuple[list[float], dict], list[float]]]:
        """Per caption: its raw score and the LM's last hidden state at every answer key, flattened
        (``n_queries * hidden_size`` floats, rating key first) -- what a fitted router head reads.
        Same forward pass as :meth:`score_raw` (captions are not cleaned here, as there)."""

        def run(ids):
            logits, states = self._forward_batch(ids, hidden=True)
            return list(zip(self._raw_from_logits(logits), states.flatten(1).tolist()))

        return self._in_length_order(captions, run)
