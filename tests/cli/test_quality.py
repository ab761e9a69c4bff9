"""`cat-tokenize --quality`: measured routing with the shipped VAE on the bundled real images.

The expected ratios are derived here, independently of the code under test: every image is
encoded and decoded at each ratio through ``NestedVAE``'s own API and its PSNR computed in this
file; the CLI must then pick, per image, the ratio with the fewest tokens that meets the target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cat_foundations.images import limit_max_side, load_image, pil_to_tensor
from cat_foundations.ratios import RATIOS, tokens_for
from cat_tokenizer.cli import main
from cat_tokenizer.store import read_jsonl
from nested_vae import NestedVAE

MAX_SIDE = 64  # small images keep three decodes per image cheap on 2 CPU cores
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"
PICKED = (
    "chart_sklearn_011.png",
    "clipart_skimage_001.png",
    "face_skimage_002.jpg",
    "photo_jxltest_002.jpg",
    "text_skimage_002.png",
)
MARGIN_DB = 0.05  # an intermediate threshold stays this far from every measured value


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality_images")
    for name in PICKED:
        shutil.copy(EXAMPLES / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def measured_psnr(images_dir) -> dict[str, dict[int, float]]:
    """PSNR (dB, [0, 1] pixels) of every image at every ratio, through NestedVAE.encode/decode."""
    vae = NestedVAE.from_pretrained("default", device="cpu").eval()
    values = {}
    with torch.inference_mode():
        for name in PICKED:
            image = limit_max_side(load_image(images_dir / name), MAX_SIDE)
            pixels = pil_to_tensor(image)[None]
            values[name] = {}
            for ratio in RATIOS:
                latent = vae.encode(pixels, ratio).latent_dist.mean
                recon = vae.decode(latent, ratio, output_size=pixels.shape[-2:]).sample.clamp(-1, 1)
                mse = ((recon + 1) / 2 - (pixels + 1) / 2).pow(2).mean()
                values[name][ratio] = float(10 * torch.log10(1 / mse))
    return values


def _tokenize(images, out, *extra) -> int:
    return main(["--images", str(images), "--out", str(out), "--max-side", str(MAX_SIDE), "--quiet", *extra])


def _cheapest_meeting(values: dict[int, float], threshold: float, size) -> int:
    passing = [ratio for ratio, value in values.items() if value >= threshold]
    if not passing:
        return 8
    return min(passing, key=lambda ratio: tokens_for(ratio, size))


def test_a_loose_target_puts_every_image_at_32x(images_dir, tmp_path):
    out = tmp_path / "tokens"
    assert _tokenize(images_dir, out, "--quality", "psnr>=5") == 0
    manifest = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["id"] for r in manifest) == sorted(PICKED)
    for record in manifest:
        assert record["ratio"] == 32
        assert record["score_source"] == "quality_measured"
        quality = record["extra"]["quality"]
        assert quality["target"] == "psnr>=5" and quality["met"] is True
        assert set(quality["measured"]) == {"8", "16", "32"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quality"]["target"] == "psnr>=5"
    assert summary["quality"]["missed"] == 0
    assert summary["quality"]["mean_tokens"] == summary["mean_tokens"]
    cost = summary["quality"]["cost"]
    assert cost["images_measured_this_run"] == len(PICKED)
    assert cost["passes_per_image"]["vae_decode"] == 3
    assert cost["cost_vs_fixed16"] > 0
    assert json.loads((out / "run.json").read_text())["quality"] == "psnr>=5"


def test_an_impossible_target_puts_every_image_at_8x_and_counts_every_miss(images_dir, tmp_path):
    out = tmp_path / "tokens"
    assert _tokenize(images_dir, out, "--quality", "psnr>=99") == 0  # a miss is recorded, not an error
    manifest = read_jsonl(out / "manifest.jsonl")
    assert [r["ratio"] for r in manifest] == [8] * len(PICKED)
    assert all(r["extra"]["quality"]["met"] is False for r in manifest)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quality"]["missed"] == len(PICKED)
    assert sorted(summary["quality"]["missed_ids"]) == sorted(PICKED)


def test_an_intermediate_target_routes_each_image_to_the_cheapest_ratio_that_meets_it(
    images_dir, measured_psnr, tmp_path
):
    sizes = {name: limit_max_side(load_image(images_dir / name), MAX_SIDE).size[::-1] for name in PICKED}
    values = sorted(v for per_image in measured_psnr.values() for v in per_image.values())
    # The threshold between two measured values that spreads the images over the most ratios.
    candidates = [(a + b) / 2 for a, b in zip(values, values[1:]) if b - a > 2 * MARGIN_DB]
    threshold = max(
        candidates,
        key=lambda t: len({_cheapest_meeting(measured_psnr[n], t, sizes[n]) for n in PICKED}),
    )
    expected = {name: _cheapest_meeting(measured_psnr[name], threshold, sizes[name]) for name in PICKED}
    assert len(set(expected.values())) >= 2  # the test really separates images

    out = tmp_path / "tokens"
    assert _tokenize(images_dir, out, "--quality", f"psnr>={threshold:.4f}") == 0
    manifest = {r["id"]: r for r in read_jsonl(out / "manifest.jsonl")}
    assert {name: manifest[name]["ratio"] for name in PICKED} == expected
    for name in PICKED:
        recorded = manifest[name]["extra"]["quality"]["measured"]
        for ratio in RATIOS:
            assert recorded[str(ratio)] == pytest.approx(measured_psnr[name][ratio], abs=0.01)
    missed = sum(not any(v >= threshold for v in measured_psnr[n].values()) for n in PICKED)
    assert json.loads((out / "summary.json").read_text())["quality"]["missed"] == missed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lpips>=0.2", "lpips is lower-is-better, so the target is lpips<=0.2"),
        ("psnr<=28", "psnr is higher-is-better"),
        ("fid<=3", "unknown quality metric 'fid'"),
        ("psnr>=abc", "must be a number"),
        ("ssim>=1.5", "between -1 and 1"),
        ("28", "cannot read quality target"),
    ],
)
def test_bad_quality_targets_are_refused_with_the_accepted_forms(images_dir, tmp_path, capsys, spec, message):
    assert _tokenize(images_dir, tmp_path / "tokens", "--quality", spec) == 1
    error = capsys.readouterr().err
    assert message in error
    assert "psnr>=X" in error and "lpips<=X" in error


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "16"], "drop --ratio 16"),
        (["--target-mean-tokens", "16x"], "--quality and --target-mean-tokens"),
    ],
)
def test_quality_excludes_other_ways_of_choosing_ratios(images_dir, tmp_path, capsys, extra, message):
    assert _tokenize(images_dir, tmp_path / "tokens", "--quality", "psnr>=20", *extra) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "tokens" / "run.json").exists()


def test_resume_refuses_a_changed_quality_target(images_dir, tmp_path, capsys):
    out = tmp_path / "tokens"
    assert _tokenize(images_dir, out, "--quality", "psnr>=5") == 0
    assert _tokenize(images_dir, out, "--quality", "psnr>=6", "--resume") == 1
    assert "quality changed" in capsys.readouterr().err
    assert _tokenize(images_dir, out, "--resume") == 1  # dropping --quality is a change too
    assert _tokenize(images_dir, out, "--quality", "psnr>=5", "--resume") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_done"] == len(PICKED) and summary["images_done_this_run"] == 0
    assert summary["quality"]["missed"] == 0


def test_a_bad_image_is_recorded_and_the_rest_is_routed(images_dir, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(images_dir, folder)
    data = (images_dir / PICKED[0]).read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    out = tmp_path / "tokens"
    assert _tokenize(folder, out, "--quality", "psnr>=5") == 2
    assert [e["path"] for e in read_jsonl(out / "errors.jsonl")] == ["truncated.png"]
    assert sorted(r["id"] for r in read_jsonl(out / "manifest.jsonl")) == sorted(PICKED)


def test_sharded_input_is_quality_routed_too(tmp_path, write_tar_shards):
    ids = write_tar_shards(tmp_path / "in", shards=2, per_shard=2, size=64)
    out = tmp_path / "tokens"
    code = main(
        ["--shards", str(tmp_path / "in" / "{00000..00001}.tar"), "--out", str(out), "--quiet"]
        + ["--quality", "psnr>=99"]
    )
    assert code == 0
    manifest = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["id"] for r in manifest) == sorted(ids)
    assert {r["ratio"] for r in manifest} == {8}
    assert json.loads((out / "summary.json").read_text())["quality"]["missed"] == len(ids)


def test_lpips_target_in_the_cli_and_an_image_too_small_for_it(images_dir, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(images_dir, folder)
    Image.new("RGB", (10, 10), (200, 30, 30)).save(folder / "tiny.png")
    out = tmp_path / "tokens"
    assert _tokenize(folder, out, "--quality", "lpips<=5") == 2  # every real image passes; tiny fails
    [error] = read_jsonl(out / "errors.jsonl")
    assert error["path"] == "tiny.png" and "lpips cannot measure a 10x10 image" in error["reason"]
    manifest = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["id"] for r in manifest) == sorted(PICKED)
    assert all(r["ratio"] == 32 and r["extra"]["quality"]["metric"] == "lpips" for r in manifest)
