"""Perceptual distances: the real EfficientNet-Lite0 feature distance, and LPIPS as the VAE loss.

LPIPS values, loading and bad-input handling are tested in test_lpips.py.
"""

from __future__ import annotations

import pytest
import torch

from cat_tokenizer.images import load_image, pil_to_tensor
from cat_tokenizer.testing import TINY_VAE_CONFIG
from nested_vae import NestedVAE, NestedVAEConfig
from nested_vae.losses import LossConfig, RatioGroup, VAELoss
from nested_vae.perceptual import LPIPS, EfficientNetFeatureDistance, build_perceptual


@pytest.fixture(scope="module")
def feature_distance():
    return EfficientNetFeatureDistance()


def _devset_crop(devset_dir, name: str, size: int = 96) -> torch.Tensor:
    image = load_image(devset_dir / name).resize((size, size))
    return pil_to_tensor(image).unsqueeze(0)


def test_efficientnet_distance_is_zero_for_identical_and_grows_with_noise(feature_distance):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    noise = torch.randn(images.shape, generator=generator)
    same = feature_distance(images, images)
    small = feature_distance((images + 0.05 * noise).clamp(-1, 1), images)
    large = feature_distance((images + 0.4 * noise).clamp(-1, 1), images)
    assert same.shape == (2,)
    assert torch.allclose(same, torch.zeros(2), atol=1e-6)
    assert (small > 0).all() and (large > small).all()


def test_efficientnet_distance_ranks_real_images(feature_distance, devset_records, devset_dir):
    # A photo vs. its slightly blurred self must be closer than the photo vs. a chart.
    photo = next(r["image"] for r in devset_records if r["domain"] == "photo")
    chart = next(r["image"] for r in devset_records if r["domain"] == "chart")
    image = _devset_crop(devset_dir, photo)
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    other = _devset_crop(devset_dir, chart)
    assert feature_distance(blurred, image) < feature_distance(other, image)


def test_efficientnet_distance_is_frozen_and_passes_gradients_to_the_input(feature_distance):
    feature_distance.train()  # a parent module's .train() must not unfreeze BatchNorm statistics
    assert not feature_distance.training
    assert not any(p.requires_grad for p in feature_distance.parameters())
    target = torch.rand(1, 3, 48, 48) * 2 - 1
    images = torch.zeros_like(target, requires_grad=True)
    feature_distance(images, target).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_lpips_is_the_perceptual_loss_by_name_and_trains(devset_dir, devset_sample, tmp_path, monkeypatch):
    # perceptual: lpips in a training config -> the real LPIPS-VGG v0.1, logged as lpips_vgg,
    # and optimising it through a (tiny) VAE lowers it.
    monkeypatch.setenv("CAT_TOKENIZER_CACHE", str(tmp_path))
    names = [devset_sample[0]["image"], devset_sample[-1]["image"]]
    images = torch.stack([pil_to_tensor(load_image(devset_dir / n).resize((32, 32))) for n in names])
    torch.manual_seed(0)
    vae = NestedVAE(NestedVAEConfig(**TINY_VAE_CONFIG))
    loss = VAELoss(LossConfig(perceptual="lpips", kl_weight=0.0, disc_weight=0.0))
    assert isinstance(loss.perceptual, LPIPS) and loss.perceptual.name == "lpips_vgg"
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    history = []
    for _ in range(6):
        output = vae(images, 16, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        total, logs = loss.generator_loss([RatioGroup(16, images, output.sample, output.latent_dist)], step=0)
        history.append(logs["train/r16/lpips_vgg"])
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert not any("efficientnet" in key for key in logs)
    assert history[-1] < 0.95 * history[0], history


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown perceptual backend"):
        build_perceptual("lpips-ish")
