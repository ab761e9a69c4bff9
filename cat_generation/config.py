"""`GeneratorConfig`: every choice of the reference generator, checked when it is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

OBJECTIVES = ("flow", "masked")


@dataclass
class GeneratorConfig:
    """The reference generator's architecture and objective.

    Args:
        latent_channels: channels of the VAE latent (``NestedVAEConfig.latent_channels``: 16 for
            the shipped checkpoint, 4 for the tiny test VAE).
        patch_size: latent positions per token side. 1 keeps CAT's token counts (1024 / 256 / 64
            for a 256x256 image); 2 divides them by 4 but needs even latent sides.
        hidden_size: transformer width; must be divisible by ``num_heads``.
        depth: transformer blocks.
        num_heads: attention heads; ``hidden_size / num_heads`` must be divisible by 4 (2-D RoPE
            rotates pairs of channels on two axes).
        mlp_ratio: MLP width as a multiple of ``hidden_size``.
        num_labels: classes/domains for label conditioning (1: unconditional).
        caption_dim: size of the caption embedding fed to adaLN (0: no caption conditioning).
        rope_theta: RoPE base. Positions are counted in 8x-latent cells (a 512-pixel side is 64
            cells), so a base of 100 already spans every wavelength a grid can use.
        objective: ``"flow"`` (flow matching over the whole latent) or ``"masked"`` (masked
            random-order generation with a per-token diffusion head).
        head_hidden_size: width of the per-token diffusion MLP head (``masked`` only).
        head_depth: residual blocks of that head.
        head_batch_mul: noise draws per masked token per step in the head's loss (MAR's
            ``diffusion_batch_mul``: the head is cheap, so more draws per backbone pass pay).
    """

    latent_channels: int = 16
    patch_size: int = 1
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_labels: int = 1
    caption_dim: int = 0
    rope_theta: float = 100.0
    objective: str = "flow"
    head_hidden_size: int = 128
    head_depth: int = 2
    head_batch_mul: int = 4

    def __post_init__(self):
        for name in ("latent_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_labels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("head_hidden_size", "head_depth", "head_batch_mul"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.caption_dim < 0:
            raise ValueError(
                f"caption_dim must be >= 0 (0 turns caption conditioning off), got {self.caption_dim}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick a hidden_size that is a multiple of num_heads"
            )
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"head size {self.hidden_size // self.num_heads} must be divisible by 4 for 2-D RoPE; "
                "raise hidden_size or lower num_heads"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.mlp_ratio <= 0 or self.rope_theta <= 1:
            raise ValueError("mlp_ratio must be > 0 and rope_theta > 1")

    @property
    def token_dim(self) -> int:
        """Values per token: ``latent_channels * patch_size ** 2``."""
        return self.latent_channels * self.patch_size**2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> GeneratorConfig:
        """A config from :meth:`to_dict`; an unknown key is an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown generator config keys {unknown}; known: {sorted(known)}")
        return cls(**value)
