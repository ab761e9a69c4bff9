"""CATTokenizer on a tiny random NestedVAE and a tiny random Llama router (real code paths, built here)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cat_tokenizer import CATTokenizer, Encoded
from cat_tokenizer.images import ImageLoadError, pil_to_tensor
from router import ComplexityScorer, RoutingPolicy, image_complexity_score, tokens_for


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


class CountingScorer(ComplexityScorer):
    """Wraps the real tiny-Llama scorer and counts how often the router is called."""

    def __init__(self, inner):
        self.inner, self.model_id, self.rule, self.calls = inner, inner.model_id, inner.rule, []

    def score_raw(self, captions):
        self.calls.append(list(captions))
        return self.inner.score_raw(captions)


def test_import_is_lazy():
    code = (
        "import sys, cat_tokenizer\n"
        "assert 'torch' not in sys.modules, 'import cat_tokenizer pulled torch'\n"
        "assert cat_tokenizer.CATTokenizer.__name__ == 'CATTokenizer'\n"
        "assert callable(cat_tokenizer.encode) and callable(cat_tokenizer.decode)\n"
        "assert cat_tokenizer.Encoded.__name__ == 'Encoded'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("ratio", [8, 16, 32])
def test_latent_shape_tokens_and_padding_per_ratio(tokenizer, ratio):
    image = _image(70, 50)  # W=70, H=50: padded to 64 x 96
    encoded = tokenizer.encode(image, ratio=ratio)
    assert encoded.latent.shape == (4, 64 // ratio, 96 // ratio)
    assert encoded.tokens == tokens_for(ratio, (50, 70)) == (64 // ratio) * (96 // ratio)
    assert (encoded.ratio, encoded.score, encoded.score_source) == (ratio, None, "override")
    assert encoded.original_size == encoded.size == (50, 70)
    assert encoded.padding == (14, 26)


def test_every_input_type_gives_the_same_latent(tokenizer, tmp_path):
    image = _image(40, 30, seed=1)
    path = tmp_path / "a.png"
    image.save(path)
    array = np.asarray(image)
    unit = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
    inputs = [image, path, str(path), array, unit, unit * 2 - 1]
    latents = [tokenizer.encode(x, ratio=16).latent for x in inputs]
    for latent in latents[1:]:
        assert torch.equal(latent, latents[0])


def test_caption_is_scored_by_the_router_llm(tokenizer):
    caption = "a detailed bar chart with twelve labelled categories and a dense legend"
    encoded = tokenizer.encode(_image(32, 32), caption)
    expected = tokenizer.scorer.score([caption])[0]
    assert encoded.score_source == "caption_llm"
    assert encoded.score == pytest.approx(expected.score)
    assert encoded.ratio == tokenizer.policy.route(expected)
    assert set(encoded.extra["flags"]) == set(expected.flags)


@pytest.mark.parametrize("caption", [None, "", "   "])
def test_missing_or_empty_caption_uses_the_image_fallback(tokenizer, caption):
    image = _image(48, 48, seed=2)
    encoded = tokenizer.encode(image, caption)
    expected = image_complexity_score(image)
    assert encoded.score_source == "image_jpeg_bpp"
    assert encoded.score == pytest.approx(expected.score)
    assert encoded.ratio == tokenizer.policy.route(expected)


def test_ratio_override_wins_over_caption(tokenizer):
    encoded = tokenizer.encode(_image(32, 32), "a plain blue sky", ratio=8)
    assert (encoded.ratio, encoded.score_source) == (8, "override")


def test_encode_batch_one_router_call_grouped_vae_calls_input_order(tiny_vae_dir, tokenizer):
    counting = CountingScorer(tokenizer.scorer)
    # Thresholds that put every caption score at 16x, so grouping is by size alone here.
    batch_tok = CATTokenizer.from_pretrained(
        vae=tiny_vae_dir, router=counting, policy=RoutingPolicy(0.0, 10.0)
    )
    encode_calls = []
    real_encode = batch_tok.vae.encode

    def counted_encode(x, ratio):
        encode_calls.append((tuple(x.shape), ratio))
        return real_encode(x, ratio)

    batch_tok.vae.encode = counted_encode
    sizes = [(40, 32), (24, 56), (40, 32), (24, 56), (40, 32)]
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    captions = [f"caption number {i}" for i in range(5)]
    results = batch_tok.encode_batch(images, captions, batch_size=8)

    assert len(counting.calls) == 1 and len(counting.calls[0]) == 5
    assert sorted(encode_calls) == sorted([((3, 3, 32, 40), 16), ((2, 3, 56, 24), 16)])
    for image, caption, result in zip(images, captions, results):
        single = batch_tok.encode(image, caption)
        assert result.size == (image.height, image.width)
        assert single.ratio == result.ratio == 16
        torch.testing.assert_close(result.latent, single.latent, rtol=1e-4, atol=1e-5)


def test_mixed_ratios_come_back_in_input_order(tokenizer):
    images = [_image(32, 32, seed=i) for i in range(4)]
    forced = [tokenizer.encode(image, ratio=r) for image, r in zip(images, [32, 8, 16, 8])]
    batch = tokenizer.encode_batch(images, [None] * 4, ratio=None)
    for image, result in zip(images, batch):
        expected_ratio = tokenizer.policy.route(image_complexity_score(image))
        assert result.ratio == expected_ratio
    assert [f.latent.shape[-1] for f in forced] == [1, 4, 2, 4]


def test_deterministic_by_default_sampling_on_request(tokenizer):
    image = _image(32, 32, seed=3)
    first, second = tokenizer.encode(image, ratio=16), tokenizer.encode(image, ratio=16)
    assert torch.equal(first.latent, second.latent)

    def draw(seed):
        return tokenizer.encode(image, ratio=16, sample=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1).latent, draw(1).latent)
    assert not torch.equal(draw(1).latent, draw(2).latent)
    assert not torch.equal(draw(1).latent, first.latent)


def test_decode_returns_the_encoded_size_as_pil_or_tensor(tokenizer):
    image = _image(70, 50, seed=4)
    encoded = tokenizer.encode(image, ratio=8)
    pil = tokenizer.decode(encoded)
    tensor = tokenizer.decode(encoded, output="tensor")
    assert pil.mode == "RGB" and pil.size == (70, 50)
    assert tensor.shape == (3, 50, 70) and tensor.min() >= -1 and tensor.max() <= 1
    with torch.inference_mode():
        direct = tokenizer.vae.decode(encoded.latent[None], 8, output_size=(50, 70)).sample[0].clamp(-1, 1)
    torch.testing.assert_close(tensor, direct)
    np.testing.assert_array_equal(
        np.asarray(pil),
        np.asarray(Image.fromarray(((direct.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy())),
    )


def test_decode_batch_keeps_order_across_ratios_and_sizes(tokenizer):
    images = [_image(32, 32, 5), _image(64, 40, 6), _image(32, 32, 7)]
    encoded = [tokenizer.encode(im, ratio=r) for im, r in zip(images, [8, 32, 16])]
    batch = tokenizer.decode_batch(encoded, output="tensor")
    for item, result in zip(encoded, batch):
        torch.testing.assert_close(result, tokenizer.decode(item, output="tensor"), rtol=1e-4, atol=1e-5)
    assert [tuple(r.shape[1:]) for r in batch] == [(32, 32), (40, 64), (32, 32)]


def test_encoded_save_load_round_trip(tokenizer, tmp_path):
    encoded = tokenizer.encode(_image(50, 30, seed=8), "a red apple on a white table")
    path = tmp_path / "apple.safetensors"
    encoded.save(path)
    loaded = Encoded.load(path)
    assert torch.equal(loaded.latent, encoded.latent)
    assert loaded.record() == encoded.record()
    torch.testing.assert_close(loaded.scaled_latent(), encoded.latent * tokenizer.vae.config.scaling_factor)
    assert not list(tmp_path.glob("*.tmp"))


def test_encoded_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors.*not a cat-tokenizer Encoded"):
        Encoded.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        Encoded.load(tmp_path / "junk.safetensors")


def test_save_pretrained_round_trip(tiny_vae_dir, tiny_llama_dir, tmp_path):
    policy = RoutingPolicy(low=3.0, high=5.0)
    original = CATTokenizer.from_pretrained(
        vae=tiny_vae_dir, router=str(tiny_llama_dir), policy=policy, max_side=96
    )
    original.save_pretrained(tmp_path / "bundle")
    restored = CATTokenizer.from_pretrained(tmp_path / "bundle")
    assert (restored.policy.low, restored.policy.high, restored.max_side) == (3.0, 5.0, 96)
    assert restored.router_name == str(tiny_llama_dir)
    image, caption = _image(40, 40, seed=9), "a portrait of a smiling woman"
    first, second = original.encode(image, caption), restored.encode(image, caption)
    assert (first.ratio, first.score) == (second.ratio, second.score)
    assert torch.equal(first.latent, second.latent)


def test_router_is_not_loaded_when_ratio_is_given(tiny_vae_dir, tmp_path):
    tok = CATTokenizer.from_pretrained(vae=tiny_vae_dir, router=str(tmp_path / "no_such_model"))
    assert tok.encode(_image(32, 32), "a caption", ratio=32).ratio == 32  # never touched the router
    with pytest.raises(OSError):
        tok.encode(_image(32, 32), "a caption")


def test_no_router_routes_everything_by_the_image(tiny_vae_dir):
    tok = CATTokenizer.from_pretrained(vae=tiny_vae_dir, router=None)
    assert tok.encode(_image(32, 32), "a caption that is ignored").score_source == "image_jpeg_bpp"


def test_max_side_downscales_and_keeps_the_original_size(tiny_vae_dir):
    tok = CATTokenizer.from_pretrained(vae=tiny_vae_dir, router=None, max_side=64)
    encoded = tok.encode(_image(300, 120), ratio=16)
    assert encoded.original_size == (120, 300)
    assert encoded.size == (26, 64)
    assert tok.decode(encoded).size == (64, 26)


def test_bad_inputs_raise_clear_errors(tokenizer, tmp_path):
    with pytest.raises(ImageLoadError, match="missing.png.*file not found"):
        tokenizer.encode(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="override_ratio"):
        tokenizer.encode(_image(32, 32), ratio=12)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        tokenizer.encode_batch([_image(32, 32), _image(32, 32)], ["one"])
    with pytest.raises(ValueError, match="output must be"):
        tokenizer.decode(tokenizer.encode(_image(32, 32), ratio=8), output="numpy")


def test_module_level_encode_decode_use_the_default_tokenizer(tokenizer, monkeypatch):
    import cat_tokenizer
    import cat_tokenizer.tokenizer as module

    # The real default needs the shipped checkpoint and the Qwen router (integration test below);
    # here the lazily created default is pre-set to the tiny tokenizer to check the dispatch.
    monkeypatch.setattr(module, "_default_tokenizer", tokenizer)
    image = _image(32, 32, seed=10)
    encoded = cat_tokenizer.encode(image, ratio=16)
    assert torch.equal(encoded.latent, tokenizer.encode(image, ratio=16).latent)
    assert cat_tokenizer.decode(encoded).size == (32, 32)


def test_pil_to_tensor_is_the_vae_input(tokenizer):
    image = _image(32, 32, seed=11)
    with torch.inference_mode():
        direct = tokenizer.vae.encode(pil_to_tensor(image)[None], 16).latent_dist.mean[0]
    torch.testing.assert_close(tokenizer.encode(image, ratio=16).latent, direct)
