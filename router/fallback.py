"""Image-only fallback score for images without a caption: JPEG bits per pixel.

This is the baseline CAT compared against: an image that JPEG cannot compress well is visually
complex. The image is resized so its shorter side is ``side`` pixels (bpp depends on scale),
encoded with Pillow's JPEG at a fixed ``quality``, and the bits per pixel are mapped to 1..9
log-linearly:

    score = clip(1 + 8 * (log(bpp) - log(bpp_at_1)) / (log(bpp_at_9) - log(bpp_at_1)), 1, 9)

Default calibration (side 256, quality 75): ``bpp_at_1`` and ``bpp_at_9`` are the 5th and 95th
percentiles of the devset images (``shared/data/devset``, 346 photos, faces, charts, clip art and
text pages), measured with :func:`fit_jpeg_bpp_calibration`. Re-fit on your own data if it differs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cat_foundations.images import load_image
from router.scores import SOURCE_IMAGE_JPEG_BPP, ComplexityScore


@dataclass(frozen=True)
class JpegBppCalibration:
    """Maps JPEG bits per pixel to a 1..9 score.

    Args:
        bpp_at_1: bits per pixel that maps to score 1 (and anything below it).
        bpp_at_9: bits per pixel that maps to score 9 (and anything above it).
        quality: Pillow JPEG quality used for the measurement.
        side: the image is resized so its shorter side has this many pixels before encoding.
    """

    bpp_at_1: float = 0.56
    bpp_at_9: float = 2.08
    quality: int = 75
    side: int = 256

    def to_score(self, bpp: float) -> float:
        position = (math.log(max(bpp, 1e-6)) - math.log(self.bpp_at_1)) / (
            math.log(self.bpp_at_9) - math.log(self.bpp_at_1)
        )
        return float(min(9.0, max(1.0, 1.0 + 8.0 * position)))


DEFAULT_CALIBRATION = JpegBppCalibration()


def _as_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    # Paths, arrays and tensors go through the project's one image loader (EXIF, CMYK, alpha...).
    return load_image(image)


def resize_short_side(image, side: int = 256) -> Image.Image:
    """RGB ``image`` (PIL, path, array...) resized bicubically so its shorter side is ``side`` pixels."""
    rgb = _as_rgb(image)
    scale = side / min(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.BICUBIC)


def jpeg_bits_per_pixel(image, quality: int = 75, side: int = 256) -> float:
    """Bits per pixel of ``image`` as a Pillow JPEG at ``quality`` after resizing to shorter side ``side``."""
    resized = resize_short_side(image, side)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=quality)
    return 8.0 * buffer.tell() / (resized.width * resized.height)


def image_complexity_score(image, calibration: JpegBppCalibration = DEFAULT_CALIBRATION) -> ComplexityScore:
    """Complexity of an image from its pixels alone (source ``"image_jpeg_bpp"``).

    ``rating`` equals ``score``; there is no LLM distribution and there are no flags.
    """
    bpp = jpeg_bits_per_pixel(image, calibration.quality, calibration.side)
    value = calibration.to_score(bpp)
    return ComplexityScore(score=value, rating=value, distribution=[], flags={}, source=SOURCE_IMAGE_JPEG_BPP)


def fit_jpeg_bpp_calibration(
    images: Iterable, quality: int = 75, side: int = 256, percentiles: tuple[float, float] = (5.0, 95.0)
) -> JpegBppCalibration:
    """Calibration whose scores 1 and 9 sit at the given bpp percentiles of ``images``."""
    bpps = [jpeg_bits_per_pixel(image, quality, side) for image in images]
    if len(bpps) < 2:
        raise ValueError("fitting a JPEG bpp calibration needs at least two images")
    low, high = np.percentile(bpps, percentiles)
    if not high > low:
        raise ValueError("the images' bits per pixel do not spread: cannot fit a calibration")
    return JpegBppCalibration(bpp_at_1=float(low), bpp_at_9=float(high), quality=quality, side=side)
