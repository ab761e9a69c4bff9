"""Reading cat-tokenize output and the per-ratio latent statistics stored with it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cat_foundations.ratios import latent_size
from cat_generation.data import assign_labels, read_tokens
from cat_generation.stats import MIN_STD, STATS_FILE, LatentStats, compute_stats, load_or_compute_stats
from cat_tokenizer.store import read_jsonl


def test_items_carry_ratio_shape_caption_and_score_of_the_manifest(tiny_tokens):
    items = read_tokens(tiny_tokens)
    manifest = {r["id"]: r for r in read_jsonl(tiny_tokens / "manifest.jsonl")}
    assert sorted(item.id for item in items) == sorted(manifest)
    for item in items:
        record = manifest[item.id]
        assert item.ratio == record["ratio"]
        assert list(item.latent.shape) == record["latent_shape"]
        assert item.latent.shape[1:] == latent_size(*item.size, item.ratio)
        assert item.tokens == record["tokens"]
        assert item.caption == record["caption"]
        assert item.score == pytest.approx(record["score"])


def test_an_empty_folder_is_refused_with_a_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="run cat-tokenize first"):
        read_tokens(tmp_path)


def test_labels_from_the_file_name_prefix(tiny_tokens):
    items, names = assign_labels(read_tokens(tiny_tokens), "prefix")
    assert names == ["busy", "simple"]
    assert all(names[item.label] == item.id.split("_")[0] for item in items)
    with pytest.raises(ValueError, match="not among the known labels"):
        assign_labels(items, "prefix", names=["busy"])


def test_normalised_latents_have_zero_mean_unit_std_per_ratio_and_channel(tiny_tokens):
    items = read_tokens(tiny_tokens)
    stats = compute_stats(items)
    assert sorted(stats.per_ratio) == [8, 16, 32]
    for ratio in stats.per_ratio:
        normalised = torch.cat(
            [stats.normalize(i.latent, ratio).flatten(1) for i in items if i.ratio == ratio], dim=1
        )
        assert torch.allclose(normalised.mean(dim=1), torch.zeros(normalised.shape[0]), atol=1e-5)
        # A channel the (random, tiny) VAE leaves constant stays 0 instead of dividing by zero.
        expected_std = (stats.of(ratio).std > MIN_STD).float()
        assert torch.allclose(normalised.std(dim=1, correction=0), expected_std, atol=1e-4)
        latent = items[[i.ratio for i in items].index(ratio)].latent
        assert torch.allclose(stats.denormalize(stats.normalize(latent, ratio), ratio), latent, atol=1e-5)


def test_stats_are_computed_and_saved_when_absent(tiny_tokens, tmp_path):
    tokens = tmp_path / "tokens"
    shutil.copytree(tiny_tokens, tokens)
    (tokens / STATS_FILE).unlink(missing_ok=True)
    items = read_tokens(tokens)
    computed = load_or_compute_stats(tokens, items)
    saved = json.loads((tokens / STATS_FILE).read_text())["ratios"]
    assert sorted(saved) == ["16", "32", "8"]
    assert saved["8"]["mean"] == pytest.approx(computed.of(8).mean.tolist())
    assert saved["8"]["positions"] == sum(i.tokens for i in items if i.ratio == 8)


@pytest.mark.parametrize("wrapped", [True, False], ids=["cat-tokenize layout", "flat"])
def test_a_stats_file_written_by_the_tokenizer_wins_over_computing(tiny_tokens, tmp_path, wrapped):
    tokens = tmp_path / "tokens"
    shutil.copytree(tiny_tokens, tokens)
    items = read_tokens(tokens)
    channels = items[0].latent.shape[0]
    entry = {
        "images": 3,
        "positions": 72,
        "mean": [1.0] * channels,
        "std": [2.0] * channels,
        "channels": channels,
    }
    theirs = {"format": "cat-tokenizer-latent-stats-v1", "scaling_factor": 1.0, "ratios": {"16": entry}}
    (tokens / STATS_FILE).write_text(json.dumps(theirs if wrapped else {"16": entry}))
    loaded = load_or_compute_stats(tokens, items)
    assert sorted(loaded.per_ratio) == [16]
    assert loaded.of(16).std.tolist() == [2.0] * channels and loaded.of(16).count == 72
    with pytest.raises(KeyError, match="no latent statistics for ratio 8"):
        loaded.normalize(items[0].latent, 8)


def test_a_malformed_stats_file_names_itself(tmp_path):
    path = tmp_path / STATS_FILE
    path.write_text(json.dumps({"8": {"mean": [0.0, 1.0], "std": [1.0]}}))
    with pytest.raises(ValueError, match="latents_stats.json"):
        LatentStats.load(path)


def test_the_tokenizer_s_own_stats_file_agrees_with_computing_from_the_latents(tiny_tokens):
    written = LatentStats.load(tiny_tokens / STATS_FILE)  # cat-tokenize writes it at the end of a run
    computed = compute_stats(read_tokens(tiny_tokens))
    assert sorted(written.per_ratio) == sorted(computed.per_ratio) == [8, 16, 32]
    for ratio in computed.per_ratio:
        assert torch.allclose(written.of(ratio).mean, computed.of(ratio).mean, atol=1e-5)
        assert torch.allclose(written.of(ratio).std.clamp_min(MIN_STD), computed.of(ratio).std, atol=1e-4)
        assert written.of(ratio).count == computed.of(ratio).count
