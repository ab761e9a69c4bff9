"""Transformers backend on a tiny random Llama: real tokenizer, chat template, KV cache, padding."""

from __future__ import annotations

import json
import math

import pytest
import torch

from router import transformers_backend
from router.cache import CachedScorer, ScoreCache
from router.scores import (
    ANSWERS,
    FLAG_QUERIES,
    QUERIES,
    CombinationRule,
    ComplexityScore,
    PromptTokens,
    build_prompt_parts,
    make_score,
)
from router.transformers_backend import TransformersScorer, answer_distribution

CAPTIONS = [
    "a plain blue sky",
    "a detailed bar chart with twelve labelled categories and a dense legend",
    "a portrait of a smiling woman",
    "a page of printed text with small letters and a street market crowded with people",
    "a red apple",
]


def test_distribution_sums_to_one_and_rating_is_its_mean(tiny_scorer):
    for score in tiny_scorer.score(CAPTIONS):
        assert isinstance(score, ComplexityScore)
        assert len(score.distribution) == 9
        assert math.isclose(sum(score.distribution), 1.0, abs_tol=1e-6)
        assert score.rating == pytest.approx(sum((i + 1) * p for i, p in enumerate(score.distribution)))
        assert 1.0 <= score.score <= 9.0
        assert set(score.flags) == set(FLAG_QUERIES)
        assert all(0.0 <= p <= 1.0 for p in score.flags.values())
        assert score.source == "caption_llm"


def test_batched_scores_equal_one_by_one(tiny_scorer):
    batched = tiny_scorer.score(CAPTIONS)  # batch_size 4: one padded batch of 4 + a batch of 1
    one_by_one = [tiny_scorer.score([caption])[0] for caption in CAPTIONS]
    for a, b in zip(batched, one_by_one):
        assert a.distribution == pytest.approx(b.distribution, abs=1e-5)
        assert a.flags == pytest.approx(b.flags, abs=1e-5)
    # The captions really differ, so this also checks results come back in input order.
    ratings = [s.rating for s in batched]
    assert len({round(r, 6) for r in ratings}) == len(ratings)


def test_cached_prefix_equals_a_plain_forward_of_the_whole_prompt(tiny_scorer):
    """The prefix-cache + 4D-mask pass gives the same answer probabilities as the full prompt."""
    prompt = tiny_scorer.prompt
    scores = tiny_scorer.score(CAPTIONS[:2])
    for caption, score in zip(CAPTIONS[:2], scores):
        for query in prompt.queries:
            ids = torch.tensor([prompt.full_prompt_ids(caption, query)])
            with torch.inference_mode():
                logits = tiny_scorer.model(input_ids=ids).logits[:, -1].float()
            reference = answer_distribution(logits, prompt.answer_ids(query))[0]
            raw = score.raw_flags
            got = score.distribution if query == "complexity" else [raw[query], 1 - raw[query]]
            assert reference.tolist() == pytest.approx(got, abs=1e-5)


def test_prompt_puts_instruction_first_and_caption_last(tiny_scorer):
    parts = build_prompt_parts(tiny_scorer.tokenizer)
    assert "<|im_start|>user" in parts.prefix  # the chat template was applied
    assert "visually complex" in parts.prefix
    assert parts.caption_suffix.endswith("<|im_start|>assistant\n")
    # Per query only a short answer key follows the caption; the questions are in the shared prefix.
    assert parts.answer_keys == QUERIES
    assert all(f"{key} " in parts.prefix for key in QUERIES.values())  # every key has worked examples
    # The caption is the only thing between the shared prefix and the per-query part.
    assert parts.full_text("XYZ", "faces") == parts.prefix + "XYZ" + parts.caption_suffix + "face:"


def test_answer_tokens_are_single_distinct_tokens(tiny_scorer):
    prompt = PromptTokens(tiny_scorer.tokenizer)
    for query in prompt.queries:
        flat = [t for ids in prompt.answer_ids(query) for t in ids]
        assert len(flat) == len(set(flat))
        assert len(prompt.answer_ids(query)) == len(ANSWERS[query])
    # The text flag is read as "opening quote" (the model starts copying quoted words) vs "no".
    assert prompt.answer_ids("text")[0] == [prompt.encode('"')[0]] + [
        ids[0] for ids in [prompt.encode(' "')] if len(ids) == 1
    ]


def test_empty_caption_is_rejected_with_a_pointer_to_the_fallback(tiny_scorer):
    with pytest.raises(ValueError, match="image_complexity_score"):
        tiny_scorer.score(["a cat", "   "])
    with pytest.raises(TypeError):
        tiny_scorer.score("a cat")


def test_combination_rule_lifts_by_flags():
    rule = CombinationRule(flag_lifts={"text": 2.0, "faces": 1.0}, flag_calibration={})
    assert rule.combine(4.0, {"text": 0.5, "faces": 1.0, "charts": 1.0}) == pytest.approx(6.0)
    assert rule.combine(8.5, {"text": 1.0}) == 9.0  # clipped
    assert CombinationRule(flag_lifts={}).combine(3.3, {"text": 1.0}) == pytest.approx(3.3)


def test_combination_rule_calibrates_flags_in_log_odds():
    rule = CombinationRule(flag_lifts={"text": 2.0}, flag_calibration={"text": (2.0, -1.0)})
    # logit(0.5) = 0 -> sigmoid(-1); logit(0.75) = ln 3 -> sigmoid(2 ln 3 - 1)
    assert rule.calibrate_flags({"text": 0.5})["text"] == pytest.approx(1 / (1 + math.e))
    assert rule.calibrate_flags({"text": 0.75})["text"] == pytest.approx(
        1 / (1 + math.exp(1 - 2 * math.log(3)))
    )
    assert rule.calibrate_flags({"faces": 0.3}) == {"faces": 0.3}  # not listed: used raw
    assert rule.combine(4.0, {"text": 0.5}) == pytest.approx(4.0 + 2.0 / (1 + math.e))
    assert CombinationRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


def test_scores_report_calibrated_and_raw_flags(tiny_scorer):
    rule = CombinationRule(flag_calibration={"faces": (1.0, 3.0)})
    score = make_score([1 / 9] * 9, {"text": 0.2, "faces": 0.5, "charts": 0.9}, rule)
    assert score.raw_flags == {"text": 0.2, "faces": 0.5, "charts": 0.9}
    assert score.flags["faces"] == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert score.flags["text"] == 0.2
    assert ComplexityScore.from_dict(score.to_dict()) == score


def test_cache_hits_skip_the_model(tiny_scorer, tmp_path):
    cache_file = tmp_path / "scores.sqlite"
    cached = CachedScorer(tiny_scorer, cache_file)
    calls_before = tiny_scorer.forward_calls
    first = cached.score(CAPTIONS[:3])
    calls_after_first = tiny_scorer.forward_calls
    assert calls_after_first > calls_before

    again = CachedScorer(tiny_scorer, cache_file).score(CAPTIONS[:3])  # a re-run: new wrapper, same file
    assert tiny_scorer.forward_calls == calls_after_first
    assert [s.to_dict() for s in again] == [s.to_dict() for s in first]

    cached.score(CAPTIONS[:4])  # one new caption: scored once, the others come from the cache
    assert tiny_scorer.forward_calls == calls_after_first + 1
    assert cached.misses == 4 and cached.hits == 3
    assert len(ScoreCache(cache_file)) == 4


def test_cache_keeps_scores_of_other_numerics_apart(tiny_scorer, tiny_llama_dir, tmp_path):
    cache_file = tmp_path / "scores.sqlite"
    CachedScorer(tiny_scorer, cache_file).score(CAPTIONS[:2])
    bf16 = TransformersScorer.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16, batch_size=4)
    assert (tiny_scorer.numerics, bf16.numerics) == (
        "transformers:torch.float32",
        "transformers:torch.bfloat16",
    )
    cached_bf16 = CachedScorer(bf16, cache_file)
    scores = cached_bf16.score(CAPTIONS[:2])
    assert cached_bf16.misses == 2 and cached_bf16.hits == 0  # fp32 rows are not handed to bf16
    assert [s.to_dict() for s in scores] == [s.to_dict() for s in bf16.score(CAPTIONS[:2])]
    assert len(ScoreCache(cache_file)) == 4


def test_cpu_default_dtype_is_float32_on_every_cpu_kind(tiny_llama_dir):
    # The default no longer consults the CPU: on a CPU with native bf16 (the development machines
    # have it) the old default was bf16, and such a machine routed differently from an AVX2 one.
    assert transformers_backend.default_dtype(torch.device("cpu")) == torch.float32
    loaded = TransformersScorer.from_pretrained(tiny_llama_dir, device="cpu", batch_size=4)
    assert loaded.dtype == torch.float32 and loaded.numerics == "transformers:torch.float32"


def test_cache_is_keyed_by_model_id(tiny_scorer, tmp_path):
    cache = ScoreCache(tmp_path / "scores.sqlite")
    cache.put_many("model-a", {"a cat": ([1 / 9] * 9, {"text": 0.5})})
    assert cache.get_many("model-b", ["a cat"]) == {}
    assert "a cat" in cache.get_many("model-a", ["a cat"])


def test_not_a_cache_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "scores.sqlite"
    bad.write_text("not sqlite" * 200)
    with pytest.raises(ValueError, match="scores.sqlite"):
        ScoreCache(bad)
