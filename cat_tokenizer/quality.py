"""Quality targets (``lpips<=0.2``, ``psnr>=28``, ``ssim>=0.9``) and the metrics that check them.

:class:`QualityTarget` is the one place a target string is parsed and validated: the CLI's
``--quality`` and the API's ``quality=`` both go through :meth:`QualityTarget.parse`.
:class:`QualityMeter` measures a batch of reconstructions against their inputs with the target's
metric; LPIPS is LPIPS-VGG v0.1 on real ImageNet weights (:func:`nested_vae.perceptual.load_lpips`),
never a stand-in: without its weights the meter raises ``LPIPSUnavailableError``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# metric -> (the comparison that means "good enough", lowest allowed value, highest allowed value)
METRICS: dict[str, tuple[str, float, float]] = {
    "lpips": ("<=", 0.0, math.inf),  # a distance: lower is better
    "psnr": (">=", 0.0, math.inf),  # dB, in [0, 1] pixel range: higher is better
    "ssim": (">=", -1.0, 1.0),  # higher is better
}
# The smallest image side each metric can measure: LPIPS-VGG pools 4 times (a side under 16 px
# vanishes), SSIM's 11x11 window is reflect-padded by 5 px (which needs a side over 5 px).
MIN_SIDE = {"lpips": 16, "psnr": 1, "ssim": 6}
ACCEPTED_FORMS = "lpips<=X (e.g. lpips<=0.2), psnr>=X in dB (e.g. psnr>=28) or ssim>=X (e.g. ssim>=0.9)"
# A perfect reconstruction has infinite PSNR; JSON has no infinity, so PSNR is capped here.
PSNR_CAP_DB = 100.0

_SPEC = re.compile(r"^\s*([A-Za-z]+)\s*(<=|>=|=<|=>|<|>|==|=)\s*([^\s]+)\s*$")


class QualityTargetError(ValueError):
    """A quality target string that is not one of :data:`ACCEPTED_FORMS`."""


@dataclass(frozen=True)
class QualityTarget:
    """A reconstruction quality every image must reach: ``metric op value``.

    Args:
        metric: ``"lpips"``, ``"psnr"`` or ``"ssim"``.
        op: ``"<="`` for lpips (a distance), ``">="`` for psnr and ssim.
        value: the threshold (PSNR in dB on [0, 1] pixels).
    """

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str | QualityTarget) -> QualityTarget:
        """``"psnr>=28"`` -> ``QualityTarget("psnr", ">=", 28.0)``; a target passes through.

        Raises:
            QualityTargetError: unknown metric, wrong comparison (``lpips>=0.2``: with a hint),
                a value that is not a finite number or out of the metric's range.
        """
        if isinstance(text, QualityTarget):
            return text
        if not isinstance(text, str):
            raise QualityTargetError(f"quality target must be a string like {ACCEPTED_FORMS}; got {text!r}")
        match = _SPEC.match(text)
        if match is None:
            raise QualityTargetError(f"cannot read quality target {text!r}: use {ACCEPTED_FORMS}")
        metric, op, raw_value = match.group(1).lower(), match.group(2), match.group(3)
        if metric not in METRICS:
            raise QualityTargetError(f"unknown quality metric {metric!r} in {text!r}: use {ACCEPTED_FORMS}")
        wanted_op, low, high = METRICS[metric]
        if op != wanted_op:
            direction = "lower" if wanted_op == "<=" else "higher"
            raise QualityTargetError(
                f"quality target {text!r}: {metric} is {direction}-is-better, so the target is "
                f"{metric}{wanted_op}{raw_value} (accepted: {ACCEPTED_FORMS})"
            )
        try:
            value = float(raw_value)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not low <= value <= high:
            bounds = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
            raise QualityTargetError(
                f"quality target {text!r}: the {metric} value must be a number {bounds}, got {raw_value!r} "
                f"(accepted: {ACCEPTED_FORMS})"
            )
        return cls(metric, op, value)

    def met_by(self, measured: float) -> bool:
        """Whether a measured value reaches the target."""
        return measured <= self.value if self.op == "<=" else measured >= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def psnr(reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, ``(B,)``, with both batches ``(B, 3, H, W)`` in [0, 1] (capped at 100)."""
    mse = (reconstructions.float() - targets.float()).pow(2).mean(dim=(1, 2, 3))
    floor = 10.0 ** (-PSNR_CAP_DB / 10.0)  # the MSE at which PSNR reaches the cap
    return 10.0 * torch.log10(1.0 / mse.clamp_min(floor))


def ssim(reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SSIM per image, ``(B,)`` (torchmetrics' Gaussian 11x11 window), both batches in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        reconstructions.float(), targets.float(), data_range=1.0, reduction="none"
    )


class QualityMeter:
    """Measures reconstructions against their inputs with one target's metric.

    Args:
        target: the :class:`QualityTarget` (its metric is what gets measured).
        device: where LPIPS runs (the VAE's device).

    Raises:
        nested_vae.perceptual.LPIPSUnavailableError: ``lpips`` without its weights installed.
    """

    def __init__(self, target: QualityTarget, device: torch.device | str = "cpu"):
        self.target = target
        self._lpips = None
        if target.metric == "lpips":
            from nested_vae.perceptual import load_lpips

            self._lpips = load_lpips("vgg").to(device)

    @torch.inference_mode()
    def measure(self, reconstructions: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """One value per image; both batches ``(B, 3, H, W)`` in [-1, 1] (reconstructions clamped)."""
        metric = self.target.metric
        if min(targets.shape[-2:]) < MIN_SIDE[metric]:
            height, width = targets.shape[-2:]
            raise ValueError(
                f"{metric} cannot measure a {width}x{height} image (it needs at least "
                f"{MIN_SIDE[metric]} px a side); use psnr for tiny images"
            )
        reconstructions = reconstructions.float().clamp(-1, 1)
        targets = targets.float().to(reconstructions.device)
        if self._lpips is not None:
            values = self._lpips(reconstructions, targets)
        else:
            as_unit = (reconstructions + 1) / 2, (targets + 1) / 2  # PSNR/SSIM are defined on [0, 1]
            values = psnr(*as_unit) if metric == "psnr" else ssim(*as_unit)
        return [float(v) for v in values.cpu()]
