"""load_image on the awkward real-world files users feed a tokenizer (all made here with PIL)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cat_tokenizer.images import (
    ImageLoadError,
    center_crop_resize,
    limit_max_side,
    load_image,
    pil_to_tensor,
    tensor_to_pil,
)


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    loaded = load_image(_save(image, tmp_path / "a.png"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (3, 3), 0)
    image.putpalette([10, 20, 30] + [200, 0, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    path = _save(image, tmp_path / "p.png", transparency=0)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 1)) == (200, 0, 0)


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    array = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(array), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    loaded = load_image(path)
    assert [loaded.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg_and_grayscale_become_rgb(tmp_path):
    cmyk = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    red = load_image(cmyk).getpixel((4, 4))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    gray = load_image(_save(Image.new("L", (5, 5), 77), tmp_path / "g.png"))
    assert gray.mode == "RGB" and gray.getpixel((2, 2)) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(image, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"this is not an image", "not an image"), (b"", "not an image")],
)
def test_non_image_files_name_the_file(tmp_path, content, reason):
    path = tmp_path / "notes.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as caught:
        load_image(path)
    assert str(path) in str(caught.value)


def test_truncated_jpeg_is_an_error_not_a_half_image(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_array_and_tensor_inputs():
    array = np.zeros((2, 3, 3), dtype=np.uint8)
    array[0, 0] = (255, 128, 0)
    assert load_image(array).getpixel((0, 0)) == (255, 128, 0)
    unit = torch.zeros(3, 2, 2)
    unit[:, 0, 0] = 1.0
    assert load_image(unit).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(unit).getpixel((1, 1)) == (0, 0, 0)
    signed = torch.full((3, 2, 2), -1.0)
    assert load_image(signed).getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ImageLoadError, match="dtype uint8"):
        load_image(np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ImageLoadError, match=r"\[0, 1\] or \[-1, 1\]"):
        load_image(torch.full((3, 2, 2), 3.0))


def test_tensor_round_trip_is_exact():
    array = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    tensor = pil_to_tensor(Image.fromarray(array))
    assert tensor.shape == (3, 7, 5) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)), array)


def test_tiny_and_resize_helpers():
    one = Image.new("RGB", (1, 1), (9, 9, 9))
    assert load_image(one).size == (1, 1)
    assert center_crop_resize(Image.new("RGB", (300, 200)), 128).size == (128, 128)
    assert limit_max_side(Image.new("RGB", (8000, 6000)), 1024).size == (1024, 768)
    assert limit_max_side(Image.new("RGB", (100, 50)), 1024).size == (100, 50)


def test_load_image_bytes_decodes_in_memory_images_and_names_the_source():
    from cat_foundations.images import load_image_bytes
    from cat_tokenizer.testing import png_bytes

    buffer = io.BytesIO()
    Image.new("RGBA", (6, 4), (255, 0, 0, 0)).save(buffer, format="PNG")
    image = load_image_bytes(buffer.getvalue(), "00003.tar:key1")
    assert image.mode == "RGB" and image.size == (6, 4) and image.getpixel((0, 0)) == (255, 255, 255)
    noise = png_bytes(seed=1)
    with pytest.raises(ImageLoadError, match=r"00003.tar:key1: corrupt or truncated image"):
        load_image_bytes(noise[: len(noise) // 2], "00003.tar:key1")
