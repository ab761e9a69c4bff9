"""Turning whatever a user hands us into an RGB image, and images into model tensors.

Every image that enters cat-tokenizer goes through :func:`load_image`, so the rules below
hold everywhere (library, CLI, trainer, benchmarks):

* EXIF orientation is applied (a phone photo shot in portrait stays in portrait).
* CMYK, palette (``P``), grayscale (``L``/``LA``), 16-bit (``I;16``/``I``) and float (``F``)
  images are converted to 8-bit RGB. 16-bit data is scaled by its real bit depth (``>> 8``),
  not clipped.
* Transparency (RGBA, LA, palette with a transparent index) is composited on **white**:
  most transparent images in the wild are logos and clip art drawn for a white page.
* Truncated or corrupt files raise :class:`ImageLoadError` naming the file and the reason;
  nothing is half-decoded silently (PIL's ``LOAD_TRUNCATED_IMAGES`` stays off).

Model tensors are float CHW in ``[-1, 1]`` (the VAE's input convention).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb guard: well above 8000x6000 (48 MP) photos, below pathological files.
Image.MAX_IMAGE_PIXELS = 200_000_000

WHITE = (255, 255, 255)


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image. ``source`` names the file (or the input type)."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    array = np.asarray(image)
    if image.mode == "F":
        array = np.clip(array, 0.0, 1.0 if array.max() <= 1.0 else 255.0)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        eight_bit = (array * scale).round().astype(np.uint8)
    else:
        # I;16 / I: 16-bit samples stored in a 32-bit container. Scale by the 16-bit range.
        eight_bit = (np.clip(array, 0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB with the rules in the module docstring."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        return _composite_on_white(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _sixteen_bit_to_rgb(image)
    # CMYK, YCbCr, L, 1, P without transparency: PIL's own conversion is correct.
    return image.convert("RGB")


def _open_file(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageLoadError(str(path), "file not found")
    if path.is_dir():
        raise ImageLoadError(str(path), "is a directory, not an image")
    return _decode(path, str(path))


def _decode(source, name: str) -> Image.Image:
    """Fully decode ``source`` (a path or a binary file object) to RGB; errors name ``name``."""
    try:
        with Image.open(source) as handle:
            handle.load()  # forces a full decode so truncation is caught here, not later
            return to_rgb(handle)
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file (unrecognised format)") from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(name, f"image too large: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(name, f"corrupt or truncated image: {error}") from None


def load_image_bytes(data: bytes, source: str) -> Image.Image:
    """:func:`load_image` for an encoded image held in memory (a tar member, a dataset cell).

    ``source`` names it in errors (e.g. ``shard-00003.tar:000031.jpg``).
    """
    return _decode(io.BytesIO(data), source)


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageLoadError("numpy array", f"expected dtype uint8 (HWC), got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageLoadError("numpy array", f"expected HWC with 1, 3 or 4 channels, got shape {array.shape}")
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0]).convert("RGB")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def _from_tensor(tensor: torch.Tensor) -> Image.Image:
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ImageLoadError("tensor", f"expected CHW with 1 or 3 channels, got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().float().cpu()
    if tensor.min() < -1.0001 or tensor.max() > 1.0001:
        raise ImageLoadError("tensor", "values must lie in [0, 1] or [-1, 1]")
    if tensor.min() < 0:  # [-1, 1] convention; a tensor with no negative value is read as [0, 1]
        tensor = (tensor + 1) / 2
    return tensor_to_pil(tensor * 2 - 1)


def load_image(image) -> Image.Image:
    """Return an 8-bit RGB PIL image from a path, PIL image, numpy array or tensor.

    Args:
        image: a file path (``str`` or ``os.PathLike``); a PIL image of any mode; a numpy
            ``uint8`` array shaped HxW or HxWxC (C = 1, 3 or 4); or a float tensor shaped CxHxW
            with values in ``[0, 1]`` or ``[-1, 1]`` (a tensor with any negative value is read
            as ``[-1, 1]``, otherwise as ``[0, 1]``).

    Raises:
        ImageLoadError: the input is missing, not an image, corrupt, or of an unsupported shape.
    """
    if isinstance(image, (str, os.PathLike)):
        return _open_file(Path(image))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image)
    raise ImageLoadError(
        type(image).__name__, "unsupported image type (use a path, PIL image, numpy array or tensor)"
    )


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor CxHxW in ``[-1, 1]``."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor CxHxW in ``[-1, 1]`` -> RGB PIL image (values outside are clamped)."""
    if tensor.ndim != 3:
        raise ValueError(f"expected a CxHxW tensor, got shape {tuple(tensor.shape)}")
    array = tensor.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0]).convert("RGB")
    return Image.fromarray(array)


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square on the short side, then resize to ``size`` x ``size`` (bicubic).

    This is the fixed evaluation protocol (crop first, then resize, never pad): comparing
    rFID across papers breaks when crops differ, so every benchmark uses this one function.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), Image.Resampling.BICUBIC)


def limit_max_side(image: Image.Image, max_side: int | None) -> Image.Image:
    """Downscale (Lanczos, aspect kept) so the longest side is at most ``max_side``; never upscale."""
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new_size, Image.Resampling.LANCZOS)
