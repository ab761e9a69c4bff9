"""The per-token diffusion head of the masked objective (MAR's ``SimpleMLPAdaLN``, in small).

Given the backbone's output ``z`` for one token, a noisy token ``x_t`` and the time ``t``, it
predicts the token's flow velocity (:mod:`cat_generation.flow`). It is an MLP applied to every
token independently, with residual blocks modulated by ``z + time``: the backbone decides *what*
a token should be, this head draws one continuous value of it. Hand-written because no kept
library ships it; it follows Li et al. 2024 ("Autoregressive Image Generation without Vector
Quantization"), Fig. 2 and their reference code's structure.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import modulate, timestep_embedding


class ResBlock(nn.Module):
    """LayerNorm, adaLN shift/scale, MLP, adaLN gate, residual."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(condition).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """Per-token velocity MLP.

    Args:
        token_dim: values per token (``GeneratorConfig.token_dim``).
        condition_dim: size of the backbone's per-token output ``z``.
        width: hidden width.
        depth: residual blocks.
    """

    def __init__(self, token_dim: int, condition_dim: int, width: int, depth: int):
        super().__init__()
        self.width = width
        self.input_proj = nn.Linear(token_dim, width)
        self.condition_proj = nn.Linear(condition_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, token_dim)
        for layer in (self.final_modulation[-1], self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Velocity ``(M, token_dim)`` for noisy tokens ``x_t`` ``(M, token_dim)``, times ``(M,)``, ``z`` ``(M, cond)``."""
        condition = self.condition_proj(z) + self.time_mlp(timestep_embedding(t, self.width).to(z.dtype))
        x = self.input_proj(x_t)
        for block in self.blocks:
            x = block(x, condition)
        shift, scale = self.final_modulation(condition).chunk(2, dim=-1)
        return self.output(modulate(self.final_norm(x), shift, scale))
