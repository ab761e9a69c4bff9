"""Cheap image features for hybrid routing: how much detail an image holds, at every ratio's scale.

A hybrid router head reads these next to the caption's LLM features (``router.head``). All are
parameter-free and cost a few milliseconds at 256 px, far less than the VAE encode:

* ``log_jpeg_bpp_q75`` / ``log_jpeg_bpp_q30``: log bits per pixel of a Pillow JPEG (the image-only
  baseline of :mod:`router.fallback`, at two qualities: fine and coarse detail);
* ``log_gradient_energy``: log mean squared luminance gradient (edges, text strokes);
* ``log_thumbnail_mse_8x/16x/32x``: log mean squared error of a box-filtered thumbnail with the
  latent grid of that ratio, upsampled bicubically -- the detail a codec of that grid must
  synthesise. The nested VAE's own parameter-free shortcut is the same kind of thumbnail, so
  these track how its exits differ per image.

The image is resized so its shorter side is ``side`` pixels first (every feature depends on
scale), as the JPEG fallback does.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from router.fallback import jpeg_bits_per_pixel, resize_short_side

IMAGE_FEATURE_NAMES = (
    "log_jpeg_bpp_q75",
    "log_jpeg_bpp_q30",
    "log_gradient_energy",
    "log_thumbnail_mse_8x",
    "log_thumbnail_mse_16x",
    "log_thumbnail_mse_32x",
)
_EPS = 1e-8


def _thumbnail_mse(image: Image.Image, pixels: np.ndarray, ratio: int) -> float:
    grid = (max(1, image.width // ratio), max(1, image.height // ratio))
    thumbnail = image.resize(grid, Image.Resampling.BOX).resize(image.size, Image.Resampling.BICUBIC)
    return float(np.mean((np.asarray(thumbnail, dtype=np.float32) / 255.0 - pixels) ** 2))


def image_features(image, side: int = 256) -> list[float]:
    """The :data:`IMAGE_FEATURE_NAMES` values of one image (PIL, path, array...), in that order."""
    resized = resize_short_side(image, side)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    luminance = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gradient = np.mean(np.diff(luminance, axis=0) ** 2) + np.mean(np.diff(luminance, axis=1) ** 2)
    values = [
        math.log(jpeg_bits_per_pixel(resized, 75, side)),  # already at ``side``: not resized again
        math.log(jpeg_bits_per_pixel(resized, 30, side)),
        math.log(float(gradient) + _EPS),
    ]
    values += [math.log(_thumbnail_mse(resized, pixels, ratio) + _EPS) for ratio in (8, 16, 32)]
    return values
