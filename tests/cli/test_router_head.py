"""`cat-tokenize` with a fitted router head (``--router-head``), on the real transformers path.

The head is built here for the tiny random Llama (its coefficients are random, so its routes mean
nothing); what is checked is the plumbing: ``auto`` finds the head inside the VAE folder only when
it was fitted with the router model in use, scores and ratios are the head's (recomputed here
from the head's own arithmetic), its thresholds are the policy, the head is recorded and a resume
refuses another, a head fitted to another VAE warns, and ``none`` keeps the hand-made rule.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cat_tokenizer.cli import main
from cat_tokenizer.index import file_sha256
from cat_tokenizer.store import read_jsonl
from router import RoutingPolicy
from router.head import PREDICTED_RATIOS, RouterHead
from router.image_features import IMAGE_FEATURE_NAMES
from router.scores import FLAG_QUERIES
from router.transformers_backend import TransformersScorer

CAPTIONS = [
    "a plain blue sky",
    "a bar chart with twelve labelled categories",
    "a portrait of a smiling woman",
    "a page of small printed text",
    "a red apple on a table",
    "a crowded street market",
]


def _head(rows: np.ndarray, vae_sha: str, model_id: str, seed: int = 0) -> RouterHead:
    """A random head standardised on ``rows``, with thresholds that split them in three groups."""
    rng = np.random.default_rng(seed)
    width = rows.shape[1]
    head = RouterHead(
        kind="hybrid",
        mean=rows.mean(axis=0),
        scale=rows.std(axis=0) + 1e-3,
        coef=rng.normal(scale=1 / np.sqrt(width), size=(width, len(PREDICTED_RATIOS))),
        intercept=np.array([0.5, 0.4, 0.3]),
        score_range=(-3.0, 3.0),
        fitted_to={"vae_weights_sha256": vae_sha, "router_model_id": model_id, "image_side": 64},
    )
    scores = np.sort(head.score(head.predict(rows)))
    head.policy = {"low": float(scores[1:3].mean()), "high": float(scores[3:5].mean())}
    return head


def _rows(root, llama) -> np.ndarray:
    """The hybrid feature rows of the test images, through the head's own feature code."""
    from PIL import Image

    from router.head import caption_features
    from router.image_features import image_features

    scorer = TransformersScorer.from_pretrained(llama)
    rows = []
    for index, (raw, states) in enumerate(scorer.score_raw_with_states(CAPTIONS)):
        image = Image.open(root / "images" / f"img_{index}.png").convert("RGB")
        rows.append(np.concatenate([caption_features(raw, states), image_features(image, 64)]))
    return np.stack(rows)


@pytest.fixture(scope="module")
def headed(tmp_path_factory, tiny_vae_dir, tiny_llama_dir):
    """A copy of the tiny VAE with a hybrid head for the tiny Llama, and captioned noise images."""
    from tests.cli.conftest import noise

    root = tmp_path_factory.mktemp("headed")
    vae_dir = root / "vae"
    shutil.copytree(tiny_vae_dir, vae_dir)
    images = root / "images"
    images.mkdir()
    lines = []
    for index, caption in enumerate(CAPTIONS):
        noise(48, 48, seed=index).save(images / f"img_{index}.png")
        lines.append(json.dumps({"image": f"img_{index}.png", "caption": caption}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    rows = _rows(root, tiny_llama_dir)
    hidden = json.loads((tiny_llama_dir / "config.json").read_text())["hidden_size"]
    assert rows.shape[1] == (1 + len(FLAG_QUERIES)) * hidden + 1 + 9 + len(FLAG_QUERIES) + len(
        IMAGE_FEATURE_NAMES
    )
    head = _head(rows, file_sha256(vae_dir / "model.safetensors"), str(tiny_llama_dir))
    head.save(vae_dir / "router_head")
    return root, vae_dir, head, rows


def _run(root, vae_dir, llama, out, *extra) -> int:
    argv = [
        "--images", str(root / "images"), "--captions", str(root / "captions.jsonl"), "--out", str(out),
        "--vae", str(vae_dir), "--router-model", str(llama), "--max-side", "64", "--quiet", *map(str, extra),
    ]  # fmt: skip
    return main(argv)


def test_auto_routes_with_the_vae_s_head(headed, tiny_llama_dir, tmp_path):
    root, vae_dir, head, rows = headed
    out = tmp_path / "tokens"
    assert _run(root, vae_dir, tiny_llama_dir, out) == 0
    records = {r["id"]: r for r in read_jsonl(out / "manifest.jsonl")}
    run = json.loads((out / "run.json").read_text())
    assert run["router_head"] == f"hybrid:{head.digest}"
    assert run["policy"] == head.policy  # the head's fitted thresholds, no --policy given

    # The head's own arithmetic on the same captions and images gives the same scores and ratios.
    expected = head.score(head.predict(rows))
    policy = RoutingPolicy(**head.policy)
    for index, value in enumerate(expected):
        record = records[f"img_{index}.png"]
        assert record["score_source"] == "hybrid_head"
        assert record["score"] == pytest.approx(value, abs=1e-4)
        assert record["ratio"] == policy.route(value)
    assert {r["ratio"] for r in records.values()} == {8, 16, 32}  # thresholds split the six in three

    # Resume refuses another head; the same one is fine.
    assert _run(root, vae_dir, tiny_llama_dir, out, "--resume") == 0
    assert _run(root, vae_dir, tiny_llama_dir, out, "--resume", "--router-head", "none") == 1


def test_none_and_other_router_models_keep_the_rule(headed, tiny_llama_dir, tmp_path):
    root, vae_dir, _, _ = headed
    out = tmp_path / "rule"
    assert _run(root, vae_dir, tiny_llama_dir, out, "--router-head", "none") == 0
    assert {r["score_source"] for r in read_jsonl(out / "manifest.jsonl")} == {"caption_llm"}
    assert json.loads((out / "run.json").read_text())["router_head"] is None
    # The same model under another path is another model id: auto does not apply this head.
    other = tmp_path / "llama_copy"
    shutil.copytree(tiny_llama_dir, other)
    out = tmp_path / "other_model"
    assert _run(root, vae_dir, other, out) == 0
    assert {r["score_source"] for r in read_jsonl(out / "manifest.jsonl")} == {"caption_llm"}


def test_explicit_head_of_another_vae_warns_and_bad_paths_fail(
    headed, tiny_llama_dir, tiny_vae_dir, tmp_path, caplog
):
    root, vae_dir, _, rows = headed
    stray = tmp_path / "stray_head"
    _head(rows, "0" * 64, str(tiny_llama_dir)).save(stray)
    with caplog.at_level("WARNING"):
        assert _run(root, vae_dir, tiny_llama_dir, tmp_path / "t1", "--router-head", stray) == 0
    assert "was fitted to VAE weights 000000000000" in caplog.text
    assert _run(root, vae_dir, tiny_llama_dir, tmp_path / "t2", "--router-head", tmp_path / "nowhere") == 1


def test_python_api_and_bundles_keep_the_head(headed, tiny_llama_dir, tmp_path, caplog):
    from cat_tokenizer import CATTokenizer

    root, vae_dir, head, _ = headed
    tok = CATTokenizer.from_pretrained(vae=vae_dir, router=str(tiny_llama_dir), device="cpu")
    assert tok.router_options["head"] == str(vae_dir / "router_head")
    assert (tok.policy.low, tok.policy.high) == (head.policy["low"], head.policy["high"])
    encoded = tok.encode(root / "images" / "img_1.png", CAPTIONS[1])
    assert encoded.score_source == "hybrid_head"
    bundle = tmp_path / "bundle"
    tok.save_pretrained(bundle)
    with caplog.at_level("WARNING"):
        again = CATTokenizer.from_pretrained(bundle, router=str(tiny_llama_dir), device="cpu")
    assert "was fitted to VAE weights" not in caplog.text  # the re-saved VAE file is the head's too
    assert again.encode(root / "images" / "img_1.png", CAPTIONS[1]).score == pytest.approx(
        encoded.score, abs=1e-4
    )
    plain = CATTokenizer.from_pretrained(
        vae=vae_dir, router=str(tiny_llama_dir), router_head="none", device="cpu"
    )
    assert "head" not in plain.router_options
    assert plain.encode(root / "images" / "img_1.png", CAPTIONS[1]).score_source == "caption_llm"


def test_budget_calibration_scores_with_the_head(headed, tiny_llama_dir, tmp_path):
    """--target-mean-tokens prescores every caption AND image with the hybrid head (in chunks)."""
    root, vae_dir, head, rows = headed
    out = tmp_path / "budget"
    assert _run(root, vae_dir, tiny_llama_dir, out, "--target-mean-tokens", "16x") == 0
    records = read_jsonl(out / "manifest.jsonl")
    assert {r["score_source"] for r in records} == {"hybrid_head"}
    summary = json.loads((out / "summary.json").read_text())
    # 6 images of 48 px (padded to 64): 16x's budget is 16 tokens each; calibration keeps the
    # head's threshold gap and shifts it to the closest reachable mean.
    assert abs(summary["mean_tokens"] - summary["mean_tokens_fixed16"]) <= 8
    policy = RoutingPolicy.load(out / "policy.json")
    assert policy.high - policy.low == pytest.approx(head.policy["high"] - head.policy["low"])
    expected = head.score(head.predict(rows))
    for index, value in enumerate(expected):
        record = next(r for r in records if r["id"] == f"img_{index}.png")
        assert record["score"] == pytest.approx(value, abs=1e-4) and record["ratio"] == policy.route(value)
