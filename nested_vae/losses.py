"""Training losses for the nested VAE: reconstruction + KL + perceptual + PatchGAN adversarial.

In the spirit of latent-diffusion's ``LPIPSWithDiscriminator`` (Rombach et al. 2022), with three
differences that make it easier to read and to use from a plain training loop:

* no ``optimizer_idx`` switch: :meth:`VAELoss.generator_loss` and
  :meth:`VAELoss.discriminator_loss` are separate, and the discriminator is a separate module
  (so ``accelerate`` can wrap it and its optimizer like the VAE);
* the perceptual term is selectable and named for what it is (``efficientnet_feature`` or
  ``lpips_vgg``, see :mod:`nested_vae.perceptual`);
* mixed-ratio batches: the loss takes one :class:`RatioGroup` per compression ratio, averages
  each term within a ratio, then averages the ratios, and logs every term per ratio.

The GAN turn-on guards asked for by users of taming-transformers/latent-diffusion are options:
delayed start (in steps or as a fraction of the run), a linear ramp of the adversarial factor, a
clamped adaptive weight, discriminator warm-up before the generator sees the GAN term, R1 and
LeCam regularisation; a lower discriminator learning rate is a trainer option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .perceptual import build_perceptual


@dataclass
class LossConfig:
    """Weights and schedule of every loss term.

    Args:
        reconstruction: ``"l1"`` or ``"l2"`` pixel loss (mean over pixels).
        kl_weight: weight of KL(q(z|x) || N(0, I)). The KL is summed over latent elements and divided
            by the number of image elements, so the weight means what it means in latent-diffusion
            (whose losses are both sums per image): 1e-6 is their default.
        perceptual: ``"lpips"`` (LPIPS v0.1 on torchvision's ImageNet trunk, found offline by
            :func:`nested_vae.perceptual.load_lpips`), ``"efficientnet"`` (EfficientNet-Lite0
            feature distance, not LPIPS) or ``"none"``.
        perceptual_weight: weight of the perceptual term.
        perceptual_options: keyword arguments for the perceptual module: for LPIPS ``net``
            (``"vgg"``, the default, or ``"alex"``: about 20x cheaper, what the CPU recipe trains
            with) and ``backbone_weights`` / ``head_weights``.
        disc_weight: base weight of the generator's adversarial term (multiplied by the adaptive weight).
        disc_start: when the adversarial term enters the generator loss: a step count if >= 1,
            a fraction of the total training steps if in (0, 1). The default, 50001, is
            latent-diffusion's. Use a value past the run's end (or ``disc_weight=0``) to train
            without a GAN.
        disc_warmup_steps: the discriminator is trained this many steps before ``disc_start`` so that
            it is not random when the generator starts to follow it.
        disc_ramp_steps: the adversarial factor grows linearly from 0 to 1 over this many steps
            after ``disc_start`` (0: switch on at once).
        disc_loss: ``"hinge"`` or ``"non_saturating"``.
        disc_layers: number of stride-2 layers of the PatchGAN discriminator.
        disc_channels: channels of its first layer.
        disc_spectral_norm: spectral-normalised convolutions (and no BatchNorm) in the discriminator.
        adaptive_weight_max: clamp of the adaptive weight ||grad L_rec|| / (||grad L_gan|| + 1e-4).
        r1_weight: gamma of the R1 gradient penalty on real images (0: off).
        lecam_weight: weight of the LeCam regulariser (Tseng et al. 2021) (0: off).
        lecam_decay: EMA decay of the logits that LeCam anchors to.
    """

    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    perceptual: str = "lpips"
    perceptual_weight: float = 1.0
    perceptual_options: dict = field(default_factory=dict)
    disc_weight: float = 0.5
    disc_start: float = 50001
    disc_warmup_steps: int = 0
    disc_ramp_steps: int = 0
    disc_loss: str = "hinge"
    disc_layers: int = 3
    disc_channels: int = 64
    disc_spectral_norm: bool = False
    adaptive_weight_max: float = 1e4
    r1_weight: float = 0.0
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99

    def __post_init__(self):
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}")
        if self.disc_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"disc_loss must be 'hinge' or 'non_saturating', got {self.disc_loss!r}")
        if self.disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {self.disc_start}")


@dataclass
class RatioGroup:
    """The samples of a batch that went through one compression ratio.

    Args:
        ratio: 8, 16 or 32.
        inputs: original images ``(N, 3, H, W)`` in ``[-1, 1]``.
        reconstructions: decoded images, same shape.
        posterior: the encoder's diagonal Gaussian for these samples (has ``.kl()``), or a list of
            per-sample distributions.
        real_index: rows of the discriminator's real batch that these samples came from
            (lets "all ratios" mode score each real image once).
    """

    ratio: int
    inputs: torch.Tensor
    reconstructions: torch.Tensor
    posterior: object
    real_index: torch.Tensor | None = None


def resolve_disc_start(disc_start: float, total_steps: int | None) -> int:
    """``disc_start`` as a step: values in (0, 1) are fractions of ``total_steps``."""
    if 0 < disc_start < 1:
        if not total_steps:
            raise ValueError(f"disc_start={disc_start} is a fraction of the run but total_steps is unknown")
        return int(round(disc_start * total_steps))
    return int(disc_start)


# --------------------------------------------------------------------------------------------
# PatchGAN discriminator
# --------------------------------------------------------------------------------------------


def _weights_init(module: nn.Module) -> None:
    # pix2pix/taming initialisation: N(0, 0.02) convs, N(1, 0.02) norms.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix (Isola et al. 2017) as used by taming/latent-diffusion.

    Outputs one logit per overlapping patch, shape ``(B, 1, H', W')``.

    Args:
        in_channels: image channels.
        channels: channels of the first layer (doubled per layer up to 8x).
        n_layers: number of stride-2 convolutions after the first one.
        spectral_norm: wrap convolutions in spectral normalisation and drop BatchNorm (a common
            stabiliser; BatchNorm statistics and spectral norm interact badly).
    """

    def __init__(
        self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, spectral_norm: bool = False
    ):
        super().__init__()
        wrap = nn.utils.spectral_norm if spectral_norm else (lambda module: module)

        def norm(num_channels: int) -> nn.Module:
            return nn.Identity() if spectral_norm else nn.BatchNorm2d(num_channels)

        layers: list[nn.Module] = [
            wrap(nn.Conv2d(in_channels, channels, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
        ]
        multiplier = 1
        for index in range(1, n_layers + 1):
            previous, multiplier = multiplier, min(2**index, 8)
            stride = 2 if index < n_layers else 1
            layers += [
                wrap(nn.Conv2d(channels * previous, channels * multiplier, 4, stride, 1, bias=spectral_norm)),
                norm(channels * multiplier),
                nn.LeakyReLU(0.2),
            ]
        layers.append(wrap(nn.Conv2d(channels * multiplier, 1, 4, stride=1, padding=1)))
        self.main = nn.Sequential(*layers)
        if not spectral_norm:
            self.apply(_weights_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def r1_penalty(logits_real: torch.Tensor, reals: torch.Tensor) -> torch.Tensor:
    """E ||grad_x D(x)||^2 on real images (Mescheder et al. 2018); ``reals`` must require grad."""
    (gradient,) = torch.autograd.grad(logits_real.sum(), reals, create_graph=True)
    return gradient.pow(2).flatten(1).sum(1).mean()


# --------------------------------------------------------------------------------------------
# The combined loss
# --------------------------------------------------------------------------------------------


def _kl_per_element(posterior, num_image_elements: int) -> torch.Tensor:
    """KL summed over latent elements per sample, divided by the image's element count: ``(N,)``.

    ``posterior`` is one batched distribution or a list of per-sample ones (what the VAE returns
    for a per-sample ratio list).
    """
    if isinstance(posterior, (list, tuple)):
        kl = torch.stack([item.kl().sum() for item in posterior])
    else:
        kl = posterior.kl()
        kl = kl.flatten(1).sum(1) if kl.dim() > 1 else kl
    return kl / num_image_elements


class VAELoss(nn.Module):
    """Reconstruction + KL + perceptual + adversarial loss for mixed-ratio batches.

    Args:
        config: the :class:`LossConfig`.
        total_steps: length of the run, to resolve a fractional ``disc_start``.
    """

    def __init__(self, config: LossConfig | None = None, total_steps: int | None = None):
        super().__init__()
        self.config = config or LossConfig()
        self.disc_start = resolve_disc_start(self.config.disc_start, total_steps)
        self.perceptual = (
            build_perceptual(self.config.perceptual, **self.config.perceptual_options)
            if self.config.perceptual_weight > 0
            else None
        )
        self.perceptual_name = getattr(self.perceptual, "name", "perceptual")
        # LeCam anchors: EMAs of the discriminator's mean logits, saved with the loss state.
        self.register_buffer("lecam_ema_real", torch.zeros(()))
        self.register_buffer("lecam_ema_fake", torch.zeros(()))

    # ---- schedule -------------------------------------------------------------------------

    def adversarial_factor(self, step: int) -> float:
        """0 before ``disc_start``, then a linear ramp to 1 over ``disc_ramp_steps``."""
        if self.config.disc_weight <= 0 or step < self.disc_start:
            return 0.0
        ramp = self.config.disc_ramp_steps
        return 1.0 if ramp <= 0 else min(1.0, (step - self.disc_start + 1) / ramp)

    def discriminator_active(self, step: int) -> bool:
        """Whether the discriminator is trained at ``step`` (warm-up starts it before ``disc_start``)."""
        return self.config.disc_weight > 0 and step >= self.disc_start - self.config.disc_warmup_steps

    # ---- generator side -------------------------------------------------------------------

    def reconstruction_terms(self, group: RatioGroup) -> dict[str, torch.Tensor]:
        """Per-ratio means of the pixel, perceptual and KL terms."""
        inputs = group.inputs.float()
        reconstructions = group.reconstructions.float()
        difference = reconstructions - inputs
        pixel = difference.abs() if self.config.reconstruction == "l1" else difference.pow(2)
        terms = {"rec_loss": pixel.mean()}
        if self.perceptual is not None:
            terms[self.perceptual_name] = self.perceptual(reconstructions, inputs).mean()
        terms["kl_loss"] = _kl_per_element(group.posterior, inputs[0].numel()).mean()
        return terms

    def adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """||grad L_nll|| / (||grad L_gan|| + 1e-4) at the decoder's last layer, clamped and detached."""
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
        weight = torch.nan_to_num(weight, nan=0.0, posinf=self.config.adaptive_weight_max)
        return torch.clamp(weight, 0.0, self.config.adaptive_weight_max).detach()

    def generator_loss(
        self,
        groups: list[RatioGroup],
        step: int,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the VAE's optimizer and a flat dict of logged values.

        Args:
            groups: one :class:`RatioGroup` per ratio present in the batch.
            step: global optimizer step (drives the GAN schedule).
            discriminator: the PatchGAN; may be ``None`` while the GAN term is off.
            last_layer: ``vae.get_last_layer()``, for the adaptive weight. Without it (or when
                gradients are off, e.g. in validation) the adaptive weight is 0.
            split: prefix of the logged names.
        """
        if not groups:
            raise ValueError("generator_loss needs at least one ratio group")
        factor = self.adversarial_factor(step)
        logs: dict[str, float] = {}
        nll_per_ratio, kl_per_ratio, gan_per_ratio = [], [], []
        # One discriminator call for all ratios: a DDP-wrapped module must run forward once per step.
        logits_fake_groups: list[torch.Tensor | None] = [None] * len(groups)
        if factor > 0 and discriminator is not None:
            logits = discriminator(torch.cat([group.reconstructions for group in groups]))
            logits_fake_groups = list(logits.split([len(group.inputs) for group in groups]))
        for group, logits_fake in zip(groups, logits_fake_groups):
            terms = self.reconstruction_terms(group)
            nll = terms["rec_loss"]
            if self.perceptual is not None:
                nll = nll + self.config.perceptual_weight * terms[self.perceptual_name]
            nll_per_ratio.append(nll)
            kl_per_ratio.append(terms["kl_loss"])
            prefix = f"{split}/r{group.ratio}"
            logs.update({f"{prefix}/{name}": value.item() for name, value in terms.items()})
            logs[f"{prefix}/nll_loss"] = nll.item()
            if logits_fake is not None:
                if self.config.disc_loss == "non_saturating":
                    gan = F.softplus(-logits_fake).mean()
                else:
                    gan = -logits_fake.mean()
                gan_per_ratio.append(gan)
                logs[f"{prefix}/g_loss"] = gan.item()

        # Every ratio counts equally, however many samples it had in this batch.
        nll_loss = torch.stack(nll_per_ratio).mean()
        kl_loss = torch.stack(kl_per_ratio).mean()
        loss = nll_loss + self.config.kl_weight * kl_loss
        d_weight = torch.zeros((), device=nll_loss.device)
        if gan_per_ratio:
            g_loss = torch.stack(gan_per_ratio).mean()
            if last_layer is not None and torch.is_grad_enabled() and last_layer.requires_grad:
                d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
            loss = loss + self.config.disc_weight * factor * d_weight * g_loss
            logs[f"{split}/g_loss"] = g_loss.item()
        logs.update(
            {
                f"{split}/nll_loss": nll_loss.item(),
                f"{split}/kl_loss": kl_loss.item(),
                f"{split}/d_weight": d_weight.item(),
                f"{split}/disc_factor": factor,
                f"{split}/total_loss": loss.item(),
            }
        )
        return loss, logs

    # ---- discriminator side ---------------------------------------------------------------

    def discriminator_loss(
        self,
        discriminator: nn.Module,
        reals: torch.Tensor,
        groups: list[RatioGroup],
        step: int,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the discriminator's optimizer (reconstructions are detached here).

        Args:
            discriminator: the PatchGAN.
            reals: the batch's original images, scored once even when each went through several ratios.
            groups: one :class:`RatioGroup` per ratio; ``real_index`` maps its rows into ``reals``.
            step: global step; before the discriminator's start the loss is 0 and nothing runs.
        """
        if not self.discriminator_active(step):
            return torch.zeros((), device=reals.device), {}
        d_loss_fn = hinge_d_loss if self.config.disc_loss == "hinge" else non_saturating_d_loss
        # Reals and every ratio's fakes in ONE forward (DDP-safe); R1 differentiates through it.
        reals = reals.detach().requires_grad_(self.config.r1_weight > 0)
        fakes = [group.reconstructions.detach() for group in groups]
        logits = discriminator(torch.cat([reals, *fakes]))
        logits_real_all, *logits_fake_groups = logits.split([len(reals)] + [len(f) for f in fakes])
        logs: dict[str, float] = {}
        losses, mean_real, mean_fake = [], [], []
        for group, logits_fake in zip(groups, logits_fake_groups):
            index = group.real_index
            logits_real = logits_real_all if index is None else logits_real_all[index]
            losses.append(d_loss_fn(logits_real, logits_fake))
            mean_real.append(logits_real.mean())
            mean_fake.append(logits_fake.mean())
            prefix = f"{split}/r{group.ratio}"
            logs[f"{prefix}/disc_loss"] = losses[-1].item()
            logs[f"{prefix}/logits_real"] = mean_real[-1].item()
            logs[f"{prefix}/logits_fake"] = mean_fake[-1].item()
        loss = torch.stack(losses).mean()
        logits_real_mean = torch.stack(mean_real).mean()
        logits_fake_mean = torch.stack(mean_fake).mean()
        if self.config.lecam_weight > 0:
            all_fakes = torch.cat([logits.flatten() for logits in logits_fake_groups])
            lecam = self.lecam_regularizer(logits_real_all.flatten(), all_fakes)
            loss = loss + self.config.lecam_weight * lecam
            logs[f"{split}/lecam"] = lecam.item()
        if self.config.r1_weight > 0:
            r1 = r1_penalty(logits_real_all, reals)
            loss = loss + 0.5 * self.config.r1_weight * r1
            logs[f"{split}/r1_penalty"] = r1.item()
        logs.update(
            {
                f"{split}/disc_loss": loss.item(),
                f"{split}/logits_real": logits_real_mean.item(),
                f"{split}/logits_fake": logits_fake_mean.item(),
            }
        )
        return loss, logs

    def lecam_regularizer(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """LeCam (Tseng et al. 2021): real logits above the fakes' EMA, fake logits below the reals' EMA.

        ``E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G(z)))^2]`` over every patch logit.
        """
        with torch.no_grad():
            decay = self.config.lecam_decay
            self.lecam_ema_real.mul_(decay).add_((1 - decay) * logits_real.detach().float().mean())
            self.lecam_ema_fake.mul_(decay).add_((1 - decay) * logits_fake.detach().float().mean())
        return (
            F.relu(logits_real - self.lecam_ema_fake).pow(2).mean()
            + F.relu(self.lecam_ema_real - logits_fake).pow(2).mean()
        )
