"""A tiny tokenized set made by the real ``cat-tokenize`` path (tiny random VAE + tiny random Llama).

The routing thresholds are set at the tertiles of the tiny router's own scores for these captions,
so the set holds images at all three ratios, routed by caption exactly as a real run routes them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cat_tokenizer.cli import main as tokenize_main
from router import RoutingPolicy, load_scorer

CAPTIONS = [
    "a plain blue sky",
    "a white wall",
    "a red apple on a table",
    "a portrait of a smiling woman",
    "a detailed bar chart with twelve labelled categories and a dense legend",
    "a page of printed text with small letters",
    "a street market crowded with people",
    "a diagram with fine lines",
    "clip art of a cat",
    "a line chart",
    "a photo of a human face",
    "a plain red apple",
]
IMAGE_SIZE = (64, 96)  # (H, W): latents 8x12 / 4x6 / 2x3 at 8x / 16x / 32x


def _smooth_image(index: int) -> Image.Image:
    """Colour gradients with a few stripes: structured images, different for every index."""
    height, width = IMAGE_SIZE
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(index)
    phase, frequency = rng.uniform(0, 6.28, 3), rng.uniform(0.02, 0.2, 3)
    channels = [127 + 120 * np.sin(frequency[c] * (rows + cols * (c - 1)) + phase[c]) for c in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8))


def _tertile_policy(tiny_llama_dir) -> RoutingPolicy:
    scores = sorted(s.score for s in load_scorer(str(tiny_llama_dir)).score(CAPTIONS))
    low, high = scores[len(scores) // 3], scores[2 * len(scores) // 3]
    return RoutingPolicy(low=low, high=high)


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory, tiny_vae_dir, tiny_llama_dir):
    """A cat-tokenize output folder of 12 images at all three ratios (asserted)."""
    root = tmp_path_factory.mktemp("gen_tokens")
    images = root / "images"
    images.mkdir()
    lines = []
    for index, caption in enumerate(CAPTIONS):
        domain = "simple" if index % 2 else "busy"
        name = f"{domain}_{index:03d}.png"
        _smooth_image(index).save(images / name)
        lines.append(json.dumps({"image": name, "caption": caption}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    policy = root / "policy.json"
    _tertile_policy(tiny_llama_dir).save(policy)
    out = root / "tokens"
    argv = ["--images", images, "--captions", root / "captions.jsonl", "--out", out, "--vae", tiny_vae_dir]
    argv += ["--router-model", tiny_llama_dir, "--policy", policy, "--quiet", "--shard-size", 5]
    assert tokenize_main([str(a) for a in argv]) == 0
    ratios = {json.loads(line)["ratio"] for line in (out / "manifest.jsonl").read_text().splitlines()}
    assert ratios == {8, 16, 32}, f"the tertile policy should route to every ratio, got {ratios}"
    return out


@pytest.fixture
def tiny_model():
    """GeneratorConfig overrides for a model that trains in seconds on a CPU."""
    return {"hidden_size": 32, "depth": 2, "num_heads": 2, "head_hidden_size": 32}
