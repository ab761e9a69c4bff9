"""`cat-bench headroom`: the greedy oracle on hand-made tables, the parameter-free baselines, and one
end-to-end run on real devset images with the tiny random NestedVAE (its numbers mean nothing; the
report must agree with direct measurements)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from eval.cli import main
from eval.engine import reconstruct
from eval.headroom import HeadroomSettings, ShortcutCodec, measure
from eval.metrics import psnr_per_image
from eval.oracle import COARSE_FIRST, Frontier, coarsest_gap_to_close, greedy_upgrades, oracle_row
from nested_vae import NestedVAE, NestedVAEConfig
from nested_vae.shortcuts import PixelShortcut

SIZE = 64
TOKENS_256 = [64.0, 256.0, 1024.0]  # 32x, 16x, 8x at 256^2


def _tokens(count: int) -> np.ndarray:
    return np.tile(TOKENS_256, (count, 1))


def _lpips_available() -> bool:
    from nested_vae.perceptual import LPIPSUnavailableError, load_lpips

    try:
        load_lpips("vgg")
    except LPIPSUnavailableError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Oracle on hand-made tables
# --------------------------------------------------------------------------------------------


def test_image_without_gain_is_never_upgraded():
    quality = np.array([[20.0, 20.0, 20.0], [10.0, 15.0, 25.0], [12.0, 11.0, 12.0]])
    for budget in (256.0, 400.0, 1024.0):
        levels = Frontier(quality, _tokens(3)).allocate(budget)
        assert levels[0] == 0 and levels[2] == 0, budget  # flat and never-better images stay at 32x
    assert Frontier(quality, _tokens(3)).allocate(1024.0).tolist() == [0, 2, 0]
    assert greedy_upgrades(quality, _tokens(3))[0].tolist() == [0, 2, 0]


def test_a_useless_16x_is_skipped():
    # 16x is no better than 32x but 8x is: the oracle goes 32x -> 8x when the budget allows.
    frontier = Frontier(np.array([[10.0, 10.0, 30.0]]), _tokens(1))
    assert frontier.allocate(1023.0).tolist() == [0] and frontier.allocate(1024.0).tolist() == [2]
    assert greedy_upgrades(np.array([[10.0, 10.0, 30.0]]), _tokens(1))[1] == [(0, 2)]


def test_oracle_at_16x_budget_known_answer():
    # One hard image, eight easy ones. 16x's budget (9 x 256) buys the hard image's 8x and then
    # four easy images' 16x.
    values = np.array([[10.0, 20.0, 40.0]] + [[30.0, 30.1, 30.2]] * 8)
    row = oracle_row(values, _tokens(9), "psnr", None)
    assert row["ratio_counts"] == {"32": 4, "16": 4, "8": 1}
    assert row["fixed16"] == pytest.approx(260.8 / 9) and row["oracle"] == pytest.approx(280.4 / 9)
    assert row["gain"] == pytest.approx(19.6 / 9) and row["mean_tokens"] == pytest.approx(256.0)
    # The hard image's 8x alone already beats fixed 16x.
    assert row["fewest_mean_tokens"] == pytest.approx((1024 + 8 * 64) / 9)
    assert row["fewest_saving_pct"] == pytest.approx(100 / 3)


def test_exact_oracle_finds_the_knapsack_corner_greedy_misses():
    # Greedy upgrades the five easy images (1 per 192 tokens) and then has no room for image 5's
    # 16x -> 8x; the optimum leaves four easy images at 32x to pay for it.
    values = np.array([[0.0, 1.0, 1.0]] * 5 + [[0.0, 0.5, 4.6]])
    row = oracle_row(values, _tokens(6), "psnr", None)
    assert row["greedy_oracle"] == pytest.approx(5.5 / 6) == row["fixed16"]
    assert row["oracle"] == pytest.approx(5.6 / 6) and row["ratio_counts"] == {"32": 4, "16": 1, "8": 1}


def test_lower_is_better_metric_gain_is_a_relative_reduction():
    values = np.array([[0.5, 0.4, 0.1], [0.2, 0.19, 0.18]])  # LPIPS, 32x first
    row = oracle_row(values, _tokens(2), "lpips", None)  # 512 tokens: 8x for image 0 does not fit
    assert row["ratio_counts"] == {"32": 0, "16": 2, "8": 0}
    assert row["oracle"] == pytest.approx(row["fixed16"])
    row = oracle_row(values, _tokens(2), "lpips", 576.0)  # image 0 to 8x; image 1's 16x does not fit
    assert row["ratio_counts"] == {"32": 1, "16": 0, "8": 1}
    assert row["oracle"] == pytest.approx(0.15)
    assert row["gain_pct"] == pytest.approx(100 * (0.295 - 0.15) / 0.295)


@pytest.mark.parametrize("seed", range(4))
def test_oracle_at_16x_budget_is_at_least_fixed_16x_and_greedy(seed):
    rng = np.random.default_rng(seed)
    values = rng.uniform(10, 30, (40, 3))  # any tables, not only monotone or concave ones
    for metric, table in (("psnr", values), ("lpips", 1 / values)):
        row = oracle_row(table, _tokens(40), metric, None)
        assert row["mean_tokens"] <= 256 + 1e-9 and row["gain"] >= -1e-9, metric
        assert row["fewest_mean_tokens"] <= 256 + 1e-9
        better = row["oracle"] - row["greedy_oracle"]
        assert (better if metric == "psnr" else -better) >= -1e-9


def test_frontier_is_the_brute_force_optimum():
    rng = np.random.default_rng(3)
    values = rng.uniform(10, 30, (6, 3))
    frontier = Frontier(values, _tokens(6))
    for budget in (64.0, 100.0, 256.0, 400.0, 700.0, 1024.0):
        best = max(
            values[np.arange(6), levels].mean()
            for levels in itertools.product(range(3), repeat=6)
            if _tokens(6)[np.arange(6), levels].mean() <= budget
        )
        levels = frontier.allocate(budget)
        assert values[np.arange(6), levels].mean() == pytest.approx(best), budget


def test_fewest_tokens_is_monotone_in_the_target():
    rng = np.random.default_rng(1)
    values = rng.uniform(10, 30, (30, 3))
    frontier = Frontier(values, _tokens(30))
    curve_tokens, curve_quality = frontier.curve()
    assert np.all(np.diff(curve_tokens) > 0) and np.all(np.diff(curve_quality) > 0)
    top = values.max(axis=1).mean()
    targets = np.linspace(values[:, 0].mean(), top, 25)
    found = [frontier.fewest_tokens(t) for t in targets]
    assert found[0] == pytest.approx(64.0) and curve_quality[-1] == pytest.approx(top)
    assert all(a <= b for a, b in zip(found, found[1:])), found
    assert frontier.fewest_tokens(top + 0.01) is None


def test_fewest_tokens_with_a_skipped_16x():
    # Greedy by gain per token would jump 32x -> 8x here; the image's 16x already matches fixed 16x.
    row = oracle_row(np.array([[0.578, 0.574, 0.504]]), np.array([[4.0, 16.0, 64.0]]), "lpips", None)
    assert row["fewest_mean_tokens"] == pytest.approx(16.0) and row["oracle"] == pytest.approx(0.574)
    assert row["frontier"]["mean_tokens"] == [4.0, 16.0, 64.0]


def _close_gap(quality: np.ndarray, share: float) -> np.ndarray:
    closed = quality.copy()
    closed[:, 0] += share * np.maximum(quality[:, 1] - quality[:, 0], 0.0)
    return closed


@pytest.mark.parametrize("seed", range(4))
def test_gap_to_close_is_the_smallest_share_that_reaches_the_target(seed):
    rng = np.random.default_rng(seed)
    sixteen = rng.uniform(20, 30, 30)  # PSNR-like: 32x below 16x by 1-6 dB, 8x above by 2-6 dB
    quality = np.stack([sixteen - rng.uniform(1, 6, 30), sixteen, sixteen + rng.uniform(2, 6, 30)], axis=1)
    assert oracle_row(quality, _tokens(30), "psnr", None)["fewest_saving_pct"] < 35
    share = coarsest_gap_to_close(quality, _tokens(30), 35.0, tolerance=1e-3)
    assert 0 < share <= 1
    reached = oracle_row(_close_gap(quality, share), _tokens(30), "psnr", None)["fewest_saving_pct"]
    short = oracle_row(_close_gap(quality, share - 2e-3), _tokens(30), "psnr", None)["fewest_saving_pct"]
    assert reached >= 35 > short


def test_identical_images_need_their_whole_32x_gap_closed():
    # One image at 8x costs as many tokens as four moved to 32x save: eight identical images can only
    # save 35 % by sending four to 32x, which keeps 16x's mean only if 32x is as good as 16x.
    quality = np.tile([0.0, 1.0, 4.0], (8, 1))
    assert coarsest_gap_to_close(quality, _tokens(8), 35.0) == pytest.approx(1.0)
    assert coarsest_gap_to_close(quality, _tokens(8), 80.0) is None  # above all-32x's 75 %


def test_no_gap_to_close_when_half_the_images_are_free_at_32x():
    quality = np.array([[1.0, 1.0, 1.0]] * 4 + [[0.0, 1.0, 3.0]] * 4)  # 4 x 64 + 4 x 256 = 37.5 % fewer
    assert coarsest_gap_to_close(quality, _tokens(8), 35.0) == 0.0
    row = oracle_row(-quality, _tokens(8), "lpips", None)  # lower is better: the same table negated
    assert row["gap_32x_to_close"] == 0.0 and row["fewest_saving_pct"] == pytest.approx(37.5)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", COARSE_FIRST)
def test_bicubic_thumbnail_of_a_constant_image_is_exact(ratio):
    image = torch.full((1, 3, 70, 50), 0.3)  # not a multiple of 32: padded, then cropped back
    image[:, 1] = -0.6
    codec = ShortcutCodec(PixelShortcut("smooth", 16))
    out = reconstruct(codec, image, ratio)
    assert out.shape == image.shape
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ratio", COARSE_FIRST)
def test_bicubic_thumbnail_of_a_gradient_beats_blocks(ratio):
    y, x = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128), indexing="ij")
    image = torch.stack([x, y, (x + y) / 2])[None] * 0.9
    smooth = psnr_per_image(reconstruct(ShortcutCodec(PixelShortcut("smooth", 16)), image, ratio), image)
    blocks = psnr_per_image(reconstruct(ShortcutCodec(PixelShortcut("blocks", 16)), image, ratio), image)
    assert smooth.item() > blocks.item() + 3, (smooth, blocks)


def test_model_without_shortcut_reports_none(tmp_path, devset_dir):
    torch.manual_seed(0)
    from cat_tokenizer.testing import TINY_VAE_CONFIG
    from eval.datasets import iter_samples

    vae = NestedVAE(NestedVAEConfig(**{**TINY_VAE_CONFIG, "pixel_shortcut": "none"})).eval()
    samples = list(iter_samples(str(devset_dir), limit=1))
    settings = HeadroomSettings(str(devset_dir), tmp_path, size=32, cache_dir=str(tmp_path), lpips=False)
    rows, status = measure(settings, samples, vae)
    assert rows[0]["own_shortcut"] is None and status == "not requested"
    assert rows[0]["bicubic"]["32"]["psnr"] > 0 and rows[0]["model"]["8"]["lpips"] is None


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_images(tmp_path_factory, devset_dir, devset_sample):
    """captions.jsonl with 4 devset images (4 domains) + one unreadable file, and a split file."""
    picked = devset_sample[::2][:4]
    directory = tmp_path_factory.mktemp("four")
    (directory / "broken.png").write_bytes(b"not an image")
    records = [{**r, "image": str(devset_dir / r["image"])} for r in picked]
    records.append({"image": "broken.png", "caption": "x", "domain": "photo"})
    (directory / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    split = {"train": [records[0]["image"]], "heldout": [r["image"] for r in records[1:]]}
    split["heldout_subset"] = [records[1]["image"]]  # reported as its own group
    (directory / "split.json").write_text(json.dumps(split))
    return directory, records


def test_cat_bench_headroom_end_to_end(four_images, tiny_vae_dir, tmp_path):
    directory, records = four_images
    out = tmp_path / "out"
    argv = [
        "headroom", "--dataset", str(directory), "--vae", str(tiny_vae_dir), "--size", str(SIZE),
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "2", "--no-progress",
        "--split-file", str(directory / "split.json"), "--only-split", "heldout",
    ]  # fmt: skip
    assert main(argv) == 2  # partial: the unreadable image is recorded
    results = json.loads((out / "results.json").read_text())
    assert [f["id"] for f in results["failures"]] == ["broken.png"]
    images = results["images"]
    assert [row["id"] for row in images] == [r["image"] for r in records[1:4]]
    assert results["checkpoint"]["weights_sha256"] and results["run"]["argv"][1] == "headroom"
    own_kind = NestedVAE.from_pretrained(tiny_vae_dir).config.pixel_shortcut  # the tiny VAE's own
    assert results["own_shortcut"] == own_kind and results["run"]["versions"]["torch"]

    # Per-image numbers are the direct measurements of each codec.
    from eval.datasets import iter_samples

    sample = next(s for s in iter_samples(str(directory)) if s.id == images[0]["id"])
    from cat_tokenizer.images import pil_to_tensor

    pixels = pil_to_tensor(sample.image(SIZE))[None]
    vae = NestedVAE.from_pretrained(tiny_vae_dir)
    for codec, model in (
        ("model", vae),
        ("bicubic", ShortcutCodec(PixelShortcut("smooth", 4))),
        ("own_shortcut", ShortcutCodec(PixelShortcut(own_kind, 4))),
    ):
        for ratio in COARSE_FIRST:
            direct = psnr_per_image(reconstruct(model, pixels, ratio), pixels).item()
            assert images[0][codec][str(ratio)]["psnr"] == pytest.approx(direct, abs=1e-4), (codec, ratio)
    assert images[0]["tokens"] == {"8": 64, "16": 16, "32": 4}

    overall = results["groups"]["all"]
    assert overall["n"] == 3 and set(results["groups"]) == {
        "all",
        "split:heldout_subset",
        "split:heldout minus heldout_subset",
    } | {f"domain:{r['domain']}" for r in records[1:4]}
    lpips = _lpips_available()
    metrics = ("psnr", "ssim", "lpips") if lpips else ("psnr", "ssim")
    for codec in ("model", "own_shortcut", "bicubic"):
        summary = overall[codec]
        assert summary["fixed"]["16"]["psnr"] == pytest.approx(
            np.mean([r[codec]["16"]["psnr"] for r in images])
        )
        assert set(summary["oracle"]) == set(metrics)
        for metric in metrics:
            row = summary["oracle"][metric]
            assert row["mean_tokens"] <= 16 + 1e-9 and row["gain"] >= -1e-9, (codec, metric)
    if lpips:
        assert results["lpips_status"] == "available" and 0 < images[0]["model"]["8"]["lpips"] < 2
    else:
        assert results["lpips_status"].startswith("unavailable")
    assert {t["target"] for t in results["targets"]} >= {
        "8x PSNR >= 28 dB",
        "oracle at 16x's tokens: >= +0.8 dB PSNR",
    }

    report = (out / "report.md").read_text()
    assert "## Oracle headroom over fixed 16x" in report and "broken.png" in report
    assert (out / "headroom.png").stat().st_size > 10_000


def test_cat_bench_headroom_fatal_error_exits_1(tmp_path, tiny_vae_dir):
    argv = [
        "headroom",
        "--dataset",
        str(tmp_path / "missing"),
        "--vae",
        str(tiny_vae_dir),
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 1
    assert not (tmp_path / "results.json").exists()
