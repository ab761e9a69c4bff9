"""Which compression ratio each training sample goes through.

* ``"router"`` -- the CAT way: the dataset carries a router label per image (the ratio the
  caption's complexity score maps to); unlabeled samples fall back to a uniform draw.
* ``"uniform"`` -- every sample draws one of the ratios uniformly at random.
* ``"all"`` -- every image goes through all ratios (three times the compute per image).

The draw for a step depends only on (seed, step, process index), so a resumed run draws the
same ratios the uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cat_foundations.ratios import RATIOS

MODES = ("router", "uniform", "all")


@dataclass
class RatioAssignment:
    """A batch expanded for the VAE: ``rows[i]`` of the input batch goes through ``ratios[i]``.

    In ``"all"`` mode each input row appears once per ratio; otherwise ``rows`` is ``0..B-1``.
    """

    rows: torch.Tensor
    ratios: list[int]

    def groups(self) -> dict[int, torch.Tensor]:
        """Positions (into the expanded batch) of each ratio present, in ascending ratio order."""
        ratios = torch.tensor(self.ratios)
        return {int(r): torch.nonzero(ratios == r).flatten() for r in sorted(set(self.ratios))}


class RatioSampler:
    """Assigns a ratio to every sample of a batch.

    Args:
        mode: ``"router"``, ``"uniform"`` or ``"all"``.
        ratios: the ratios the model supports.
        seed: base seed of the random draws.
        process_index: distributed rank, so ranks draw independently.
    """

    def __init__(
        self,
        mode: str = "uniform",
        ratios: tuple[int, ...] = RATIOS,
        seed: int = 0,
        process_index: int = 0,
    ):
        if mode not in MODES:
            raise ValueError(f"ratio sampling mode must be one of {MODES}, got {mode!r}")
        self.mode, self.ratios, self.seed, self.process_index = mode, tuple(ratios), seed, process_index

    def assign(self, batch_size: int, step: int, labels: torch.Tensor | None = None) -> RatioAssignment:
        """Ratios for a batch at ``step``; ``labels`` are router labels (0 = none) for ``"router"``."""
        if self.mode == "all":
            rows = torch.arange(batch_size).repeat(len(self.ratios))
            return RatioAssignment(rows, [r for r in self.ratios for _ in range(batch_size)])
        generator = torch.Generator().manual_seed(hash((self.seed, step, self.process_index)) & 0x7FFF_FFFF)
        draws = torch.randint(len(self.ratios), (batch_size,), generator=generator)
        ratios = [self.ratios[int(i)] for i in draws]
        if self.mode == "router" and labels is not None:
            ratios = [
                int(label) if int(label) in self.ratios else drawn
                for label, drawn in zip(labels.tolist(), ratios)
            ]
        return RatioAssignment(torch.arange(batch_size), ratios)
