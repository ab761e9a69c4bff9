"""Evaluation image sources: hub datasets (COCO, CelebA, ChartQA), local folders, captions.jsonl.

Every source yields :class:`EvalSample` (id, lazily loaded RGB image, caption or None, domain).
Images are then prepared with :func:`prepare_image`, the one fixed protocol:

    load_image (EXIF, alpha on white, 8-bit RGB)  ->  center_crop_resize(size)
    (crop the central square on the short side, then bicubic resize to size x size; never pad)

rFID numbers are only comparable between runs that crop identically (a known source of
mismatches, e.g. showlab/D-AR#3), so benchmarks never crop any other way.

Sources (``--dataset``):

* ``coco`` / ``celeba`` / ``chartqa``: Hugging Face datasets (defaults in :data:`HUB_DATASETS`;
  id, config, split and column names are overridable). Loaded with ``streaming=True`` so
  ``--limit N`` reads only N rows.
* a directory with ``captions.jsonl`` (e.g. the devset): captions and the ``domain`` column.
* ``imagefolder:DIR`` (or a directory without captions.jsonl): every image file, no captions.
* a ``.jsonl`` captions file (images relative to its directory).
* a ``.parquet`` file or glob: rows in the hub layout, read by ``datasets``' parquet builder.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from cat_foundations.captions import read_captions_jsonl
from cat_foundations.images import center_crop_resize, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class EvalSample:
    """One evaluation image.

    Args:
        id: stable identifier (file name or ``<dataset>/<split>/<row>``); keys the result cache.
        load: returns the raw image (anything :func:`cat_tokenizer.images.load_image` accepts).
        caption: the caption, or None (the router then falls back to the image score).
        domain: a group name for per-domain tables (the dataset name for hub datasets).
    """

    id: str
    load: Callable[[], object]
    caption: str | None
    domain: str

    def image(self, size: int) -> Image.Image:
        """The image under the fixed evaluation protocol (:func:`prepare_image`)."""
        return prepare_image(self.load(), size)


def prepare_image(image, size: int) -> Image.Image:
    """The fixed protocol: RGB via ``load_image``, center crop on the short side, bicubic resize."""
    return center_crop_resize(load_image(image), size)


# --------------------------------------------------------------------------------------------
# Captions built from dataset fields
# --------------------------------------------------------------------------------------------


def first_text(value) -> str | None:
    """A caption column may hold a string or a list of strings (COCO has five): take the first."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    if isinstance(value, str) and value.strip():
        return " ".join(value.split())
    return None


# CelebA attribute -> phrase. Attributes not listed here (e.g. Attractive) say nothing visual.
_CELEBA_HAIR = {"Black_Hair": "black", "Blond_Hair": "blond", "Brown_Hair": "brown", "Gray_Hair": "gray"}
_CELEBA_FEATURES = {
    "Eyeglasses": "eyeglasses",
    "Wearing_Hat": "a hat",
    "Mustache": "a mustache",
    "Goatee": "a goatee",
    "Bangs": "bangs",
    "Wearing_Earrings": "earrings",
    "Wearing_Necklace": "a necklace",
    "Wearing_Necktie": "a necktie",
    "Heavy_Makeup": "heavy makeup",
}


def _truthy(value) -> bool:
    # CelebA exports use bool, 0/1 or -1/1 depending on the copy.
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value) and value != -1


def celeba_caption(row: dict) -> str:
    """A COCO-style caption from CelebA's 40 binary attributes (CelebA has no captions)."""
    person = "man" if _truthy(row.get("Male")) else "woman"
    if _truthy(row.get("Young")):
        person = f"young {person}"
    if _truthy(row.get("Smiling")):
        person = f"smiling {person}"
    parts = [f"A close-up face photo of a {person}"]
    hair = [colour for key, colour in _CELEBA_HAIR.items() if _truthy(row.get(key))]
    if _truthy(row.get("Bald")):
        parts.append("who is bald")
    elif hair:
        style = (
            " wavy"
            if _truthy(row.get("Wavy_Hair"))
            else " straight"
            if _truthy(row.get("Straight_Hair"))
            else ""
        )
        parts.append(f"with{style} {hair[0]} hair")
    features = [phrase for key, phrase in _CELEBA_FEATURES.items() if _truthy(row.get(key))]
    if features:
        joined = features[0] if len(features) == 1 else ", ".join(features[:-1]) + " and " + features[-1]
        parts.append(("and " if len(parts) > 1 else "with ") + joined)
    caption = " ".join(parts)
    if _truthy(row.get("Blurry")):
        caption += ", slightly blurry"
    return caption + "."


def chartqa_caption(row: dict) -> str:
    """A caption for a ChartQA chart from its question and answer (ChartQA has no captions)."""
    title = first_text(row.get("title"))
    question = first_text(row.get("query")) or first_text(row.get("question"))
    answer = first_text(row.get("label")) or first_text(row.get("answer"))
    caption = f"A chart titled '{title}'" if title else "A chart with labelled axes and a legend"
    if question:
        caption += f" that answers the question '{question}'"
        if answer:
            caption += f" (answer: {answer})"
    return caption + "."


CAPTION_BUILDERS: dict[str, Callable[[dict], str]] = {"celeba": celeba_caption, "chartqa": chartqa_caption}


# --------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubDatasetSpec:
    """Where a benchmark dataset lives on the Hugging Face hub and which columns to read.

    Args:
        name: short name, also the ``domain`` of its samples.
        path: hub dataset id, or a builder name (``parquet``, ``imagefolder``) with ``data_files``.
        config: dataset config (subset) name, or None.
        split: split to evaluate.
        image_column: column holding the image.
        caption_column: column holding the caption (string or list of strings), or None when the
            caption is built from other fields by ``caption_builder``.
        caption_builder: key of :data:`CAPTION_BUILDERS` used when ``caption_column`` is None or
            missing from a row.
        data_files: files for builder names such as ``parquet`` (a path or glob).
    """

    name: str
    path: str
    config: str | None = None
    split: str = "validation"
    image_column: str = "image"
    caption_column: str | None = None
    caption_builder: str | None = None
    data_files: str | list[str] | None = field(default=None)


HUB_DATASETS: dict[str, HubDatasetSpec] = {
    # 5,000 COCO 2017 val images, five human captions each (column "answer").
    "coco": HubDatasetSpec("coco", "lmms-lab/COCO-Caption2017", split="val", caption_column="answer"),
    # CelebA aligned faces with 40 attributes and identities; no captions.
    "celeba": HubDatasetSpec(
        "celeba", "flwrlabs/celeba", config="img_align+identity+attr", split="test", caption_builder="celeba"
    ),
    # ChartQA charts with a question ("query") and answers ("label"); no captions.
    "chartqa": HubDatasetSpec("chartqa", "HuggingFaceM4/ChartQA", split="test", caption_builder="chartqa"),
}


def builder_args(spec: HubDatasetSpec, streaming: bool = True) -> dict:
    """Keyword arguments for ``datasets.load_dataset`` (the network boundary: tests check these)."""
    args: dict = {"path": spec.path, "split": spec.split, "streaming": streaming}
    if spec.config is not None:
        args["name"] = spec.config
    if spec.data_files is not None:
        args["data_files"] = spec.data_files
    return args


def _decode_hub_image(value):
    """``datasets`` yields PIL images, or ``{"bytes", "path"}`` dicts when decoding is off."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return value["path"]
    return value


def row_to_sample(row: dict, index: int, spec: HubDatasetSpec) -> EvalSample:
    """One dataset row -> :class:`EvalSample` (caption from the column, else from the builder)."""
    if spec.image_column not in row:
        raise KeyError(
            f"dataset {spec.path!r} row {index} has no image column {spec.image_column!r}; "
            f"columns are {sorted(row)} (pass --image-column)"
        )
    caption = first_text(row.get(spec.caption_column)) if spec.caption_column else None
    if caption is None and spec.caption_builder:
        caption = CAPTION_BUILDERS[spec.caption_builder](row)
    if caption is None and spec.caption_column and spec.caption_column not in row:
        raise KeyError(
            f"dataset {spec.path!r} row {index} has no caption column {spec.caption_column!r}; "
            f"columns are {sorted(row)} (pass --caption-column)"
        )
    image = row[spec.image_column]
    return EvalSample(
        id=f"{spec.name}/{spec.split}/{index:07d}",
        load=lambda image=image: _decode_hub_image(image),
        caption=caption,
        domain=spec.name,
    )


def iter_hub_dataset(
    spec: HubDatasetSpec, limit: int | None = None, streaming: bool = True
) -> Iterator[EvalSample]:
    """Samples of a ``datasets`` dataset (hub id or local builder), at most ``limit``."""
    import datasets  # heavy import, only when a hub/parquet source is used

    dataset = datasets.load_dataset(**builder_args(spec, streaming=streaming))
    for index, row in enumerate(itertools.islice(dataset, limit)):
        yield row_to_sample(row, index, spec)


# --------------------------------------------------------------------------------------------
# Local sources
# --------------------------------------------------------------------------------------------


def iter_captions_jsonl(
    path: str | os.PathLike, limit: int | None = None, default_domain: str = "all"
) -> Iterator[EvalSample]:
    """Samples listed in a captions.jsonl (images relative to its directory); bad lines are reported.

    Raises:
        ValueError: the file has bad lines (all of them listed with file:line and the reason).
    """
    path = Path(path)
    parsed = read_captions_jsonl(path)
    if parsed.errors:
        listing = "\n".join(f"  {error}" for error in parsed.errors[:20])
        raise ValueError(f"{path}: {len(parsed.errors)} unusable line(s):\n{listing}")
    for entry in itertools.islice(parsed.entries, limit):
        image_path = path.parent / entry.image
        yield EvalSample(
            id=entry.image,
            load=lambda image_path=image_path: image_path,
            caption=entry.caption,
            domain=str(entry.extra.get("domain", default_domain)),
        )


def iter_image_folder(directory: str | os.PathLike, limit: int | None = None) -> Iterator[EvalSample]:
    """Every image file under ``directory`` (sorted, recursive), without captions.

    The domain is the first sub-folder name (ImageFolder layout), or the folder's own name.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder not found: {directory}")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for file in itertools.islice(files, limit):
        relative = file.relative_to(directory)
        domain = relative.parts[0] if len(relative.parts) > 1 else directory.name
        yield EvalSample(id=relative.as_posix(), load=lambda file=file: file, caption=None, domain=domain)


def resolve_source(
    dataset: str,
    hf_id: str | None = None,
    config: str | None = None,
    split: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    data_files: str | None = None,
) -> HubDatasetSpec | tuple[str, Path]:
    """Interpret ``--dataset`` (and the hub overrides) without touching the data.

    Returns a :class:`HubDatasetSpec` for hub and parquet sources, ``("jsonl", path)`` for a
    captions file, or ``("imagefolder", path)`` for a folder of images. ``hf_id="parquet"`` with
    ``data_files`` reads a local copy of a hub dataset with that dataset's columns and captions
    (its split is then ``train``, the builder's name for local files, unless ``split`` is given).
    """
    overrides = {
        key: value
        for key, value in {
            "path": hf_id,
            "config": config,
            "split": split,
            "image_column": image_column,
            "caption_column": caption_column,
            "data_files": data_files,
        }.items()
        if value is not None
    }
    if data_files is not None and split is None:
        overrides["split"] = "train"
    if dataset in HUB_DATASETS:
        return replace(HUB_DATASETS[dataset], **overrides)
    if dataset.startswith("imagefolder:"):
        return ("imagefolder", Path(dataset.split(":", 1)[1]))
    if dataset.startswith("hf:"):
        return HubDatasetSpec(name=dataset[3:].split("/")[-1], **{"path": dataset[3:], **overrides})
    path = Path(dataset)
    if dataset.endswith(".parquet") or "*" in dataset:
        spec = HubDatasetSpec(name="parquet", path="parquet", split="train", data_files=dataset)
        return replace(spec, **overrides)
    if path.is_file() and path.suffix == ".jsonl":
        return ("jsonl", path)
    if path.is_dir():
        if (path / "captions.jsonl").is_file():
            return ("jsonl", path / "captions.jsonl")
        return ("imagefolder", path)
    raise ValueError(
        f"unknown dataset {dataset!r}: use one of {sorted(HUB_DATASETS)}, hf:<hub id>, a directory "
        "(with or without captions.jsonl), imagefolder:<dir>, a captions .jsonl or a .parquet file"
    )


def iter_samples(dataset: str, limit: int | None = None, **overrides) -> Iterator[EvalSample]:
    """Samples of ``--dataset``, one at a time (images stay lazy), at most ``limit``.

    See :func:`resolve_source` for what ``dataset`` may be; ``overrides`` are its hub options.
    """
    source = resolve_source(dataset, **overrides)
    if isinstance(source, HubDatasetSpec):
        return iter_hub_dataset(source, limit=limit)
    if source[0] == "jsonl":
        return iter_captions_jsonl(source[1], limit=limit)
    return iter_image_folder(source[1], limit=limit)


# ---- splits (--split-file) -------------------------------------------------------------------

HELDOUT_SPLIT_NAMES = ("val", "validation", "heldout", "held_out", "test")


def read_split_file(path: str | None) -> dict[str, set[str]]:
    """Split name -> image ids, from JSON ``{name: [ids]}``, ``{id: name}``, a JSON list or a text file."""
    if not path:
        return {}
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {"heldout": {line.strip() for line in text.splitlines() if line.strip()}}
    if isinstance(data, list):
        return {"heldout": {str(item) for item in data}}
    if isinstance(data, dict):
        lists = {str(k): {str(i) for i in v} for k, v in data.items() if isinstance(v, list)}
        if lists:  # {split: [ids]}; scalar keys (seed, source, ...) are metadata
            # A list inside another (e.g. held-out images that share a source photo with training
            # images) also gets the difference, so numbers come "with and without" them.
            for name, ids in list(lists.items()):
                for other, other_ids in list(lists.items()):
                    if other != name and other_ids and other_ids < ids:
                        lists[f"{name} minus {other}"] = ids - other_ids
            return lists
        splits: dict[str, set[str]] = {}
        for key, value in data.items():  # {image id: split name}
            if isinstance(value, str):
                splits.setdefault(value, set()).add(str(key))
        if splits:
            return splits
    raise ValueError(
        f"{path}: expected {{split: [image ids]}}, {{image id: split}}, a list or one id per line"
    )


def heldout_ids(splits: dict[str, set[str]]) -> set[str] | None:
    for name in HELDOUT_SPLIT_NAMES:
        if name in splits:
            return splits[name]
    return None
