"""Per-channel latent statistics per ratio: what ``latents_stats.json`` holds beside cached latents.

Diffusion trainers on cached latents (diffusers' training scripts, LightningDiT-style
``latents_stats.pt``) normalise each latent channel with its dataset mean and std. Each output
shard stores the sufficient statistics of its own latents (image and position counts, per-channel
sums and sums of squares, float64), so the run's figures are an exact sum over shards, whichever
rank wrote them and whether or not the run was resumed; no latent is read twice.
"""

from __future__ import annotations

import math

import torch

from cat_foundations.ratios import RATIOS

STATS_FORMAT = "cat-tokenizer-latent-stats-v1"


class LatentStats:
    """Running per-ratio, per-channel sums over latents ``C x h x w``."""

    def __init__(self, sums: dict | None = None):
        # ratio -> {"images", "positions", "sum": [C], "sum_sq": [C]}
        self.sums: dict[str, dict] = {key: dict(value) for key, value in (sums or {}).items()}

    def add(self, ratio: int, latent: torch.Tensor) -> None:
        """Count one latent (unscaled, as stored)."""
        flat = latent.detach().to("cpu", torch.float64).reshape(latent.shape[0], -1)
        entry = self.sums.setdefault(
            str(ratio),
            {"images": 0, "positions": 0, "sum": [0.0] * flat.shape[0], "sum_sq": [0.0] * flat.shape[0]},
        )
        if len(entry["sum"]) != flat.shape[0]:
            raise ValueError(
                f"ratio {ratio}: latent has {flat.shape[0]} channels, earlier ones {len(entry['sum'])}"
            )
        entry["images"] += 1
        entry["positions"] += flat.shape[1]
        entry["sum"] = [a + b for a, b in zip(entry["sum"], flat.sum(dim=1).tolist())]
        entry["sum_sq"] = [a + b for a, b in zip(entry["sum_sq"], flat.pow(2).sum(dim=1).tolist())]

    def merge(self, other: LatentStats) -> LatentStats:
        """The sums of both (a new object)."""
        merged = LatentStats(self.sums)
        for ratio, entry in other.sums.items():
            if ratio not in merged.sums:
                merged.sums[ratio] = dict(entry)
                continue
            mine = merged.sums[ratio]
            merged.sums[ratio] = {
                "images": mine["images"] + entry["images"],
                "positions": mine["positions"] + entry["positions"],
                "sum": [a + b for a, b in zip(mine["sum"], entry["sum"])],
                "sum_sq": [a + b for a, b in zip(mine["sum_sq"], entry["sum_sq"])],
            }
        return merged

    def to_dict(self) -> dict:
        """JSON form of the sums (what a shard stores)."""
        return {key: dict(value) for key, value in self.sums.items()}

    def summary(self, scaling_factor: float) -> dict:
        """``latents_stats.json``: per ratio the per-channel mean and std (population) of the stored latents.

        ``scaling_factor`` is the VAE's; ``suggested_scaling_factor`` is ``1 / std`` over all
        channels at that ratio (what would give unit variance), for comparison.
        """
        ratios = {}
        for ratio in sorted(self.sums, key=int):
            entry = self.sums[ratio]
            n = entry["positions"]
            mean = [s / n for s in entry["sum"]]
            var = [max(q / n - m * m, 0.0) for q, m in zip(entry["sum_sq"], mean)]
            overall_mean = sum(entry["sum"]) / (n * len(mean))
            overall_var = max(sum(entry["sum_sq"]) / (n * len(mean)) - overall_mean**2, 0.0)
            ratios[ratio] = {
                "images": entry["images"],
                "positions": n,
                "channels": len(mean),
                "mean": mean,
                "std": [math.sqrt(v) for v in var],
                "std_all_channels": math.sqrt(overall_var),
                "suggested_scaling_factor": 1.0 / math.sqrt(overall_var) if overall_var > 0 else None,
            }
        return {
            "format": STATS_FORMAT,
            "scaling_factor": scaling_factor,
            "latents": "unscaled (as stored); a diffusion model sees (latent - mean) / std or latent * scaling_factor",
            "ratios": ratios,
            "ratios_without_images": [r for r in RATIOS if str(r) not in ratios],
        }
