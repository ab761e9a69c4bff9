"""Perceptual distances: the real EfficientNet-Lite0 feature distance and LPIPS-VGG loading."""

from __future__ import annotations

import pytest
import torch

from cat_tokenizer.images import load_image, pil_to_tensor
from nested_vae.perceptual import (
    EfficientNetFeatureDistance,
    LPIPSUnavailableError,
    build_perceptual,
    build_vgg16_features,
    load_lpips,
    lpips_head_weights_path,
)


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


def test_lpips_unavailable_names_the_missing_backbone_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the real situation offline
    with pytest.raises(LPIPSUnavailableError, match="vgg16-397923af.pth"):
        load_lpips()
    with pytest.raises(LPIPSUnavailableError, match="backbone"):
        build_perceptual("lpips", backbone_weights=tmp_path / "nowhere.pth")


def test_lpips_unavailable_names_the_missing_head_file(tmp_path):
    backbone = tmp_path / "vgg16.pth"
    torch.save({}, backbone)
    with pytest.raises(LPIPSUnavailableError, match="linear heads missing"):
        load_lpips(backbone_weights=backbone, head_weights=tmp_path / "missing_vgg.pth")


def test_lpips_head_weights_are_found_without_importing_lpips():
    path = lpips_head_weights_path("vgg")
    assert path.name == "vgg.pth" and path.is_file()


def test_lpips_plumbing_with_random_backbone(tmp_path):
    # PLUMBING ONLY: the ImageNet VGG16 backbone exists nowhere offline here, so this test writes
    # a randomly initialised VGG16 state dict (torchvision's key layout) to a temp file. It checks
    # loading and the LPIPS arithmetic with the real shipped linear heads, not LPIPS values.
    torch.manual_seed(0)
    features = build_vgg16_features()
    backbone = tmp_path / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, backbone)
    lpips = load_lpips(backbone_weights=backbone)
    assert lpips.name == "lpips_vgg"
    assert torch.equal(lpips.features[0].weight, features[0].weight)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(images, images), torch.zeros(2), atol=1e-7)
    far = lpips(-images, images)
    assert far.shape == (2,) and (far > 0).all()
    assert torch.allclose(far, lpips(images, -images), atol=1e-6)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown perceptual backend"):
        build_perceptual("lpips-ish")
