"""`cat-tokenize` end to end on real files made here, with a tiny random VAE and a tiny random Llama router."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from cat_tokenizer.cli import main
from cat_tokenizer.store import read_jsonl
from router import RoutingPolicy, tokens_for
from router.cache import ScoreCache


def _tokenize(images, out, vae, *extra):
    return main(["--images", str(images), "--out", str(out), "--vae", str(vae), "--quiet", *map(str, extra)])


@pytest.fixture(scope="module")
def awkward_run(awkward_folder, tiny_vae_dir, tiny_llama_dir, tmp_path_factory):
    images, captions, expect = awkward_folder
    out = tmp_path_factory.mktemp("awkward_out") / "tokens"
    code = _tokenize(
        images,
        out,
        tiny_vae_dir,
        "--captions",
        captions,
        "--router-model",
        tiny_llama_dir,
        "--max-side",
        64,
        "--shard-size",
        4,
        "--batch-size",
        3,
    )
    return code, out, expect


def test_bad_items_are_recorded_and_never_stop_the_run(awkward_run):
    code, out, expect = awkward_run
    assert code == 2  # finished, some items failed
    manifest = read_jsonl(out / "manifest.jsonl")
    assert [r["id"] for r in manifest] == sorted(expect["ok"])  # each good image exactly once
    errors = read_jsonl(out / "errors.jsonl")
    image_errors = {e["path"]: e["reason"] for e in errors if e["path"] in expect["failed_images"]}
    assert set(image_errors) == set(expect["failed_images"])
    for name, reason in expect["failed_images"].items():
        assert reason in image_errors[name]
    line_errors = {e["line"]: e["reason"] for e in errors if e["path"] not in expect["failed_images"]}
    assert set(line_errors) == set(expect["failed_lines"])
    for line, reason in expect["failed_lines"].items():
        assert reason in line_errors[line]
    assert all(e["line"] is not None for e in errors)  # every failure names its captions line


def test_manifest_records_match_the_shards(awkward_run):
    _, out, _ = awkward_run
    for record in read_jsonl(out / "manifest.jsonl"):
        with safe_open(str(out / record["shard"]), framework="pt") as handle:
            latent = handle.get_tensor(record["key"])
        assert list(latent.shape) == record["latent_shape"]
        assert torch.isfinite(latent).all()
        assert (
            record["tokens"]
            == latent.shape[1] * latent.shape[2]
            == tokens_for(record["ratio"], tuple(record["size"]))
        )


def test_awkward_images_are_normalised_as_documented(awkward_run):
    _, out, expect = awkward_run
    records = {r["id"]: r for r in read_jsonl(out / "manifest.jsonl")}
    assert records["exif_rotated.jpg"]["original_size"] == [40, 24]  # EXIF orientation applied
    assert records["one_pixel.png"]["size"] == [1, 1]
    assert records["one_pixel.png"]["latent_shape"][1:] == [32 // records["one_pixel.png"]["ratio"]] * 2
    assert records["huge.jpg"]["original_size"] == [6000, 8000]
    assert records["huge.jpg"]["size"] == [48, 64]  # --max-side 64, aspect kept
    for image_id, record in records.items():
        expected = "image_jpeg_bpp" if image_id in expect["fallback"] else "caption_llm"
        assert record["score_source"] == expected, image_id
        assert record["ratio"] == RoutingPolicy().route(record["score"])


def test_summary_counts_agree_with_the_files(awkward_run):
    _, out, _ = awkward_run
    summary = json.loads((out / "summary.json").read_text())
    manifest = read_jsonl(out / "manifest.jsonl")
    assert summary["images_done"] == summary["images_done_this_run"] == len(manifest)
    assert summary["failed"] == len(read_jsonl(out / "errors.jsonl"))
    assert sum(row["images"] for row in summary["per_ratio"].values()) == len(manifest)
    assert summary["mean_tokens"] == pytest.approx(sum(r["tokens"] for r in manifest) / len(manifest))
    assert summary["mean_tokens_fixed16"] == pytest.approx(
        sum(tokens_for(16, tuple(r["size"])) for r in manifest) / len(manifest)
    )
    assert summary["images_per_s"] > 0
    assert not list(out.rglob("*.tmp")) and not list(out.glob("errors.rank*"))


def test_decode_writes_one_png_per_image_at_the_encoded_size(awkward_run, tmp_path):
    _, out, _ = awkward_run
    recon = tmp_path / "recon"
    assert main(["decode", "--tokens", str(out), "--out", str(recon), "--quiet"]) == 0
    for record in read_jsonl(out / "manifest.jsonl"):
        png = recon / (record["id"].rsplit(".", 1)[0] + ".png")
        with Image.open(png) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert [image.height, image.width] == record["size"]


def test_success_exits_zero_and_fixed_ratio_never_loads_the_router(
    tiny_vae_dir, tmp_path, write_small_images
):
    write_small_images(tmp_path / "images", 3)
    out = tmp_path / "out"
    code = _tokenize(
        tmp_path / "images", out, tiny_vae_dir, "--ratio", 16, "--router-model", tmp_path / "no_model"
    )
    assert code == 0
    manifest = read_jsonl(out / "manifest.jsonl")
    assert [(r["ratio"], r["score_source"], r["tokens"]) for r in manifest] == [(16, "override", 4)] * 3
    assert read_jsonl(out / "errors.jsonl") == []


def test_require_captions_skips_uncaptioned_images(
    tiny_vae_dir, tiny_llama_dir, tmp_path, write_small_images
):
    write_small_images(tmp_path / "images", 3)
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "img_001.png", "caption": "static noise"}) + "\n")
    out = tmp_path / "out"
    code = _tokenize(
        tmp_path / "images",
        out,
        tiny_vae_dir,
        "--captions",
        captions,
        "--router-model",
        tiny_llama_dir,
        "--require-captions",
        "--score-cache",
        tmp_path / "scores.sqlite",
    )
    assert code == 0
    assert [r["id"] for r in read_jsonl(out / "manifest.jsonl")] == ["img_001.png"]
    assert json.loads((out / "summary.json").read_text())["skipped_without_caption"] == 2
    key = f"{tiny_llama_dir} [transformers:torch.float32]"  # the CLI's CPU default dtype
    cached = ScoreCache(tmp_path / "scores.sqlite").get_many(key, ["static noise"])
    assert list(cached) == ["static noise"]  # a rerun would not score this caption again


def test_target_mean_tokens_calibrates_and_saves_the_policy(
    tiny_vae_dir, tiny_llama_dir, tmp_path, write_small_images
):
    names = write_small_images(tmp_path / "images", 6)
    captions = tmp_path / "captions.jsonl"  # half captioned (LLM scores), half image fallback
    captions.write_text(
        "".join(
            json.dumps({"image": n, "caption": f"noise pattern {i}"}) + "\n" for i, n in enumerate(names[:3])
        )
    )
    out = tmp_path / "out"
    assert (
        _tokenize(
            tmp_path / "images",
            out,
            tiny_vae_dir,
            "--captions",
            captions,
            "--router-model",
            tiny_llama_dir,
            "--target-mean-tokens",
            6,  # tokens at the encoded size: these 32 px images have 16 / 4 / 1 at 8x / 16x / 32x
        )
        == 0
    )
    policy = RoutingPolicy.load(out / "policy.json")
    manifest = read_jsonl(out / "manifest.jsonl")
    assert len(manifest) == len(names)
    assert all(r["ratio"] == policy.route(r["score"]) for r in manifest)
    assert sorted(r["score_source"] for r in manifest) == ["caption_llm"] * 3 + ["image_jpeg_bpp"] * 3
    expected = RoutingPolicy.calibrate(
        [r["score"] for r in manifest],
        target_mean_tokens=6,
        image_size=[tuple(r["size"]) for r in manifest],
    )
    assert (policy.low, policy.high) == pytest.approx((expected.low, expected.high))


def test_budget_is_counted_at_the_encoded_sizes_and_has_a_fixed_ratio_form(
    tiny_vae_dir, tiny_llama_dir, tmp_path
):
    # Images of very different sizes, --max-side shrinking the largest: a budget equal to what
    # --ratio 16 spends on them must come out at that spend, not at a 256 px count of it.
    images = tmp_path / "images"
    images.mkdir()
    sides = [(40, 200), (300, 90), (64, 64), (520, 400), (96, 160), (33, 47), (250, 250), (128, 72)]
    for index, (width, height) in enumerate(sides):
        pixels = np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img_{index:03d}.png")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        "".join(json.dumps({"image": f"img_{i:03d}.png", "caption": f"pattern {i}"}) + "\n" for i in range(8))
    )
    common = ["--captions", captions, "--router-model", tiny_llama_dir, "--max-side", 384]

    def summary(out, *extra):
        assert _tokenize(images, out, tiny_vae_dir, *common, *extra) == 0
        return json.loads((out / "summary.json").read_text())

    fixed = summary(tmp_path / "fixed16", "--ratio", 16)
    budgeted = summary(tmp_path / "budget", "--target-mean-tokens", fixed["mean_tokens"])
    relative = summary(tmp_path / "relative", "--target-mean-tokens", "16x")
    assert budgeted["mean_tokens_fixed16"] == pytest.approx(fixed["mean_tokens"])
    manifest = read_jsonl(tmp_path / "budget" / "manifest.jsonl")
    sizes = [tuple(r["size"]) for r in manifest]
    reachable = RoutingPolicy.calibrate(
        [r["score"] for r in manifest], target_mean_tokens=fixed["mean_tokens"], image_size=sizes
    )
    best = sum(tokens_for(reachable.route(r["score"]), tuple(r["size"])) for r in manifest) / len(manifest)
    assert budgeted["mean_tokens"] == pytest.approx(best)
    assert abs(budgeted["mean_tokens"] - fixed["mean_tokens"]) <= max(
        tokens_for(8, size) - tokens_for(16, size) for size in sizes
    ) / len(sizes)  # within one image's step of the budget
    assert relative["mean_tokens"] == budgeted["mean_tokens"]
    assert json.loads((tmp_path / "relative" / "policy.json").read_text()) == json.loads(
        (tmp_path / "budget" / "policy.json").read_text()
    )


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--ratio", "12"], "--ratio must be auto, 8, 16 or 32"),
        (["--target-mean-tokens", "12x"], "a positive number of tokens or 8x/16x/32x"),
        (["--target-mean-tokens", "-5"], "a positive number of tokens or 8x/16x/32x"),
        (["--batch-size", "0"], "positive integer"),
        (["--images", "/no/such/folder"], "is not a folder"),
        (["--captions", "/no/such/captions.jsonl"], "not a readable file"),
        (["--vae", "/no/such/vae"], "cannot load the VAE"),
        (["--unknown-flag"], "unrecognized arguments"),
    ],
)
def test_fatal_errors_exit_one_with_one_line(
    arguments, message, tiny_vae_dir, tmp_path, capsys, write_small_images, cli_args
):
    write_small_images(tmp_path / "images", 1)
    base = cli_args(tmp_path / "images", tmp_path / "out", tiny_vae_dir, "--ratio", 16, "--quiet")
    assert main(base + arguments) == 1  # argparse: the last occurrence of a flag wins
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cat-tokenize: error:") and message in err


def test_unwritable_output_and_existing_run_are_fatal(tiny_vae_dir, tmp_path, capsys, write_small_images):
    write_small_images(tmp_path / "images", 1)
    (tmp_path / "a_file").write_text("x")
    assert _tokenize(tmp_path / "images", tmp_path / "a_file" / "out", tiny_vae_dir, "--ratio", 16) == 1
    assert "not writable" in capsys.readouterr().err
    assert _tokenize(tmp_path / "images", tmp_path / "out", tiny_vae_dir, "--ratio", 16) == 0
    assert _tokenize(tmp_path / "images", tmp_path / "out", tiny_vae_dir, "--ratio", 16) == 1
    assert "pass --resume" in capsys.readouterr().err


def test_console_script_reports_fatal_errors_without_traceback(tmp_path):
    script = shutil.which("cat-tokenize")
    command = [script] if script else [sys.executable, "-m", "cat_tokenizer.cli"]
    result = subprocess.run(
        command + ["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"cat-tokenize: error: --images {tmp_path / 'nope'} is not a folder"
    ]


def test_router_dtype_is_float32_by_default_recorded_and_fixed_on_resume(
    tiny_vae_dir, tiny_llama_dir, tmp_path, write_small_images, capsys
):
    from cat_tokenizer.readers import read_index

    names = write_small_images(tmp_path / "images", 2)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image": n, "caption": f"noise {n}"}) + "\n" for n in names))
    common = ["--captions", captions, "--router-model", tiny_llama_dir]
    default, bf16 = tmp_path / "default", tmp_path / "bf16"
    assert _tokenize(tmp_path / "images", default, tiny_vae_dir, *common) == 0
    assert _tokenize(tmp_path / "images", bf16, tiny_vae_dir, *common, "--router-dtype", "bfloat16") == 0
    assert set(read_index(default).column("router_dtype").to_pylist()) == {"torch.float32"}
    assert set(read_index(bf16).column("router_dtype").to_pylist()) == {"torch.bfloat16"}
    assert json.loads((bf16 / "run.json").read_text())["router_dtype"] == "bfloat16"
    # Resuming with other numerics would mix two routings in one output: refused.
    capsys.readouterr()
    code = _tokenize(tmp_path / "images", bf16, tiny_vae_dir, *common, "--resume")
    assert code == 1
    assert "router_dtype changed" in capsys.readouterr().err
