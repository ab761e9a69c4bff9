"""Fixtures for the CLI tests: tiny real models (built here) and a folder of awkward real files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image


def noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def _write_small_images(directory, count: int, size: int = 32) -> list[str]:
    """``count`` small noise PNGs named img_000.png...; returns the names."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"img_{index:03d}.png"
        noise(size, size, seed=index).save(directory / name)
        names.append(name)
    return names


@pytest.fixture
def write_small_images():
    """``write_small_images(directory, count, size=32)`` -> names of the noise PNGs written."""
    return _write_small_images


def _exif_rotated_jpeg(path):
    """A 40 (wide) x 24 (tall) JPEG whose EXIF orientation 6 says: rotate 90 degrees to display."""
    image = noise(40, 24, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)


def _sixteen_bit_png(path):
    ramp = (np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    Image.fromarray(ramp).save(path)  # uint16 -> mode I;16
    assert Image.open(path).mode.startswith("I")


@pytest.fixture(scope="session")
def awkward_folder(tmp_path_factory):
    """Every robustness case of the issue as a real file plus a captions.jsonl with the bad lines.

    Returns (images_dir, captions_path, expectations) where expectations names which ids must be
    tokenized and which files / caption lines must be reported.
    """
    root = tmp_path_factory.mktemp("awkward")
    images = root / "images"
    images.mkdir()
    noise(40, 30, seed=1).save(images / "photo.jpg", quality=90)
    noise(40, 30, seed=2, mode="CMYK").save(images / "cmyk.jpg")
    _sixteen_bit_png(images / "gray16.png")
    rgba = noise(24, 24, seed=3, mode="RGBA")
    rgba.putalpha(Image.new("L", (24, 24), 0))
    rgba.save(images / "rgba.png")
    noise(24, 24, seed=4).convert("P", palette=Image.Palette.ADAPTIVE).save(images / "palette.png")
    noise(24, 24, seed=5, mode="L").save(images / "gray.png")
    _exif_rotated_jpeg(images / "exif_rotated.jpg")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(images / "one_pixel.png")
    Image.new("RGB", (8000, 6000), (30, 120, 200)).save(images / "huge.jpg", quality=75)
    buffer = io.BytesIO()
    noise(64, 64, seed=6).save(buffer, format="JPEG", quality=95)
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (images / "not_an_image.png").write_bytes(b"this is a text file with a .png name\n")
    (images / "sub").mkdir()
    noise(32, 32, seed=8).save(images / "sub" / "nested.png")
    (images / "notes.txt").write_text("not an image extension: ignored unless a caption names it\n")

    lines = [
        json.dumps({"image": "photo.jpg", "caption": "a noisy photo of static"}),  # 1
        json.dumps({"file_name": "cmyk.jpg", "text": "a CMYK print scan"}),  # 2
        json.dumps({"image": "gray16.png", "caption": "a 16-bit gradient"}),  # 3
        json.dumps({"image": "rgba.png", "caption": "a transparent logo"}),  # 4
        json.dumps({"image": "gray.png", "caption": ""}),  # 5 empty
        json.dumps({"image": "exif_rotated.jpg", "caption": "a phone photo in portrait"}),  # 6
        json.dumps({"image": "one_pixel.png", "caption": "a single red pixel"}),  # 7
        json.dumps({"image": "huge.jpg", "caption": "a plain blue sky"}),  # 8
        json.dumps({"image": "truncated.jpg", "caption": "a cut-off download"}),  # 9
        json.dumps({"image": "not_an_image.png", "caption": "not really an image"}),  # 10
        '{"image": "sub/nested.png", "caption": broken json',  # 11 bad JSON
        json.dumps({"image": "missing.jpg", "caption": "a file that is not there"}),  # 12
        json.dumps({"image": "./cmyk.jpg", "caption": "the same image again"}),  # 13 duplicate
    ]
    raw = (
        "\n".join(lines).encode("utf-8") + b"\n" + b'{"image": "palette.png", "caption": "caf\xe9"}\n'
    )  # 14 latin-1
    captions = root / "captions.jsonl"
    captions.write_bytes(raw)
    expectations = {
        "ok": {
            "photo.jpg",
            "cmyk.jpg",
            "gray16.png",
            "rgba.png",
            "gray.png",
            "exif_rotated.jpg",
            "one_pixel.png",
            "huge.jpg",
            "palette.png",
            "sub/nested.png",
        },
        "failed_images": {"truncated.jpg": "corrupt or truncated", "not_an_image.png": "not an image"},
        "failed_lines": {11: "not valid JSON", 12: "missing file", 13: "duplicate", 14: "UTF-8"},
        "fallback": {"gray.png", "palette.png", "sub/nested.png"},
    }
    return images, captions, expectations


def _cli_args(images, out, vae, *extra) -> list[str]:
    return ["--images", str(images), "--out", str(out), "--vae", str(vae), *map(str, extra)]


@pytest.fixture
def cli_args():
    """``cli_args(images, out, vae, *extra)`` -> the argv list of a ``cat-tokenize`` run."""
    return _cli_args


@pytest.fixture
def write_tar_shards():
    """``write_tar_shards(directory, shards, per_shard, size=32)`` -> sample ids (``shard/key``)."""
    from cat_tokenizer.testing import write_tar_shards

    return write_tar_shards
