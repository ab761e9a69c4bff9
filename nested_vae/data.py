"""Training data for the nested VAE, through Hugging Face ``datasets``.

Three kinds of source, all ending as a ``datasets`` dataset with an image column, an optional
caption column and an optional router-label column (the ratio, 8/16/32, chosen from the caption):

* a Hugging Face dataset id (``"user/name"``), with ``split`` and column names;
* a local image folder (``datasets``' ``imagefolder`` builder);
* a ``captions.jsonl`` file like the CLI's (read with :func:`cat_tokenizer.captions.read_captions_jsonl`;
  image paths relative to the file's directory; a ``ratio`` key is read as a router label).

Large sets can be streamed (``streaming=True``). Training crops are random but reproducible: the
crop of a sample depends only on (seed, epoch, position), so a resumed run sees exactly the
crops the uninterrupted run would have seen, whatever the worker count.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from PIL import Image

from cat_foundations.atomic import iter_json_lines
from cat_foundations.captions import read_captions_jsonl
from cat_foundations.images import load_image, pil_to_tensor
from cat_foundations.ratios import RATIOS

NO_RATIO_LABEL = 0  # label value for a sample without a router label


@dataclass
class DataConfig:
    """Where the training images come from and how they are cropped.

    Args:
        source: HF dataset id, a local image folder, or a ``captions.jsonl`` path.
        split: dataset split to train on (HF id / imagefolder).
        image_column: name of the image column.
        caption_column: name of the caption column (optional in the data).
        ratio_column: name of the router-label column (8/16/32; optional in the data).
        streaming: stream the dataset instead of downloading it whole (HF ids).
        shuffle_buffer: shuffle buffer size when streaming.
        split_file: optional JSON file with lists of image names per subset (e.g. the
            devset's ``{"train": [...], "heldout": [...]}``); only ``subset`` is used.
        subset: which list of ``split_file`` to train on.
        ratio_labels: optional JSON-lines file of per-image ratio labels for ``ratio_sampling:
            router`` (CAT-style routed training), matched to the dataset by file name: a
            ``cat-tokenize`` ``manifest.jsonl`` (``id`` + ``ratio``: the caption router's choice)
            or the oracle labels of ``cat-train ratio-labels`` (``image`` + ``ratio``: the
            smallest token count whose reconstruction met a quality bar). Replaces the dataset's
            own ratio column; images without a label draw a ratio uniformly.
        resolution: side of the square training crops.
        random_resize: before cropping, resize the short side to a random size between
            ``resolution`` and the image's own short side (multi-scale crops); otherwise crop at
            native scale (images smaller than ``resolution`` are always upscaled to fit).
        horizontal_flip: random left-right flips (off by default: text and charts are not symmetric).
        num_workers: DataLoader workers.
    """

    source: str = "../shared/data/devset/captions.jsonl"
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "caption"
    ratio_column: str = "ratio"
    streaming: bool = False
    shuffle_buffer: int = 1000
    split_file: str | None = None
    subset: str = "train"
    ratio_labels: str | None = None
    resolution: int = 128
    random_resize: bool = True
    horizontal_flip: bool = False
    num_workers: int = 0


def _is_captions_file(source: str) -> bool:
    return source.endswith(".jsonl") and Path(source).is_file()


def dataset_from_captions_jsonl(path: str | Path) -> datasets.Dataset:
    """A dataset with ``image`` (absolute path), ``caption`` and ``ratio`` (0 when absent) columns.

    Raises:
        ValueError: the file has no usable entry (each bad line is named), or a ``ratio`` value
            is not 8, 16 or 32 (file and line named).
    """
    path = Path(path)
    parsed = read_captions_jsonl(path)
    if not parsed.entries:
        details = "; ".join(str(error) for error in parsed.errors[:5])
        raise ValueError(f"{path}: no usable entries{': ' + details if details else ''}")
    images, captions, ratios = [], [], []
    for entry in parsed.entries:
        label = entry.extra.get("ratio", NO_RATIO_LABEL)
        if label not in (NO_RATIO_LABEL, *RATIOS):
            raise ValueError(f"{path}:{entry.line}: 'ratio' must be 8, 16 or 32, got {label!r}")
        images.append(str(path.parent / entry.image))
        captions.append(entry.caption or "")
        ratios.append(int(label))
    return datasets.Dataset.from_dict({"image": images, "caption": captions, "ratio": ratios})


def load_training_dataset(config: DataConfig):
    """The configured source as a ``datasets`` ``Dataset`` (or ``IterableDataset`` when streaming),
    with columns renamed to ``image`` / ``caption`` / ``ratio`` and the split file applied."""
    source = config.source
    if _is_captions_file(source):
        dataset = dataset_from_captions_jsonl(source)
        if config.streaming:
            dataset = dataset.to_iterable_dataset()
    elif Path(source).is_dir():
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=source, split=config.split, streaming=config.streaming
        )
    else:  # a Hub id; needs internet (or the HF cache)
        dataset = datasets.load_dataset(source, split=config.split, streaming=config.streaming)
    renames = {config.image_column: "image", config.caption_column: "caption", config.ratio_column: "ratio"}
    columns = dataset.column_names or []
    if config.image_column not in columns:
        raise ValueError(f"{source}: no image column {config.image_column!r} (columns: {columns})")
    renames = {old: new for old, new in renames.items() if old in columns and old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    if config.split_file:
        dataset = _apply_split_file(dataset, config.split_file, config.subset)
    if config.ratio_labels:
        dataset = _apply_ratio_labels(dataset, config.ratio_labels)
    return dataset


def read_ratio_labels(path: str | Path) -> dict[str, int]:
    """``{image file name: ratio}`` from a labels / manifest JSON-lines file (see ``DataConfig``).

    Raises:
        ValueError: a line that is not JSON, has no ``image``/``id`` or has a ratio other than
            8, 16 or 32 (file and line named), or a file without any label.
    """
    labels: dict[str, int] = {}
    for number, record in iter_json_lines(path):
        name = record.get("image", record.get("id")) if isinstance(record, dict) else None
        ratio = record.get("ratio") if isinstance(record, dict) else None
        if not isinstance(name, str) or ratio not in RATIOS:
            raise ValueError(
                f"{path}:{number}: a label needs 'image' (or 'id') and 'ratio' 8, 16 or 32, "
                f"got {json.dumps(record)[:120]}"
            )
        labels[Path(name).name] = ratio
    if not labels:
        raise ValueError(f"{path}: no ratio labels")
    return labels


def _apply_ratio_labels(dataset, labels_file: str):
    labels = read_ratio_labels(labels_file)

    def label(row: dict) -> dict:
        return {"ratio": labels.get(_image_name(row["image"]), NO_RATIO_LABEL)}

    columns = dataset.column_names or []
    if "ratio" in columns:
        dataset = dataset.remove_columns("ratio")
    return dataset.map(label)


def row_image_path(row: dict) -> str:
    """The image path of a dataset row (a path string, or an image dict with a ``path``)."""
    image = row["image"]
    return image["path"] if isinstance(image, dict) else image


def _image_name(value) -> str:
    if isinstance(value, str):
        return Path(value).name
    filename = getattr(value, "filename", "") or (value.get("path", "") if isinstance(value, dict) else "")
    return Path(filename).name


def _apply_split_file(dataset, split_file: str, subset: str):
    lists = json.loads(Path(split_file).read_text(encoding="utf-8"))
    if subset not in lists:
        raise ValueError(f"{split_file}: no list named {subset!r} (has {sorted(lists)})")
    keep = set(lists[subset])
    if isinstance(dataset, datasets.Dataset) and isinstance(dataset[0]["image"], str):
        indices = [i for i, name in enumerate(dataset["image"]) if Path(name).name in keep]
        if not indices:
            raise ValueError(f"{split_file}: none of the {subset!r} images are in the dataset")
        return dataset.select(indices)
    return dataset.filter(lambda row: _image_name(row["image"]) in keep)


# --------------------------------------------------------------------------------------------
# Cropping
# --------------------------------------------------------------------------------------------


def random_crop(
    image: Image.Image, resolution: int, rng: random.Random, random_resize: bool, flip: bool
) -> Image.Image:
    """A ``resolution`` x ``resolution`` crop; small images are upscaled (bicubic) to fit first."""
    short = min(image.size)
    target_short = resolution
    if random_resize and short > resolution:
        target_short = rng.randint(resolution, short)
    elif short >= resolution:
        target_short = short
    if target_short != short:
        scale = target_short / short
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    left = rng.randint(0, image.width - resolution)
    top = rng.randint(0, image.height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def _sample(row: dict, config: DataConfig, seed: int, epoch: int, position: int) -> dict:
    rng = random.Random(hash((seed, epoch, position)))
    image = load_image(row_image_path(row))
    crop = random_crop(image, config.resolution, rng, config.random_resize, config.horizontal_flip)
    ratio = row.get("ratio", NO_RATIO_LABEL)
    return {
        "pixel_values": pil_to_tensor(crop),
        "ratio_label": torch.tensor(int(ratio) if ratio in RATIOS else NO_RATIO_LABEL),
    }


class CropDataset(torch.utils.data.Dataset):
    """Map-style training set: a per-epoch permutation and reproducible random crops.

    Shuffling is done here (not by the DataLoader) so that the order of epoch ``e`` is a pure
    function of (seed, e): with ``accelerator.skip_first_batches`` a resumed run continues on the
    exact same batches.
    """

    def __init__(self, dataset: datasets.Dataset, config: DataConfig, seed: int = 0):
        self.dataset, self.config, self.seed = dataset, config, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        self.order = torch.randperm(len(self.dataset), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict:
        return _sample(self.dataset[self.order[position]], self.config, self.seed, self.epoch, position)


class StreamingCropDataset(torch.utils.data.IterableDataset):
    """Iterable training set over a streamed ``datasets.IterableDataset`` (buffer-shuffled)."""

    def __init__(self, dataset: datasets.IterableDataset, config: DataConfig, seed: int = 0):
        self.dataset = dataset.shuffle(seed=seed, buffer_size=config.shuffle_buffer)
        self.config, self.seed, self.epoch = config, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        for position, row in enumerate(self.dataset):
            yield _sample(row, self.config, self.seed, self.epoch, position)


def build_dataset(config: DataConfig, seed: int = 0) -> CropDataset | StreamingCropDataset:
    """The torch dataset the trainer's DataLoader reads from."""
    dataset = load_training_dataset(config)
    if isinstance(dataset, datasets.IterableDataset):
        return StreamingCropDataset(dataset, config, seed)
    return CropDataset(dataset, config, seed)


def make_devset_split(captions_path: str | Path, heldout_fraction: float = 0.15, seed: int = 0) -> dict:
    """Deterministic split of a captions.jsonl stratified by its ``domain`` key.

    Every domain gives ``round(fraction * n)`` (at least one) of its images, picked by a seeded
    shuffle of the names sorted alphabetically, to the held-out list.
    """
    entries = read_captions_jsonl(captions_path).entries
    by_domain: dict[str, list[str]] = {}
    for entry in entries:
        by_domain.setdefault(entry.extra.get("domain", "unknown"), []).append(entry.image)
    rng = random.Random(seed)
    train, heldout = [], []
    for domain in sorted(by_domain):
        names = sorted(by_domain[domain])
        rng.shuffle(names)
        count = max(1, round(heldout_fraction * len(names)))
        heldout += sorted(names[:count])
        train += sorted(names[count:])
    return {
        "source": str(captions_path),
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "stratified_by": "domain",
        "train": sorted(train),
        "heldout": sorted(heldout),
    }
