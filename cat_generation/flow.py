"""Flow matching (rectified flow), the one continuous-generation rule both objectives use.

Time runs from noise (``t = 0``) to data (``t = 1``): ``x_t = (1 - t) * noise + t * data`` and the
model predicts the velocity ``data - noise`` (Lipman et al. 2023; Liu et al. 2023; SD3 samples
``t`` logit-normally, as here). The ``flow`` objective applies it to whole latents through the
backbone; the ``masked`` objective applies it per token through the small diffusion head (MAR /
Fluid use a DDPM head; a flow head is the same idea with one rule fewer in this package).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sample_timesteps(count: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``(count,)`` times in (0, 1), logit-normal (mean 0, std 1): more draws mid-trajectory."""
    normal = torch.randn(count, generator=generator, device="cpu")
    return torch.sigmoid(normal).to(device)


def interpolate(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) * noise + t * data``; ``t`` broadcasts from the left over ``data``'s shape."""
    t = t.reshape(*t.shape, *([1] * (data.dim() - t.dim()))).to(data.dtype)
    return (1 - t) * noise + t * data


def velocity_target(data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict along the straight path: ``data - noise``."""
    return data - noise


def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``t = 0`` (``noise``) to 1 in ``steps`` Euler steps.

    ``velocity`` receives ``x`` and a scalar-tensor time ``t``.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    x = noise
    grid = torch.linspace(0.0, 1.0, steps + 1, device=noise.device)
    for start, end in zip(grid[:-1], grid[1:]):
        x = x + (end - start) * velocity(x, start)
    return x
