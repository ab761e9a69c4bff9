"""Route targets and the routing benchmark: `cat-bench route-targets` end to end on real devset
images with the tiny random NestedVAE (its numbers mean nothing; the file must agree with direct
measurements), and the head fit / routing arithmetic on tables whose answer is known."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from eval.bench_routing import evaluate, quality_target_routing, score_routing
from eval.cli import main
from eval.fit_router_head import best_thresholds, fit_head, route_levels
from eval.oracle import COARSE_FIRST, Frontier
from eval.route_targets import load_route_targets
from eval.routing_data import RoutingTable
from router.image_features import IMAGE_FEATURE_NAMES

TOKENS = np.array([64.0, 256.0, 1024.0])  # 32x, 16x, 8x at 256^2


def test_route_targets_end_to_end(tmp_path, devset_dir, devset_sample, tiny_vae_dir, caplog):
    records = [{**r, "image": str(devset_dir / r["image"])} for r in devset_sample[:3]]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    split = {"train": [records[0]["image"], records[1]["image"]], "heldout": [records[2]["image"]]}
    split["heldout_subset"] = [records[2]["image"]]
    (tmp_path / "split.json").write_text(json.dumps(split))
    argv = [
        "route-targets", "--dataset", str(tmp_path), "--vae", str(tiny_vae_dir), "--size", "64",
        "--split-file", str(tmp_path / "split.json"), "--cache-dir", str(tmp_path / "cache"),
        "--no-progress", "--no-lpips",
    ]  # fmt: skip
    assert main(argv) == 0
    written = tmp_path / "route_targets.json"  # default: beside the split file
    data = load_route_targets(written)
    assert [i["id"] for i in data["images"]] == [r["image"] for r in records]
    assert [i["split"] for i in data["images"]] == ["train", "train", "heldout"]
    assert [i["caption"] for i in data["images"]] == [r["caption"] for r in records]
    first = data["images"][0]
    assert first["gain"]["psnr"] == pytest.approx(
        first["metrics"]["8"]["psnr"] - first["metrics"]["32"]["psnr"]
    )
    assert first["tokens"] == {"8": 64, "16": 16, "32": 4} and "lpips" not in first["gain"]
    # The same measurement as `cat-bench headroom` (shared cache): the model codec's numbers agree.
    headroom_out = tmp_path / "headroom"
    assert main(["headroom", *argv[1:], "--out", str(headroom_out)]) == 0
    rows = json.loads((headroom_out / "results.json").read_text())["images"]
    assert rows[0]["model"] == first["metrics"]

    with caplog.at_level(logging.WARNING):
        load_route_targets(written, weights_sha256="0" * 64)
    assert "re-run `cat-bench route-targets`" in caplog.text
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a cat-route-targets-v1 file"):
        load_route_targets(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------
# Arithmetic on known tables
# --------------------------------------------------------------------------------------------


def _synthetic_table(count: int = 240, seed: int = 0) -> RoutingTable:
    """LPIPS gain set by one caption feature and one image feature; the rest is noise."""
    rng = np.random.default_rng(seed)
    detail = rng.uniform(0, 1, count)
    text_like = rng.integers(0, 2, count).astype(float)
    base = 0.1 + 0.05 * rng.uniform(size=count)
    need = (0.6 * detail + 0.4 * text_like) ** 2  # simple images lose nothing at 32x, complex ones a lot
    lpips = np.stack([base + 0.5 * need, base + 0.3 * need, base + 0.02 * need], axis=1)
    caption_rows = np.concatenate(
        [text_like[:, None] + 0.05 * rng.normal(size=(count, 1)), rng.normal(size=(count, 20))], 1
    )
    image_rows = np.concatenate(
        [
            detail[:, None] + 0.05 * rng.normal(size=(count, 1)),
            rng.normal(size=(count, len(IMAGE_FEATURE_NAMES) - 1)),
        ],
        1,
    )
    splits = np.where(np.arange(count) % 4 == 0, "heldout", "train")
    return RoutingTable(
        ids=[f"img{i}" for i in range(count)],
        domains=np.where(text_like > 0, "text", "photo"),
        splits=splits,
        captions=[f"caption {i}" for i in range(count)],
        quality={"lpips": lpips, "psnr": 30 - 20 * lpips, "ssim": 1 - lpips},
        tokens=np.tile(TOKENS, (count, 1)),
        caption_rows=caption_rows,
        image_rows=image_rows,
        rule_scores=rng.uniform(1, 9, count),  # a rule that knows nothing
        jpeg_scores=1 + 8 * detail,  # knows the image half
        targets={"size": 256, "checkpoint": {"weights_sha256": "ab" * 32}},
    )


def test_route_levels_and_thresholds_within_budget():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    assert route_levels(scores, 2.0, 4.0).tolist() == [0, 1, 1, 2]
    lpips = np.array([[0.5, 0.3, 0.1]] * 4)
    lpips[0] = [0.2, 0.2, 0.2]  # nothing to gain: must stay coarse
    tokens = np.tile(TOKENS, (4, 1))
    # At 400 mean tokens the best split sends the gainless image to 32x to pay for one 8x.
    low, high = best_thresholds(scores, lpips, tokens, budget=400.0)
    assert route_levels(scores, low, high).tolist() == [0, 1, 1, 2]
    low, high = best_thresholds(scores, lpips, tokens, budget=100.0)  # only 32x fits
    assert route_levels(scores, low, high).tolist() == [0, 0, 0, 0]


def test_score_routing_meets_the_budget_and_orders_by_score():
    rng = np.random.default_rng(0)
    scores = rng.uniform(1, 9, 200)
    tokens = np.tile(TOKENS, (200, 1))
    level = score_routing(scores, 256, budget=256.0, gap=1.0)
    assert abs(tokens[np.arange(200), level].mean() - 256.0) < 15
    assert np.all(np.diff(level[np.argsort(scores)]) >= 0)  # a higher score never gets fewer tokens


def test_quality_target_picks_the_smallest_ratio_meeting_one_target():
    lpips = np.array([[0.1, 0.05, 0.01], [0.5, 0.3, 0.2], [0.3, 0.12, 0.05]])
    tokens = np.tile(TOKENS, (3, 1))
    level = quality_target_routing(lpips, tokens, budget=1024.0)  # everything affordable: strictest target
    assert level.tolist() == [2, 2, 2] or lpips[np.arange(3), level].max() <= 0.2
    level = quality_target_routing(lpips, tokens, budget=(64 + 1024 + 256) / 3)
    assert tokens[np.arange(3), level].mean() <= (64 + 1024 + 256) / 3 + 1e-9
    assert level[0] == 0  # the easy image meets any affordable target at 32x


def test_heads_learn_what_the_table_encodes():
    table = _synthetic_table()
    caption, caption_fit = fit_head(table, "caption")
    hybrid, hybrid_fit = fit_head(table, "hybrid")
    assert caption_fit["oof_spearman_gain_lpips"] > 0.4  # knows the text half only
    assert hybrid_fit["oof_spearman_gain_lpips"] > 0.9 > caption_fit["oof_spearman_gain_lpips"]
    held = table.splits == "heldout"
    predicted = hybrid.predict(table.rows("hybrid")[held])
    assert np.abs(predicted - table.quality["lpips"][held]).mean() < 0.03
    # The fitted thresholds stay within fixed 16x's tokens on out-of-fold scores.
    assert hybrid.policy["low"] <= hybrid.policy["high"]


def test_benchmark_ranks_modes_on_a_known_table():
    table = _synthetic_table()
    results = evaluate(table)
    modes = results["modes"]
    budget = results["budget_mean_tokens"]
    for name, entry in modes.items():
        assert entry["groups"]["all"]["mode"]["tokens"] <= budget * 1.1, name
    oracle_lpips = results["oracle_per_metric"]["lpips"]
    rows = np.flatnonzero(table.splits == "heldout")
    best = Frontier(-table.quality["lpips"][rows], table.tokens[rows]).allocate(budget)
    assert oracle_lpips == pytest.approx(table.quality["lpips"][rows, best].mean())
    assert modes["quality (measured)"]["capture"]["lpips"] > 0.5
    assert modes["hybrid head"]["capture"]["lpips"] > modes["caption rule"]["capture"]["lpips"]
    assert modes["hybrid head"]["spearman"]["all"]["lpips"] > 0.8
    assert abs(modes["caption rule"]["spearman"]["all"]["lpips"]) < 0.35  # random scores
    assert modes["oracle (LPIPS)"]["capture"]["lpips"] == pytest.approx(1.0)
    assert set(modes["hybrid head"]["groups"]) == {"all", "domain:text", "domain:photo"}
    fixed16 = COARSE_FIRST.index(16)
    assert results["fixed16"]["lpips"] == pytest.approx(table.quality["lpips"][rows, fixed16].mean())
