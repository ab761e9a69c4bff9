"""Nested VAE: one model, three compression ratios (8x, 16x, 32x) with shared weights."""

from .model import (
    RATIOS,
    CheckpointError,
    DecoderOutput,
    DiagonalGaussianDistribution,
    EncoderOutput,
    NestedVAE,
    NestedVAEConfig,
    NestedVAEOutput,
    Padding,
)

__all__ = [
    "RATIOS",
    "CheckpointError",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "EncoderOutput",
    "NestedVAE",
    "NestedVAEConfig",
    "NestedVAEOutput",
    "Padding",
]
