"""Training data (captions.jsonl / imagefolder via datasets, crops, split files) and ratio sampling."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from nested_vae.data import (
    CropDataset,
    DataConfig,
    build_dataset,
    dataset_from_captions_jsonl,
    load_training_dataset,
    make_devset_split,
    random_crop,
)
from nested_vae.ratio_sampler import RatioSampler


@pytest.fixture()
def labelled_captions(tmp_path, devset_dir, devset_sample):
    rows = [
        {"image": str(devset_dir / devset_sample[0]["image"]), "caption": "a photo", "ratio": 8},
        {"image": str(devset_dir / devset_sample[2]["image"]), "caption": "a face"},
        {"image": str(devset_dir / devset_sample[4]["image"]), "caption": "a chart", "ratio": 32},
    ]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_captions_jsonl_dataset_reads_router_labels(labelled_captions):
    dataset = dataset_from_captions_jsonl(labelled_captions)
    assert dataset["ratio"] == [8, 0, 32] and dataset["caption"][2] == "a chart"
    samples = [build_dataset(DataConfig(source=str(labelled_captions), resolution=48))[i] for i in range(3)]
    assert all(s["pixel_values"].shape == (3, 48, 48) for s in samples)
    assert all(-1 <= s["pixel_values"].min() and s["pixel_values"].max() <= 1 for s in samples)
    assert sorted(int(s["ratio_label"]) for s in samples) == [0, 8, 32]


def test_bad_ratio_label_names_file_and_line(tmp_path, devset_dir, devset_sample):
    path = tmp_path / "captions.jsonl"
    good = {"image": str(devset_dir / devset_sample[0]["image"]), "caption": "x"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "image": "other.png", "ratio": 12}) + "\n")
    with pytest.raises(ValueError, match=r"captions\.jsonl:2: 'ratio' must be 8, 16 or 32"):
        dataset_from_captions_jsonl(path)


def test_imagefolder_source_and_split_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255)), ("green.png", (0, 255, 0))):
        Image.new("RGB", (40, 30), colour).save(folder / name)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["red.png", "blue.png"], "heldout": ["green.png"]}))
    config = DataConfig(source=str(folder), split_file=str(split), subset="train", resolution=32)
    assert len(load_training_dataset(config)) == 2
    dataset = build_dataset(config)
    colours = {tuple(dataset[i]["pixel_values"][:, 0, 0].tolist()) for i in range(len(dataset))}
    assert colours == {(1.0, -1.0, -1.0), (-1.0, -1.0, 1.0)}  # green is held out
    with pytest.raises(ValueError, match="no list named 'val'"):
        load_training_dataset(DataConfig(source=str(folder), split_file=str(split), subset="val"))


def test_random_crop_upscales_small_images_and_is_seeded():
    small = Image.new("RGB", (20, 50))
    assert random_crop(small, 32, random.Random(0), random_resize=True, flip=False).size == (32, 32)
    big = Image.effect_noise((300, 200), 64).convert("RGB")
    first = random_crop(big, 64, random.Random(3), random_resize=True, flip=True)
    again = random_crop(big, 64, random.Random(3), random_resize=True, flip=True)
    assert first.size == (64, 64) and first.tobytes() == again.tobytes()


def test_epoch_order_and_crops_are_reproducible(labelled_captions):
    config = DataConfig(source=str(labelled_captions), resolution=32)
    dataset = build_dataset(config, seed=1)
    assert isinstance(dataset, CropDataset)
    dataset.set_epoch(3)
    first = [dataset[i]["pixel_values"] for i in range(3)]
    other = build_dataset(config, seed=1)
    other.set_epoch(3)
    assert all(torch.equal(a, other[i]["pixel_values"]) for i, a in enumerate(first))


def test_devset_split_is_stratified_and_deterministic(devset_dir):
    split = make_devset_split(devset_dir / "captions.jsonl", heldout_fraction=0.15, seed=0)
    assert split == make_devset_split(devset_dir / "captions.jsonl", heldout_fraction=0.15, seed=0)
    assert not set(split["train"]) & set(split["heldout"])
    domains = Counter(name.split("_")[0] for name in split["heldout"])
    assert set(domains) == {"photo", "face", "chart", "clipart", "text"}
    total = len(split["train"]) + len(split["heldout"])
    assert 0.12 < len(split["heldout"]) / total < 0.18


def test_ratio_sampler_modes():
    labels = torch.tensor([8, 0, 32, 16])
    router = RatioSampler("router", seed=0).assign(4, step=5, labels=labels)
    assert router.ratios[0] == 8 and router.ratios[2] == 32 and router.ratios[3] == 16
    assert router.ratios[1] in (8, 16, 32)
    uniform = RatioSampler("uniform", seed=0)
    assert uniform.assign(64, step=5).ratios == uniform.assign(64, step=5).ratios  # resumable
    assert set(uniform.assign(64, step=5).ratios) == {8, 16, 32}
    assert uniform.assign(64, step=5).ratios != uniform.assign(64, step=6).ratios
    everything = RatioSampler("all").assign(2, step=0)
    assert everything.rows.tolist() == [0, 1, 0, 1, 0, 1] and everything.ratios == [8, 8, 16, 16, 32, 32]
    assert {r: g.tolist() for r, g in everything.groups().items()} == {8: [0, 1], 16: [2, 3], 32: [4, 5]}
    with pytest.raises(ValueError, match="ratio sampling mode"):
        RatioSampler("random")


def test_streaming_source_yields_every_image_once_per_epoch(labelled_captions):
    dataset = build_dataset(DataConfig(source=str(labelled_captions), streaming=True, resolution=32), seed=0)
    assert isinstance(dataset, torch.utils.data.IterableDataset)
    dataset.set_epoch(1)
    samples = list(dataset)
    assert len(samples) == 3 and all(s["pixel_values"].shape == (3, 32, 32) for s in samples)
    assert sorted(int(s["ratio_label"]) for s in samples) == [0, 8, 32]
