"""`LatentGenerator`: one backbone, two objectives, and its checkpoint format.

```python
model = LatentGenerator(GeneratorConfig(latent_channels=16, objective="flow"))
loss = model.loss(batch)                       # batch: a normalised PackedBatch (cat_generation.batching)
tokens = model.sample(layout, steps=32)        # layout: a PackedBatch of the shapes/ratios/labels wanted
latents = layout.latents(tokens)               # list of (C, h, w), still normalised
model.save_pretrained(run_dir); LatentGenerator.from_pretrained(run_dir)
```

* ``flow``: the backbone predicts the velocity of every token of every image at a per-image time
  (:mod:`cat_generation.flow`); sampling integrates it from noise in ``steps`` Euler steps.
* ``masked``: the backbone reads the unmasked tokens and the head draws the masked ones
  (:mod:`cat_generation.masked`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from cat_foundations.atomic import atomic_write_bytes, atomic_write_json

from .config import GeneratorConfig
from .flow import euler_sample, interpolate, sample_timesteps, velocity_target
from .head import DiffusionHead
from .masked import masked_loss, masked_sample
from .model import LatentTransformer
from .packing import PackedBatch, per_image_to_tokens

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class LatentGenerator(nn.Module):
    """The reference generator (see the module docstring).

    Args:
        config: the :class:`GeneratorConfig`; ``config.objective`` picks the output and the loss.
    """

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        flow = config.objective == "flow"
        out_dim = config.token_dim if flow else config.hidden_size
        self.backbone = LatentTransformer(config, out_dim, timestep_conditioning=flow)
        self.head = (
            None
            if flow
            else DiffusionHead(
                config.token_dim, config.hidden_size, config.head_hidden_size, config.head_depth
            )
        )

    def forward(self, batch: PackedBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss (``forward`` so that DDP / accelerate wrappers see the call)."""
        return self.loss(batch, generator)

    def loss(self, batch: PackedBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        """The objective's scalar training loss on a normalised batch (padding never counts)."""
        if self.config.objective == "masked":
            return masked_loss(self, batch, generator)
        return self._flow_loss(batch, generator)

    def _flow_loss(self, batch: PackedBatch, generator: torch.Generator | None) -> torch.Tensor:
        data = batch.tokens
        noise = torch.randn(data.shape, generator=generator).to(data)
        t = sample_timesteps(batch.num_images, generator, data.device)
        x_t = interpolate(data, noise, per_image_to_tokens(batch, t))
        prediction = self.backbone(batch, x_t, timesteps=t).sample
        error = (prediction - velocity_target(data, noise)).pow(2).mean(dim=-1)
        real = batch.real_tokens.to(error.dtype)
        return (error * real).sum() / real.sum()

    @torch.no_grad()
    def sample(
        self,
        layout: PackedBatch,
        steps: int = 32,
        head_steps: int = 16,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(S, L, token_dim)`` generated (normalised) tokens in ``layout``'s shapes.

        Args:
            layout: the images wanted: shapes, ratios, labels (and caption embeddings); its token
                values are ignored.
            steps: Euler steps (``flow``) or parallel decoding steps (``masked``).
            head_steps: Euler steps of the per-token head (``masked`` only).
            temperature: noise scale of the head's draws (``masked`` only; < 1 is more conservative).
            generator: random source (CPU generator), for reproducible samples.
        """
        if self.config.objective == "masked":
            return masked_sample(self, layout, steps, head_steps, temperature, generator)
        noise = torch.randn(layout.tokens.shape, generator=generator).to(layout.tokens)
        times = torch.ones(layout.num_images, device=noise.device)
        return euler_sample(lambda x, t: self.backbone(layout, x, timesteps=times * t).sample, noise, steps)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (atomically) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        atomic_write_bytes(directory / WEIGHTS_NAME, save(state))
        atomic_write_json(directory / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> LatentGenerator:
        """Load what :meth:`save_pretrained` wrote, in eval mode."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} + {WEIGHTS_NAME} (not a cat-gen run)")
        config = GeneratorConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.to(device).eval()
