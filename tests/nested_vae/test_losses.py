"""VAE training losses: every term can be optimised, the GAN schedule and guards behave."""

from __future__ import annotations

import pytest
import torch

from cat_tokenizer.images import load_image, pil_to_tensor
from cat_tokenizer.testing import TINY_VAE_CONFIG
from nested_vae import NestedVAE, NestedVAEConfig
from nested_vae.losses import (
    LossConfig,
    NLayerDiscriminator,
    RatioGroup,
    VAELoss,
    hinge_d_loss,
    non_saturating_d_loss,
    resolve_disc_start,
)

TINY = NestedVAEConfig(**TINY_VAE_CONFIG)


@pytest.fixture(scope="module")
def images(devset_dir, devset_sample) -> torch.Tensor:
    """Two real devset images (a photo and a text image) at 32x32: the fixed batch of every test."""
    names = [devset_sample[0]["image"], devset_sample[-1]["image"]]
    return torch.stack([pil_to_tensor(load_image(devset_dir / name).resize((32, 32))) for name in names])


def _groups(vae: NestedVAE, images: torch.Tensor, ratios=(8, 16)) -> list[RatioGroup]:
    groups = []
    for ratio in ratios:
        output = vae(images, ratio, sample_posterior=True, generator=torch.Generator().manual_seed(0))
        groups.append(RatioGroup(ratio, images, output.sample, output.latent_dist))
    return groups


@pytest.mark.parametrize(
    ("term", "config"),
    [
        ("rec_loss", LossConfig(reconstruction="l1", perceptual="none", kl_weight=0.0, disc_weight=0.0)),
        ("rec_loss", LossConfig(reconstruction="l2", perceptual="none", kl_weight=0.0, disc_weight=0.0)),
        ("kl_loss", LossConfig(perceptual="none", kl_weight=1e3, disc_weight=0.0)),
        ("efficientnet_feature", LossConfig(perceptual="efficientnet", kl_weight=0.0, disc_weight=0.0)),
    ],
    ids=["l1", "l2", "kl", "efficientnet_feature"],
)
def test_each_generator_term_decreases_on_a_fixed_batch(term, config, images):
    torch.manual_seed(0)
    # A block-shortcut model (the v2 architecture): it starts far from the images, so every term
    # has room to fall within a few steps (a new smooth model starts at the bicubic thumbnail).
    vae = NestedVAE(
        NestedVAEConfig(**{**TINY_VAE_CONFIG, "pixel_shortcut": "blocks", "trunk_shortcuts": True})
    )
    loss = VAELoss(config)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    history = []
    for _ in range(6):
        total, logs = loss.generator_loss(_groups(vae, images), step=0)
        # Logged per ratio and averaged over ratios.
        assert logs[f"train/r8/{term}"] >= 0 and logs[f"train/r16/{term}"] >= 0
        history.append((logs[f"train/r8/{term}"] + logs[f"train/r16/{term}"]) / 2)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert history[-1] < 0.9 * history[0], history


def test_perceptual_term_is_logged_under_its_real_name(images):
    loss = VAELoss(LossConfig(perceptual="efficientnet"))
    _, logs = loss.generator_loss(_groups(NestedVAE(TINY), images, ratios=(32,)), step=0)
    assert "train/r32/efficientnet_feature" in logs
    assert not any("lpips" in key for key in logs)


def test_discriminator_and_generator_adversarial_losses_decrease(images):
    torch.manual_seed(0)
    vae = NestedVAE(TINY)
    discriminator = NLayerDiscriminator(channels=8, n_layers=2)
    loss = VAELoss(LossConfig(perceptual="none", disc_start=0, disc_weight=1.0))
    fixed_fakes = [
        RatioGroup(g.ratio, g.inputs, g.reconstructions.detach(), g.posterior) for g in _groups(vae, images)
    ]

    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-3)
    d_history = []
    for _ in range(6):
        d_loss, logs = loss.discriminator_loss(discriminator, images, fixed_fakes, step=0)
        assert {"train/r8/logits_real", "train/r16/logits_fake", "train/r8/disc_loss"} <= logs.keys()
        d_history.append(d_loss.item())
        d_optimizer.zero_grad()
        d_loss.backward()
        d_optimizer.step()
    assert d_history[-1] < d_history[0], d_history

    # The generator's adversarial term, with the discriminator now fixed.
    discriminator.eval()
    for parameter in discriminator.parameters():
        parameter.requires_grad_(False)
    g_optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    g_history = []
    for _ in range(6):
        _, logs = loss.generator_loss(_groups(vae, images), step=0, discriminator=discriminator)
        g_loss = -discriminator(torch.cat([g.reconstructions for g in _groups(vae, images)])).mean()
        g_history.append(logs["train/g_loss"])
        g_optimizer.zero_grad()
        g_loss.backward()
        g_optimizer.step()
    assert g_history[-1] < g_history[0], g_history


def test_adaptive_weight_is_finite_and_clamped(images):
    torch.manual_seed(0)
    vae = NestedVAE(TINY)
    last_layer = vae.get_last_layer()
    loss = VAELoss(LossConfig(perceptual="none", adaptive_weight_max=5.0))
    groups = _groups(vae, images)
    nll = torch.stack([(g.reconstructions - g.inputs).abs().mean() for g in groups]).mean()
    # A tiny adversarial gradient would give a huge ratio: the clamp caps it.
    tiny_gan = 1e-9 * groups[0].reconstructions.mean()
    weight = loss.adaptive_weight(nll, tiny_gan, last_layer)
    assert torch.isfinite(weight) and weight.item() == 5.0
    assert not weight.requires_grad
    # A normal one gives a finite weight inside the clamp.
    gan = -groups[0].reconstructions.mean() * 100
    weight = loss.adaptive_weight(nll, gan, last_layer)
    assert torch.isfinite(weight) and 0 < weight.item() < 5.0
    # A generator loss without a path to the last layer gives 0/(0+1e-4) -> finite, not NaN.
    no_path = (groups[0].reconstructions.detach() * 0).sum() + 0 * last_layer.sum()
    assert torch.isfinite(loss.adaptive_weight(nll, no_path, last_layer))


def test_discriminator_is_off_before_disc_start(images):
    calls = []
    discriminator = NLayerDiscriminator(channels=8, n_layers=2)
    discriminator.register_forward_hook(lambda *args: calls.append(1))
    loss = VAELoss(LossConfig(perceptual="none", disc_start=10, disc_weight=0.5))
    vae = NestedVAE(TINY)
    groups = _groups(vae, images)
    assert loss.adversarial_factor(9) == 0.0 and loss.adversarial_factor(10) == 1.0
    assert not loss.discriminator_active(9) and loss.discriminator_active(10)
    total, logs = loss.generator_loss(
        groups, step=9, discriminator=discriminator, last_layer=vae.get_last_layer()
    )
    d_loss, d_logs = loss.discriminator_loss(discriminator, images, groups, step=9)
    assert calls == [] and d_loss.item() == 0.0 and d_logs == {}
    assert "train/g_loss" not in logs and logs["train/disc_factor"] == 0.0
    assert total.item() == pytest.approx(logs["train/nll_loss"] + 1e-6 * logs["train/kl_loss"], rel=1e-5)
    loss.generator_loss(groups, step=10, discriminator=discriminator, last_layer=vae.get_last_layer())
    assert calls == [1]


def test_disc_start_fraction_warmup_and_ramp():
    assert resolve_disc_start(0.25, total_steps=200) == 50
    assert resolve_disc_start(300, total_steps=200) == 300
    with pytest.raises(ValueError, match="total_steps"):
        resolve_disc_start(0.5, total_steps=None)
    loss = VAELoss(
        LossConfig(perceptual="none", disc_start=0.5, disc_warmup_steps=10, disc_ramp_steps=4),
        total_steps=100,
    )
    assert not loss.discriminator_active(39) and loss.discriminator_active(40)  # warm-up before the GAN term
    assert [loss.adversarial_factor(s) for s in (49, 50, 51, 53, 80)] == [0.0, 0.25, 0.5, 1.0, 1.0]


def test_gan_loss_formulas():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    expected = 0.5 * (torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean())
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(expected.item())


def test_r1_and_lecam_regularisers_enter_the_discriminator_loss(images):
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator(channels=8, n_layers=2, spectral_norm=True)
    discriminator.eval()  # no power iteration between the two calls: both see the same weights
    groups = _groups(NestedVAE(TINY), images)
    plain = VAELoss(LossConfig(perceptual="none", disc_start=0))
    guarded = VAELoss(
        LossConfig(perceptual="none", disc_start=0, r1_weight=10.0, lecam_weight=1.0, lecam_decay=0.0)
    )
    base, _ = plain.discriminator_loss(discriminator, images, groups, step=0)
    total, logs = guarded.discriminator_loss(discriminator, images, groups, step=0)
    assert logs["train/r1_penalty"] > 0 and torch.isfinite(total)
    expected = base.item() + 5.0 * logs["train/r1_penalty"] + logs["train/lecam"]
    assert total.item() == pytest.approx(expected, rel=1e-4)
    total.backward()
    assert all(p.grad is not None for p in discriminator.parameters() if p.requires_grad)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_patchgan_outputs_a_logit_map(spectral_norm):
    discriminator = NLayerDiscriminator(channels=8, n_layers=3, spectral_norm=spectral_norm)
    logits = discriminator(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)
    has_spectral = any(hasattr(m, "weight_orig") for m in discriminator.modules())
    assert has_spectral == spectral_norm


def test_bad_loss_config_is_rejected():
    with pytest.raises(ValueError, match="reconstruction"):
        LossConfig(reconstruction="l3")
    with pytest.raises(ValueError, match="disc_loss"):
        LossConfig(disc_loss="wgan")
