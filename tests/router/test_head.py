"""Router heads and their inputs: hidden states from the real transformers path (tiny random
Llama), parameter-free image features on real devset images, and the head's arithmetic, storage
and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from router.head import PREDICTED_RATIOS, RouterHead, caption_features
from router.image_features import IMAGE_FEATURE_NAMES, image_features
from router.scores import FLAG_QUERIES

CAPTIONS = [
    "a plain blue sky",
    "a bar chart with twelve labelled categories",
    "a portrait of a smiling woman",
]


def test_states_come_from_the_same_forward_pass_as_the_scores(tiny_scorer):
    plain = tiny_scorer.score_raw(CAPTIONS)
    with_states = tiny_scorer.score_raw_with_states(CAPTIONS)
    hidden = tiny_scorer.model.config.hidden_size
    for (dist, flags), ((dist2, flags2), states) in zip(plain, with_states):
        assert dist == pytest.approx(dist2, abs=1e-6) and flags == pytest.approx(flags2, abs=1e-6)
        assert len(states) == (1 + len(FLAG_QUERIES)) * hidden
    # Different captions, different states; the same caption in another batch position, the same.
    assert not np.allclose(with_states[0][1], with_states[1][1])
    again = tiny_scorer.score_raw_with_states([CAPTIONS[2], CAPTIONS[0]])
    assert np.allclose(again[1][1], with_states[0][1], atol=1e-5)


def test_caption_features_layout(tiny_scorer):
    (raw, states) = tiny_scorer.score_raw_with_states(CAPTIONS[:1])[0]
    row = caption_features(raw, states)
    assert row.shape == (len(states) + 1 + 9 + len(FLAG_QUERIES),)
    assert row[len(states)] == pytest.approx(sum((d + 1) * p for d, p in enumerate(raw[0])))
    assert np.all(np.isfinite(row))


def test_image_features_rank_detail(devset_dir):
    flat = Image.new("RGB", (256, 256), (120, 130, 140))
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    flat_row, noise_row = image_features(flat), image_features(noise)
    assert len(flat_row) == len(IMAGE_FEATURE_NAMES)
    assert all(a < b for a, b in zip(flat_row, noise_row))  # every feature says: noise has more detail
    photo = image_features(next(devset_dir.glob("photo_*")))
    thumbs = photo[IMAGE_FEATURE_NAMES.index("log_thumbnail_mse_8x") :]
    assert thumbs[0] < thumbs[1] < thumbs[2]  # a coarser grid loses more of a real photo


def _head(features: int, kind: str = "caption", seed: int = 0) -> RouterHead:
    rng = np.random.default_rng(seed)
    return RouterHead(
        kind=kind,
        mean=rng.normal(size=features),
        scale=rng.uniform(0.5, 2.0, size=features),
        coef=rng.normal(size=(features, len(PREDICTED_RATIOS))),
        intercept=np.array([0.5, 0.4, 0.3]),
        score_range=(-1.0, 1.0),
        policy={"low": 4.0, "high": 6.5},
        fitted_to={"vae_weights_sha256": "ab" * 32, "router_model_id": "tiny"},
    )


def test_head_predicts_scores_and_round_trips(tmp_path):
    head = _head(5)
    rows = np.random.default_rng(1).normal(size=(7, 5))
    expected = ((rows - head.mean) / head.scale) @ head.coef + head.intercept
    assert np.allclose(head.predict(rows), expected)
    scores = head.score(expected)
    gain = expected[:, 0] - expected[:, 2]
    assert np.all((scores >= 1) & (scores <= 9))
    inside = (gain > -1) & (gain < 1)
    assert np.allclose(scores[inside], 1 + 8 * (gain[inside] + 1) / 2)
    assert np.all(np.diff(scores[np.argsort(gain)]) >= 0)  # monotone in the predicted gain
    head.save(tmp_path / "head")
    loaded = RouterHead.load(tmp_path / "head")
    assert (
        loaded.digest == head.digest and loaded.policy == head.policy and loaded.fitted_to == head.fitted_to
    )
    assert np.allclose(loaded.predict(rows), head.predict(rows))
    assert _head(5, seed=2).digest != head.digest


def test_head_refusals(tmp_path, tiny_scorer):
    raw, states = tiny_scorer.score_raw_with_states(CAPTIONS[:1])[0]
    width = caption_features(raw, states).shape[0]
    with pytest.raises(ValueError, match="another router model"):
        _head(width + 3).features(raw, states)
    hybrid = _head(width + len(IMAGE_FEATURE_NAMES), kind="hybrid")
    with pytest.raises(ValueError, match="needs the image"):
        hybrid.features(raw, states)
    row = hybrid.features(raw, states, image=Image.new("RGB", (64, 64), (10, 20, 30)))
    assert row.shape == (width + len(IMAGE_FEATURE_NAMES),)
    with pytest.raises(ValueError, match="head kind"):
        _head(3, kind="magic")
    with pytest.raises(ValueError, match="fit one with"):
        RouterHead.load(tmp_path / "missing")
