"""RoutingPolicy thresholds, calibration (budget and oracle), JSON round trip, image fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from router import ComplexityScore, RoutingPolicy, image_complexity_score, tokens_for
from router.fallback import JpegBppCalibration, fit_jpeg_bpp_calibration, jpeg_bits_per_pixel


def test_thresholds_map_to_ratios():
    policy = RoutingPolicy(low=4.0, high=6.0)
    assert policy.route(1.0) == 32
    assert policy.route(3.999) == 32
    assert policy.route(4.0) == 16
    assert policy.route(5.9) == 16
    assert policy.route(6.0) == 8
    assert policy.route(ComplexityScore(score=9.0, rating=9.0)) == 8


def test_invalid_thresholds_are_rejected():
    with pytest.raises(ValueError, match="low <= high"):
        RoutingPolicy(low=7.0, high=5.0)


def test_tokens_count_padded_size():
    assert tokens_for(16, 256) == 256
    assert tokens_for(8, 256) == 1024
    assert tokens_for(32, (250, 300)) == 8 * 10  # padded to 256 x 320


@pytest.mark.parametrize("target", [tokens_for(16, 256), 200.0, 600.0])
def test_budget_calibration_hits_the_target_on_synthetic_scores(target):
    rng = np.random.default_rng(0)
    scores = rng.uniform(1, 9, size=2000).tolist()
    policy = RoutingPolicy.calibrate(scores, target_mean_tokens=target, image_size=256)
    mean = policy.mean_tokens(scores, image_size=256)
    # With 2000 distinct scores one image more or less at a threshold moves the mean by < 1 token.
    assert mean == pytest.approx(target, abs=1.0)
    assert policy.high - policy.low == pytest.approx(RoutingPolicy().high - RoutingPolicy().low)


def test_budget_calibration_counts_tokens_at_each_images_own_size():
    rng = np.random.default_rng(2)
    scores = rng.uniform(1, 9, size=400)
    # Big images at the low scores, small ones at the high scores: counting every image at 256 px
    # would put the thresholds far from the budget the encoded sizes spend.
    sides = np.where(scores < 5, 512, 128).tolist()
    sizes = [(side, side + 64) for side in sides]
    target = float(np.mean([tokens_for(16, size) for size in sizes]))
    policy = RoutingPolicy.calibrate(scores.tolist(), target_mean_tokens=target, image_size=sizes)
    spent = np.mean([tokens_for(policy.route(s), size) for s, size in zip(scores, sizes)])
    assert spent == pytest.approx(target, rel=0.01)
    at_256 = RoutingPolicy.calibrate(scores.tolist(), target_mean_tokens=target, image_size=256)
    spent_at_256 = np.mean([tokens_for(at_256.route(s), size) for s, size in zip(scores, sizes)])
    assert abs(spent_at_256 - target) > 0.2 * target  # the old count misses this budget badly


def test_per_image_sizes_must_match_the_scores():
    with pytest.raises(ValueError, match="one per score"):
        RoutingPolicy.calibrate([1.0, 5.0, 7.0], target_mean_tokens=100, image_size=[(64, 64), (64, 64)])


def test_budget_outside_the_reachable_range_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        RoutingPolicy.calibrate([1.0, 5.0], target_mean_tokens=5000, image_size=256)


def test_oracle_calibration_recovers_separable_thresholds():
    rng = np.random.default_rng(1)
    scores = rng.uniform(1, 9, size=300)
    oracle = np.where(scores < 3.7, 32, np.where(scores < 6.2, 16, 8))
    policy = RoutingPolicy.calibrate(scores.tolist(), oracle_ratios=oracle.tolist())
    assert [policy.route(s) for s in scores] == oracle.tolist()
    assert 3.5 < policy.low < 3.9 and 6.0 < policy.high < 6.4


def test_oracle_calibration_with_noise_beats_the_defaults():
    rng = np.random.default_rng(2)
    scores = rng.uniform(1, 9, size=400)
    oracle = np.where(scores < 3.0, 32, np.where(scores < 5.0, 16, 8))
    flip = rng.random(400) < 0.1
    oracle[flip] = rng.choice([8, 16, 32], size=int(flip.sum()))
    fitted = RoutingPolicy.calibrate(scores.tolist(), oracle_ratios=oracle.tolist())
    agree = lambda p: np.mean([p.route(s) == o for s, o in zip(scores, oracle)])  # noqa: E731
    assert agree(fitted) >= agree(RoutingPolicy()) and agree(fitted) > 0.85


def test_calibrate_needs_exactly_one_target():
    with pytest.raises(ValueError, match="exactly one"):
        RoutingPolicy.calibrate([1.0, 2.0])
    with pytest.raises(ValueError, match="oracle ratios must be in"):
        RoutingPolicy.calibrate([1.0, 2.0], oracle_ratios=[8, 12])


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "policy.json"
    RoutingPolicy(low=3.25, high=7.5).save(path)
    assert json.loads(path.read_text())["low"] == 3.25
    assert RoutingPolicy.load(path) == RoutingPolicy(low=3.25, high=7.5)
    path.write_text('{"low": "x"}')
    with pytest.raises(ValueError, match="policy.json"):
        RoutingPolicy.load(path)


def _noise_image(seed: int, size=256) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_fallback_flat_image_scores_below_noise_and_reports_its_source():
    flat = Image.new("RGB", (300, 200), (40, 90, 200))
    flat_score = image_complexity_score(flat)
    noise_score = image_complexity_score(_noise_image(0))
    assert flat_score.source == noise_score.source == "image_jpeg_bpp"
    assert flat_score.score == 1.0 and noise_score.score == 9.0
    assert jpeg_bits_per_pixel(flat) < jpeg_bits_per_pixel(_noise_image(0))


def test_fallback_calibration_maps_log_linearly():
    calibration = JpegBppCalibration(bpp_at_1=0.5, bpp_at_9=2.0)
    assert calibration.to_score(0.5) == pytest.approx(1.0)
    assert calibration.to_score(1.0) == pytest.approx(5.0)  # geometric midpoint
    assert calibration.to_score(2.0) == pytest.approx(9.0)


def test_fit_fallback_calibration_on_real_devset_images(devset_sample, devset_dir):
    images = [Image.open(devset_dir / record["image"]) for record in devset_sample]
    calibration = fit_jpeg_bpp_calibration(images)
    scores = [calibration.to_score(jpeg_bits_per_pixel(image)) for image in images]
    assert min(scores) == 1.0 and max(scores) == 9.0


def test_decide_uses_caption_then_image_then_override():
    policy = RoutingPolicy(low=4.0, high=6.0)
    caption_score = ComplexityScore(score=7.0, rating=6.0)
    assert policy.decide(caption_score).source == "caption_llm"
    assert policy.decide(caption_score).ratio == 8
    fallback = policy.decide(None, image=Image.new("RGB", (64, 64), "white"))
    assert (fallback.ratio, fallback.source) == (32, "image_jpeg_bpp")
    assert policy.decide(caption_score, override_ratio=32).source == "override"
    with pytest.raises(ValueError, match="override_ratio"):
        policy.decide(None, override_ratio=12)
    with pytest.raises(ValueError):
        policy.decide(None)
