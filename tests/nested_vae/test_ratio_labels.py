"""Routed training labels: oracle labels from a checkpoint, and reading labels into the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nested_vae.data import DataConfig, load_training_dataset, read_ratio_labels
from nested_vae.ratio_labels import QualityBar, cheapest_ratio, main
from nested_vae.ratio_sampler import RatioSampler


def test_quality_bar_parses_both_metrics_and_refuses_the_wrong_direction():
    assert QualityBar.parse("lpips<=0.25") == QualityBar("lpips", 0.25)
    assert QualityBar.parse(" psnr >= 26 ") == QualityBar("psnr", 26.0)
    with pytest.raises(ValueError, match="lower is better"):
        QualityBar.parse("lpips>=0.2")
    with pytest.raises(ValueError, match="must look like"):
        QualityBar.parse("ssim>=0.9")


def test_cheapest_ratio_is_the_fewest_tokens_meeting_the_bar():
    bar = QualityBar("psnr", 25.0)
    assert cheapest_ratio({8: 30.0, 16: 26.0, 32: 22.0}, bar) == 16
    assert cheapest_ratio({8: 30.0, 16: 28.0, 32: 25.0}, bar) == 32
    assert cheapest_ratio({8: 20.0, 16: 18.0, 32: 15.0}, bar) == 8  # met nowhere: the most tokens
    assert cheapest_ratio({8: 0.1, 16: 0.3, 32: 0.5}, QualityBar("lpips", 0.3)) == 16


def _captions(tmp_path, devset_dir, devset_sample):
    path = tmp_path / "captions.jsonl"
    rows = [{"image": str(devset_dir / r["image"]), "caption": r["caption"]} for r in devset_sample[:3]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, [r["image"] for r in devset_sample[:3]]


def test_oracle_labels_command_writes_labels_that_training_reads(
    tmp_path, tiny_vae_dir, devset_dir, devset_sample, capsys
):
    captions, names = _captions(tmp_path, devset_dir, devset_sample)
    labels = tmp_path / "labels.jsonl"
    args = ["--vae", str(tiny_vae_dir), "--source", str(captions), "--bar", "psnr>=0", "--size", "64"]
    assert main([*args, "--out", str(labels)]) == 0
    records = [json.loads(line) for line in labels.read_text().splitlines()]
    assert [r["image"] for r in records] == names
    assert all(r["ratio"] == 32 for r in records)  # a bar every ratio meets: the fewest tokens
    assert all(set(r["psnr"]) == {"8", "16", "32"} for r in records)
    assert json.loads(capsys.readouterr().out)["labels_per_ratio"] == {"8": 0, "16": 0, "32": 3}

    dataset = load_training_dataset(DataConfig(source=str(captions), ratio_labels=str(labels)))
    assert dataset["ratio"] == [32, 32, 32]
    assignment = RatioSampler("router").assign(3, step=0, labels=torch.tensor(dataset["ratio"]))
    assert assignment.ratios == [32, 32, 32]


def test_caption_router_scores_are_labels_that_training_reads(
    tmp_path, tiny_llama_dir, devset_dir, devset_sample
):
    """The caption router's labels (model card stage 12): ``cat-router score --out`` feeds ``data.ratio_labels``."""
    from router.cli import main as router_main

    captions, names = _captions(tmp_path, devset_dir, devset_sample)
    scores = tmp_path / "caption_labels.jsonl"
    argv = ["score", "--captions", str(captions), "--model", str(tiny_llama_dir), "--out", str(scores)]
    assert router_main(argv) == 0
    routed = {Path(r["image"]).name: r["ratio"] for r in map(json.loads, scores.read_text().splitlines())}
    assert sorted(routed) == sorted(names) and set(routed.values()) <= {8, 16, 32}

    dataset = load_training_dataset(DataConfig(source=str(captions), ratio_labels=str(scores)))
    assert dataset["ratio"] == [routed[name] for name in names]


def test_labels_from_a_tokenize_manifest_and_unlabelled_images(tmp_path, devset_dir, devset_sample):
    captions, names = _captions(tmp_path, devset_dir, devset_sample)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"id": names[1], "ratio": 8, "tokens": 1024}) + "\n")
    dataset = load_training_dataset(DataConfig(source=str(captions), ratio_labels=str(manifest)))
    assert dataset["ratio"] == [0, 8, 0]  # 0: no label, drawn uniformly in router mode


def test_bad_label_lines_name_file_and_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"image": "a.png", "ratio": 8}\n{"image": "b.png", "ratio": 12}\n')
    with pytest.raises(ValueError, match=r"labels\.jsonl:2: .*'ratio' 8, 16 or 32"):
        read_ratio_labels(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"labels\.jsonl:1: not JSON"):
        read_ratio_labels(path)


def test_labels_from_route_targets_use_the_measured_metrics_of_one_split(tmp_path, capsys):
    def image(name, split, lpips):
        metrics = {str(r): {"psnr": 20.0, "lpips": v} for r, v in zip((8, 16, 32), lpips)}
        return {"id": name, "split": split, "metrics": metrics}

    targets = tmp_path / "route_targets.json"
    images = [image("a.png", "train", (0.1, 0.3, 0.5)), image("b.png", "train", (0.1, 0.2, 0.3))]
    images.append(image("c.png", "heldout", (0.5, 0.6, 0.7)))
    targets.write_text(json.dumps({"format": "cat-route-targets-v1", "images": images}))
    labels = tmp_path / "labels.jsonl"
    argv = ["--from-targets", str(targets), "--bar", "lpips<=0.3", "--subset", "train", "--out", str(labels)]
    assert main(argv) == 0
    assert read_ratio_labels(labels) == {"a.png": 16, "b.png": 32}
    assert json.loads(capsys.readouterr().out)["labels_per_ratio"] == {"8": 0, "16": 1, "32": 1}

    targets.write_text(
        json.dumps({"format": "cat-route-targets-v1", "images": [image("d.png", "train", ())]})
    )
    with pytest.raises(ValueError, match="'d.png' has no lpips at every ratio"):
        main(argv)
    targets.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a route-targets file"):
        main(argv)
