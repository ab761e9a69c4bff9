"""eval.datasets: hub loaders up to the network boundary, and for real on local copies made here."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from eval.datasets import (
    HUB_DATASETS,
    builder_args,
    celeba_caption,
    chartqa_caption,
    iter_samples,
    prepare_image,
    resolve_source,
)

CELEBA_ATTRIBUTES = [
    "Male",
    "Young",
    "Smiling",
    "Black_Hair",
    "Blond_Hair",
    "Eyeglasses",
    "Wearing_Hat",
    "Blurry",
]


def _image(colour, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_hub_defaults_become_load_dataset_arguments():
    # This is the network boundary: these dicts go straight into datasets.load_dataset(**args).
    assert builder_args(HUB_DATASETS["coco"]) == {
        "path": "lmms-lab/COCO-Caption2017",
        "split": "val",
        "streaming": True,
    }
    assert builder_args(HUB_DATASETS["celeba"]) == {
        "path": "flwrlabs/celeba",
        "name": "img_align+identity+attr",
        "split": "test",
        "streaming": True,
    }
    assert builder_args(HUB_DATASETS["chartqa"], streaming=False) == {
        "path": "HuggingFaceM4/ChartQA",
        "split": "test",
        "streaming": False,
    }


def test_hub_ids_splits_and_columns_are_overridable():
    spec = resolve_source("coco", hf_id="me/my-coco", split="validation", caption_column="captions")
    assert builder_args(spec) == {"path": "me/my-coco", "split": "validation", "streaming": True}
    assert spec.caption_column == "captions" and spec.image_column == "image"
    local = resolve_source("celeba", hf_id="parquet", data_files="/data/celeba/*.parquet")
    assert builder_args(local) == {
        "path": "parquet",
        "name": "img_align+identity+attr",
        "split": "train",
        "streaming": True,
        "data_files": "/data/celeba/*.parquet",
    }
    assert local.caption_builder == "celeba"
    assert resolve_source("hf:someone/charts", split="test").path == "someone/charts"
    with pytest.raises(ValueError, match="unknown dataset"):
        resolve_source("no-such-dataset-or-dir")


def test_captions_built_from_celeba_attributes_and_chartqa_fields():
    row = dict.fromkeys(CELEBA_ATTRIBUTES, False) | {
        "Male": True,
        "Smiling": True,
        "Black_Hair": True,
        "Eyeglasses": True,
    }
    assert celeba_caption(row) == "A close-up face photo of a smiling man with black hair and eyeglasses."
    minus_one_encoding = {
        "Male": -1,
        "Young": 1,
        "Blond_Hair": 1,
        "Wearing_Hat": 1,
        "Eyeglasses": 1,
        "Blurry": 1,
    }
    assert celeba_caption(minus_one_encoding) == (
        "A close-up face photo of a young woman with blond hair and eyeglasses and a hat, slightly blurry."
    )
    assert chartqa_caption({"query": "What is the peak value?", "label": ["42"]}) == (
        "A chart with labelled axes and a legend that answers the question 'What is the peak value?' (answer: 42)."
    )
    assert chartqa_caption({"title": "Sales 2020", "query": "Which year?"}).startswith(
        "A chart titled 'Sales 2020'"
    )


def _write_parquet(path, columns: dict, features: dict) -> str:
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    dataset.to_parquet(str(path))
    return str(path)


def test_local_parquet_copies_load_through_the_hub_code_path(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    celeba = {"image": [_image(c) for c in colours], "celeb_id": [1, 2, 3]}
    celeba |= {
        name: [name == "Male" and i == 0 or name == "Eyeglasses" for i in range(3)]
        for name in CELEBA_ATTRIBUTES
    }
    celeba_features = {"image": datasets.Image(), "celeb_id": datasets.Value("int64")}
    celeba_features |= {name: datasets.Value("bool") for name in CELEBA_ATTRIBUTES}
    celeba_file = _write_parquet(tmp_path / "celeba.parquet", celeba, celeba_features)

    samples = list(iter_samples("celeba", hf_id="parquet", data_files=celeba_file, limit=2))
    assert [s.id for s in samples] == ["celeba/train/0000000", "celeba/train/0000001"]
    assert samples[0].caption == "A close-up face photo of a man with eyeglasses."
    assert samples[1].caption == "A close-up face photo of a woman with eyeglasses."
    assert {s.domain for s in samples} == {"celeba"}
    prepared = samples[1].image(16)
    assert prepared.size == (16, 16) and prepared.getpixel((8, 8)) == (0, 255, 0)

    coco = {"image": [_image(c) for c in colours], "answer": [["a red square", "red"], ["green"], ["blue"]]}
    coco_features = {"image": datasets.Image(), "answer": datasets.Sequence(datasets.Value("string"))}
    coco_file = _write_parquet(tmp_path / "coco.parquet", coco, coco_features)
    coco_samples = list(iter_samples("coco", hf_id="parquet", data_files=coco_file))
    assert [s.caption for s in coco_samples] == ["a red square", "green", "blue"]

    chart = {"image": [_image(colours[0])], "query": ["How many bars?"], "label": [["7"]]}
    chart_features = {
        "image": datasets.Image(),
        "query": datasets.Value("string"),
        "label": datasets.Sequence(datasets.Value("string")),
    }
    chart_file = _write_parquet(tmp_path / "chart.parquet", chart, chart_features)
    (chart_sample,) = iter_samples("chartqa", hf_id="parquet", data_files=chart_file)
    assert chart_sample.caption == (
        "A chart with labelled axes and a legend that answers the question 'How many bars?' (answer: 7)."
    )

    with pytest.raises(KeyError, match="no caption column 'captions'.*--caption-column"):
        list(iter_samples("coco", hf_id="parquet", data_files=chart_file, caption_column="captions"))


def test_image_folder_source_uses_subfolders_as_domains(tmp_path):
    for domain, name, colour in (
        ("cats", "b.png", "red"),
        ("cats", "a.jpg", "blue"),
        ("dogs", "c.png", "green"),
    ):
        (tmp_path / domain).mkdir(exist_ok=True)
        _image(colour).save(tmp_path / domain / name)
    (tmp_path / "notes.txt").write_text("not an image")
    samples = list(iter_samples(f"imagefolder:{tmp_path}"))
    assert [(s.id, s.domain, s.caption) for s in samples] == [
        ("cats/a.jpg", "cats", None),
        ("cats/b.png", "cats", None),
        ("dogs/c.png", "dogs", None),
    ]
    assert len(list(iter_samples(str(tmp_path), limit=2))) == 2


def test_devset_captions_and_domains(devset_dir, devset_records):
    samples = list(iter_samples(str(devset_dir), limit=400))
    assert len(samples) == len(devset_records)
    assert {s.domain for s in samples} == {"photo", "face", "chart", "clipart", "text"}
    first = samples[0]
    assert (first.id, first.caption) == (devset_records[0]["image"], devset_records[0]["caption"])
    assert first.image(64).size == (64, 64)


def test_bad_captions_file_names_file_and_line(tmp_path):
    _image("red").save(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "caption": "red"}), "{broken"]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"captions.jsonl:2: not valid JSON"):
        list(iter_samples(str(tmp_path)))


def test_crop_protocol_takes_the_central_square():
    # 90x30: left third red, middle third green, right third blue -> the crop is all green.
    array = np.zeros((30, 90, 3), dtype=np.uint8)
    array[:, :30, 0] = 255
    array[:, 30:60, 1] = 255
    array[:, 60:, 2] = 255
    prepared = np.asarray(prepare_image(Image.fromarray(array), 12))
    assert prepared.shape == (12, 12, 3)
    assert (
        (prepared[:, :, 1] > 200).all() and (prepared[:, :, 0] < 60).all() and (prepared[:, :, 2] < 60).all()
    )
