"""`LatentTransformer`: the backbone over packed latent patches (DiT blocks, 2-D RoPE, adaLN-Zero).

Per image, a condition vector ``c = label + ratio + caption + time`` (each term an embedding;
caption and time only when used) drives adaLN-Zero modulation (DiT); each token takes its image's
``c``, so one packed sequence conditions every image separately. Attention is torch's
``scaled_dot_product_attention`` with the pack's block-diagonal boolean mask, so no image sees
another. Input tokens marked in ``token_mask`` are replaced by a learned mask token (the masked
objective's input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cat_foundations.ratios import RATIOS

from .config import GeneratorConfig
from .packing import PackedBatch, per_image_to_tokens
from .rope import apply_rope, rope_angles, scaled_positions


@dataclass
class TransformerOutput:
    """What the backbone returns.

    Args:
        sample: ``(S, L, out_dim)`` per-token output (velocity for ``flow``, the diffusion head's
            condition for ``masked``); undefined on padding.
        condition: ``(N, hidden_size)`` per-image condition vectors.
    """

    sample: torch.Tensor
    condition: torch.Tensor


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features ``(N, dim)`` of ``t`` in [0, 1] (scaled by 1000 like DiT's integer steps)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = (t.float() * 1000.0)[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE under a boolean mask (torch SDPA)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, cos, sin, mask):
        rows, length, width = x.shape
        qkv = self.qkv(x).reshape(rows, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(rows, length, width))


class Block(nn.Module):
    """A DiT block: adaLN-Zero modulated attention and MLP, conditioned per token."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        width = config.hidden_size
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attention = Attention(width, config.num_heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * config.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, condition, cos, sin, mask):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(condition).chunk(6, dim=-1)
        x = x + gate1 * self.attention(modulate(self.norm1(x), shift1, scale1), cos, sin, mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class LatentTransformer(nn.Module):
    """The backbone. See the module docstring.

    Args:
        config: the :class:`GeneratorConfig`.
        out_dim: values per output token.
        timestep_conditioning: add a time embedding to the condition (the flow objective).
    """

    def __init__(self, config: GeneratorConfig, out_dim: int, timestep_conditioning: bool):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.input_proj = nn.Linear(config.token_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.ratio_embedding = nn.Embedding(len(RATIOS), width)
        self.label_embedding = nn.Embedding(config.num_labels, width)
        self.caption_proj = nn.Linear(config.caption_dim, width) if config.caption_dim else None
        self.time_mlp = (
            nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
            if timestep_conditioning
            else None
        )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final_linear = nn.Linear(width, out_dim)
        ratio_index = torch.zeros(max(RATIOS) + 1, dtype=torch.long)
        ratio_index[list(RATIOS)] = torch.arange(len(RATIOS))
        self.register_buffer("ratio_index", ratio_index, persistent=False)
        self._init_weights()

    def _init_weights(self):
        """DiT's init: Xavier linears, zeroed adaLN modulations and output (each block starts as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.ratio_embedding.weight, std=0.02)
        nn.init.normal_(self.label_embedding.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final_modulation[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def image_condition(self, batch: PackedBatch, timesteps: torch.Tensor | None) -> torch.Tensor:
        """``(N, hidden_size)``: label + ratio (+ caption) (+ time) embeddings per image."""
        condition = self.label_embedding(batch.labels) + self.ratio_embedding(
            self.ratio_index[batch.image_ratios]
        )
        if self.caption_proj is not None:
            if batch.caption_embeddings is None:
                raise ValueError("this model conditions on captions: the batch needs caption_embeddings")
            condition = condition + self.caption_proj(batch.caption_embeddings.to(condition.dtype))
        if self.time_mlp is not None:
            if timesteps is None:
                raise ValueError("this model conditions on the flow time: pass timesteps (N,)")
            condition = condition + self.time_mlp(timestep_embedding(timesteps, self.config.hidden_size))
        return condition

    def forward(
        self,
        batch: PackedBatch,
        tokens: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> TransformerOutput:
        """Run the backbone.

        Args:
            batch: the layout (and, unless ``tokens`` is given, the input tokens).
            tokens: ``(S, L, token_dim)`` inputs in the batch's layout (default ``batch.tokens``).
            timesteps: ``(N,)`` flow time per image, when the model conditions on it.
            token_mask: ``(S, L)`` bool, True where the input is replaced by the mask token.
        """
        x = self.input_proj(batch.tokens if tokens is None else tokens)
        if token_mask is not None:
            x = torch.where(token_mask[..., None], self.mask_token.to(x.dtype), x)
        condition = self.image_condition(batch, timesteps)
        token_condition = per_image_to_tokens(batch, condition)
        positions = scaled_positions(batch.positions, batch.ratios, self.config.patch_size)
        cos, sin = rope_angles(
            positions, self.config.hidden_size // self.config.num_heads, self.config.rope_theta
        )
        mask = batch.attention_mask()
        for block in self.blocks:
            x = block(x, token_condition, cos, sin, mask)
        shift, scale = self.final_modulation(token_condition).chunk(2, dim=-1)
        return TransformerOutput(self.final_linear(modulate(self.final_norm(x), shift, scale)), condition)
