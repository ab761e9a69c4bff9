"""Typed results of the nested VAE and its posterior distribution (as in diffusers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Padding(NamedTuple):
    """Rows and columns reflect-padded at the bottom and right to reach a multiple of 32."""

    bottom: int
    right: int


class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior over latents (as in diffusers, with mean and log-variance given apart).

    Args:
        mean: ``(B, C, h, w)`` means.
        logvar: ``(B, C, h, w)`` log-variances, clamped to [-30, 20] so ``exp`` never overflows.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussianDistribution:
        """Split ``(B, 2C, h, w)`` into mean (first C channels) and log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * eps``."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, summed over C, h, w: shape ``(B,)``."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


@dataclass
class EncoderOutput:
    """Result of :meth:`NestedVAE.encode`.

    Attributes:
        latent_dist: one batched distribution for an ``int`` ratio; for a per-sample ratio list, a
            list with one distribution (batch 1) per input image, in input order.
        ratio: the ratio (or per-sample ratios) the images were encoded at.
        padding: what was reflect-padded at the bottom and right before encoding.
        input_size: ``(H, W)`` of the input, to crop the decoded image back to.
    """

    latent_dist: DiagonalGaussianDistribution | list[DiagonalGaussianDistribution]
    ratio: int | list[int]
    padding: Padding
    input_size: tuple[int, int]


@dataclass
class DecoderOutput:
    """Result of :meth:`NestedVAE.decode`: ``sample`` is ``(B, 3, H, W)`` in (roughly) [-1, 1]."""

    sample: torch.Tensor


@dataclass
class NestedVAEOutput:
    """Result of :meth:`NestedVAE.forward`.

    Attributes:
        sample: reconstruction ``(B, 3, H, W)``, same size and order as the input.
        latent_dist: as in :class:`EncoderOutput`.
        latents: the latents that were decoded (a tensor, or a per-sample list for a ratio list).
        ratio: the ratio or per-sample ratios.
        padding: as in :class:`EncoderOutput`.
    """

    sample: torch.Tensor
    latent_dist: DiagonalGaussianDistribution | list[DiagonalGaussianDistribution]
    latents: torch.Tensor | list[torch.Tensor]
    ratio: int | list[int]
    padding: Padding


class CheckpointError(ValueError):
    """A checkpoint directory whose files do not match the model (names the keys or file at fault)."""
