"""Test and benchmark helpers: a tiny random NestedVAE saved to disk in well under a second.

The model is untrained (reconstructions are noise) but it is the real NestedVAE code path:
same config class, ``save_pretrained``/``from_pretrained``, padding, every ratio.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nested_vae import NestedVAE, NestedVAEConfig

TINY_VAE_CONFIG = {
    "base_channels": 8,
    "channel_multipliers": (1, 1, 2, 2, 2),
    "latent_channels": 4,
    "norm_num_groups": 4,
    "attention_ratios": (),
}


def build_tiny_vae(directory: str | Path, seed: int = 0) -> Path:
    """Save a ~0.1 M-parameter random NestedVAE (latent_channels 4) to ``directory``; return it."""
    torch.manual_seed(seed)
    NestedVAE(NestedVAEConfig(**TINY_VAE_CONFIG)).save_pretrained(directory)
    return Path(directory)
