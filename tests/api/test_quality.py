"""``quality=`` in the Python API, the target parser, and the one-pass all-exits encode (shipped VAE)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cat_tokenizer
from cat_foundations.images import limit_max_side, load_image, pil_to_tensor
from cat_foundations.ratios import RATIOS
from cat_tokenizer import CATTokenizer
from cat_tokenizer.all_exits import encode_all_exits, one_pass_supported
from cat_tokenizer.quality import QualityTarget, QualityTargetError
from nested_vae import NestedVAE
from nested_vae.perceptual import load_lpips

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"
NAMES = ("chart_pandas_001.png", "face_skimage_002.jpg", "text_pandas_003.png")
MAX_SIDE = 64


@pytest.fixture(scope="module")
def vae():
    return NestedVAE.from_pretrained("default", device="cpu").eval()


@pytest.fixture(scope="module")
def small_images():
    return [limit_max_side(load_image(EXAMPLES / name), MAX_SIDE) for name in NAMES]


@pytest.fixture(scope="module")
def tokenizer(vae):
    return CATTokenizer(vae, scorer=None, max_side=MAX_SIDE)


def test_targets_parse_once_with_direction_checked():
    assert QualityTarget.parse(" PSNR >= 28 ") == QualityTarget("psnr", ">=", 28.0)
    assert str(QualityTarget.parse("lpips<=0.2")) == "lpips<=0.2"
    assert QualityTarget.parse("ssim>=0.9").met_by(0.95)
    assert not QualityTarget.parse("lpips<=0.2").met_by(0.25)
    with pytest.raises(QualityTargetError, match="lower-is-better"):
        QualityTarget.parse("lpips>=0.2")
    with pytest.raises(QualityTargetError, match="psnr>=X"):
        QualityTarget.parse("psnr=28")


def test_one_trunk_pass_gives_every_exit_exactly_as_encode_does(vae, small_images):
    assert one_pass_supported(vae)
    pixels = torch.stack([pil_to_tensor(small_images[0].resize((72, 40)))] * 2)  # padded to 96 x 64
    means, padding = encode_all_exits(vae, pixels)
    assert padding == (24, 24)
    for ratio in RATIOS:
        expected = vae.encode(pixels, ratio).latent_dist.mean
        torch.testing.assert_close(means[ratio], expected, rtol=1e-5, atol=1e-5)


def test_the_fallback_through_encode_matches_the_one_pass(vae, small_images):
    pixels = pil_to_tensor(small_images[1])[None]
    one_pass, _ = encode_all_exits(vae, pixels)
    vae.enable_slicing()
    try:
        assert not one_pass_supported(vae)
        fallback, _ = encode_all_exits(vae, pixels)
    finally:
        vae.disable_slicing()
    for ratio in RATIOS:
        torch.testing.assert_close(fallback[ratio], one_pass[ratio], rtol=1e-5, atol=1e-5)


def test_encode_batch_with_a_loose_and_an_impossible_target(tokenizer, small_images):
    loose = tokenizer.encode_batch(small_images, quality="ssim>=-1")
    assert [e.ratio for e in loose] == [32] * len(NAMES)
    assert all(e.score_source == "quality_measured" and e.extra["quality"]["met"] for e in loose)
    impossible = tokenizer.encode_batch(small_images, quality=QualityTarget.parse("psnr>=99"))
    assert [e.ratio for e in impossible] == [8] * len(NAMES)
    assert not any(e.extra["quality"]["met"] for e in impossible)
    assert impossible[0].tokens == 16 * loose[0].tokens


def test_lpips_target_measures_real_lpips_vgg(tokenizer, vae, small_images):
    image = small_images[0]
    encoded = tokenizer.encode(image, quality="lpips<=5")  # any reconstruction passes
    assert encoded.ratio == 32
    quality = encoded.extra["quality"]
    assert quality["metric"] == "lpips" and quality["met"]
    pixels = pil_to_tensor(image)[None]
    with torch.inference_mode():
        recon = vae.decode(vae.encode(pixels, 32).latent_dist.mean, 32, output_size=pixels.shape[-2:]).sample
        expected = float(load_lpips("vgg")(recon.clamp(-1, 1), pixels)[0])
    assert quality["measured"]["32"] == pytest.approx(expected, abs=1e-4)
    assert quality["measured"]["8"] < quality["measured"]["32"]  # more tokens, closer to the input


def test_quality_refuses_other_routing_arguments(tokenizer, small_images):
    with pytest.raises(ValueError, match="cannot be combined with ratio="):
        tokenizer.encode(small_images[0], ratio=16, quality="psnr>=20")
    with pytest.raises(ValueError, match="cannot be combined with sample="):
        tokenizer.encode(small_images[0], quality="psnr>=20", sample=True)
    with pytest.raises(QualityTargetError, match="unknown quality metric"):
        tokenizer.encode(small_images[0], quality="fid<=3")


def test_module_level_encode_passes_quality_through(small_images):
    encoded = cat_tokenizer.encode(small_images[2], quality="psnr>=99")
    assert encoded.ratio == 8 and encoded.score_source == "quality_measured"
    assert encoded.extra["quality"]["met"] is False
