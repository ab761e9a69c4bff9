"""Sharded inputs of ``cat-tokenize``: webdataset tar shards and Hugging Face datasets.

An :class:`InputShard` is the unit of work and of commit: one output shard per input shard, named
after it, so a rerun or ``--resume`` maps every input shard to the same output. Reading one gives
its :class:`~cat_tokenizer.jobs.WorkItem` list plus error records for what could not be read.

**Tar shards** (``--shards 'in/{00000..00099}.tar'``, brace-expanded by ``braceexpand``; local paths,
``file:``/``pipe:``/``http(s):`` URLs as ``webdataset.gopen`` opens them) follow img2dataset's
webdataset layout: members ``KEY.jpg|jpeg|png|webp`` beside ``KEY.txt`` or ``KEY.json`` (caption
under ``caption`` or ``text``). Tar members are streamed by ``webdataset``'s tar iterator; only
the grouping of members into samples is done here, so a read error can be pinned on the sample
being assembled. Per sample:

* an image without a caption member is an error record and is routed by the image fallback
  (skipped with ``--require-captions``); a caption without an image is an error record;
* an image that does not decode is an error record (at encode time, like a bad file);
* a shard that cannot be opened (network, pipe) is an error record and is not committed, so
  ``--resume`` tries it again;
* a truncated shard, or a corrupt tar header (``tarfile`` stops reading silently there; the
  unread non-zero bytes after it give it away), is an error record naming the last sample read;
  every sample before it goes through.

An input shard is held in memory while it is tokenized (img2dataset's default of 10,000 JPEGs at
256x256 is about 200 MB); its latents are written once, when it is done.

**Hugging Face datasets** (``--hf-dataset ID_OR_PATH --split S``): a Hub id or a local folder
(``datasets.load_dataset``; a ``save_to_disk`` folder through ``load_from_disk``). A map-style
dataset is cut into input shards of ``--shard-size`` rows; a ``--streaming`` one into its own
``n_shards`` (its files). Sample keys are row numbers (global for map-style, within the file
for streaming). A missing ``--image-column`` is fatal (nothing to tokenize); a missing
``--caption-column`` is one error record per shard and its images are routed by the fallback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cat_foundations.cli import FatalError
from cat_tokenizer.jobs import WorkItem

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")


@dataclass(frozen=True)
class InputShard:
    """One input shard: ``name`` (unique in the run, names its output), ``url`` (tar) or dataset index."""

    name: str
    url: str | None = None
    index: int | None = None
    count: int | None = None


@dataclass
class ShardContents:
    """What reading one input shard gave: the items to tokenize, error records, skipped keys."""

    items: list[WorkItem] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    skipped_without_caption: list[str] = field(default_factory=list)
    unopened: bool = False  # the shard could not be read: not committed, --resume retries it
    seen_keys: set[str] = field(default_factory=set, repr=False)


def require_webdataset():
    """The ``webdataset`` module, or a fatal error saying how to install it (the ``scale`` extra)."""
    try:
        import webdataset
    except ImportError:
        raise FatalError(
            "tar shards need the webdataset package: pip install 'cat-tokenizer[scale]' "
            "(or pip install webdataset==1.0.2 braceexpand)"
        ) from None
    return webdataset


def _error(shard: str, key: str | None, reason: str) -> dict:
    return {
        "path": f"{shard}/{key}" if key else shard,
        "line": None,
        "reason": reason,
        "shard": shard,
        "key": key,
    }


# ---- tar shards ------------------------------------------------------------------------------


def expand_shard_pattern(pattern: str) -> list[InputShard]:
    """``'in/{00000..00002}.tar'`` -> one :class:`InputShard` per URL, named by its file stem.

    Raises:
        FatalError: the pattern expands to nothing, names a missing local file, or two shards
            would share an output name.
    """
    require_webdataset()
    from braceexpand import braceexpand  # webdataset's own dependency for shard patterns

    urls = list(braceexpand(pattern))
    if not urls:
        raise FatalError(f"--shards {pattern!r} expands to no shard")
    shards, seen = [], {}
    for url in urls:
        local = None if ":" in url.split("/", 1)[0] else Path(url.removeprefix("file:"))
        if local is not None and not local.is_file():
            raise FatalError(f"--shards: {url} does not exist (pattern {pattern!r})")
        name = shard_name(url)
        if name in seen:
            raise FatalError(
                f"--shards: {seen[name]} and {url} would both write output shard {name!r}; give shards distinct file names"
            )
        seen[name] = url
        shards.append(InputShard(name=name, url=url))
    return shards


def shard_name(url: str) -> str:
    """The output name of a shard URL: its file stem (``pipe:aws s3 cp s3://b/00007.tar -`` -> ``00007``)."""
    text = url.split("?", 1)[0]
    tokens = [token for token in text.split() if ".tar" in token or ".tgz" in token] or [text]
    name = Path(tokens[-1].rstrip("/")).name
    return name.removesuffix(".tar.gz").removesuffix(".tgz").removesuffix(".tar")


def _caption(shard: str, key: str, sample: dict) -> tuple[str | None, str | None]:
    """(caption, error reason) of a grouped sample."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace"), None
    if "json" in sample:
        try:
            value = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return None, f"{key}.json is not valid JSON ({error}); routed by the image fallback"
        text = value.get("caption", value.get("text")) if isinstance(value, dict) else None
        if isinstance(text, str):
            return text, None
        return None, f"{key}.json has no 'caption' or 'text' string; routed by the image fallback"
    return None, f"no caption member ({key}.txt or {key}.json); routed by the image fallback"


def _item(shard: str, key: str, sample: dict, require_captions: bool, contents: ShardContents) -> None:
    """Turn one grouped sample into a work item (or error records)."""
    if key in contents.seen_keys:
        contents.errors.append(
            _error(
                shard,
                key,
                f"key {key!r} occurs twice in the shard (members not adjacent); the later one is ignored",
            )
        )
        return
    contents.seen_keys.add(key)
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_ext is None:
        contents.errors.append(
            _error(shard, key, f"no image member ({key}.jpg/.png/.webp) beside {sorted(sample)}")
        )
        return
    caption, problem = _caption(shard, key, sample)
    if caption is None and require_captions:
        contents.skipped_without_caption.append(f"{shard}/{key}")
        return
    if problem:
        contents.errors.append(_error(shard, key, problem))
    contents.items.append(
        WorkItem(f"{shard}/{key}", None, caption, None, data=sample[image_ext], shard=shard, key=key)
    )


def read_tar_shard(shard: InputShard, require_captions: bool = False) -> ShardContents:
    """Every sample of one tar shard (see the module docstring for what becomes an error)."""
    wds = require_webdataset()
    from webdataset.gopen import gopen

    contents = ShardContents()
    try:
        stream = gopen(shard.url, "rb")
    except Exception as error:  # any opener failure (missing file, network, pipe command)
        reason = f"cannot open {shard.url}: {type(error).__name__}: {error}; rerun with --resume"
        contents.errors.append(_error(shard.name, None, reason))
        contents.unopened = True
        return contents
    try:
        with stream:
            _read_members(wds, shard, stream, require_captions, contents)
    except OSError as error:  # the stream itself failed (a pipe command's exit status, a dropped connection)
        reason = (
            f"reading {shard.url} failed: {type(error).__name__}: {error}; not committed, rerun with --resume"
        )
        contents.errors = [_error(shard.name, None, reason)]
        contents.unopened = True
    return contents


def _read_members(wds, shard: InputShard, stream, require_captions: bool, contents: ShardContents) -> None:
    """Group the tar's members into samples (webdataset's tar iterator underneath) and collect them."""
    failures: list[BaseException] = []

    def handler(error: BaseException) -> bool:
        failures.append(error)
        return True  # keep going: what was read before the error still counts

    key, sample = None, {}
    for member in wds.tariterators.tar_file_expander([{"url": shard.url, "stream": stream}], handler=handler):
        if failures:
            break
        if not member:  # the end-of-shard marker
            continue
        prefix, suffix = wds.tariterators.base_plus_ext(member["fname"])
        if prefix is None:
            continue
        if prefix != key and key is not None:
            _item(shard.name, key, sample, require_captions, contents)
            sample = {}
        key = prefix
        sample.setdefault(suffix.lower(), member["data"])
    if failures and isinstance(failures[0], OSError):
        raise failures[0]  # the stream failed, not the tar: the caller leaves the shard uncommitted
    if failures:
        _record_failure(shard, key, sample, failures[0], require_captions, contents)
        return
    if key is not None:
        _item(shard.name, key, sample, require_captions, contents)
    _check_fully_read(shard, stream, key, contents)


def _record_failure(
    shard: InputShard, key, sample: dict, error: BaseException, require_captions, contents
) -> None:
    """A read error mid-shard: keep what came before it, record where it stopped."""
    # The sample being assembled is kept only if it already has an image and a caption: the
    # unreadable member may have been its last one or the next sample's first.
    complete = any(e in sample for e in IMAGE_EXTENSIONS) and any(e in sample for e in CAPTION_EXTENSIONS)
    if key is not None and complete:
        _item(shard.name, key, sample, require_captions, contents)
    reason = " ".join(str(error.args[0] if error.args else error).split(" @ ")[0].split())
    where = f"after sample {key!r}" if key else "at its start"
    kept = "" if complete or key is None else f" ({key!r} incomplete, not tokenized)"
    contents.errors.append(
        _error(
            shard.name,
            key,
            f"shard truncated or corrupt {where}{kept}: {type(error).__name__}: {reason}; "
            "the rest of the shard could not be read",
        )
    )


def _check_fully_read(shard: InputShard, stream, key: str | None, contents: ShardContents) -> None:
    """``tarfile`` ends a stream quietly at a corrupt header: unread non-zero bytes mean that happened."""
    try:
        rest = stream.read()
    except OSError:
        return
    if rest.strip(b"\0"):
        contents.errors.append(
            _error(
                shard.name,
                key,
                f"corrupt tar header after sample {key!r}: {len(rest)} byte(s) after it could not be read "
                "as tar members; re-create or re-download the shard",
            )
        )


# ---- Hugging Face datasets ---------------------------------------------------------------------


@dataclass(frozen=True)
class HFSource:
    """``--hf-dataset`` settings: where, which split, which columns, streamed or not."""

    path: str
    split: str
    image_column: str
    caption_column: str
    streaming: bool
    rows_per_shard: int


def load_hf_dataset(source: HFSource):
    """The split as a ``datasets`` (Iterable)Dataset, image cells left encoded (``decode=False``)."""
    # datasets is imported here: folder and tar runs never need it (it is slow to import).
    import datasets

    try:
        if Path(source.path).is_dir() and (Path(source.path) / "dataset_dict.json").exists():
            dataset = datasets.load_from_disk(source.path)[source.split]
        elif Path(source.path).is_dir() and (Path(source.path) / "state.json").exists():
            dataset = datasets.load_from_disk(source.path)
        else:
            dataset = datasets.load_dataset(source.path, split=source.split, streaming=source.streaming)
    except (
        FileNotFoundError,
        ConnectionError,
        ValueError,
        KeyError,
        datasets.exceptions.DatasetNotFoundError,
    ) as error:
        raise FatalError(f"--hf-dataset {source.path!r} split {source.split!r}: {error}") from None
    if source.streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset(num_shards=max(1, -(-len(dataset) // source.rows_per_shard)))
    columns = dataset.column_names
    if columns is not None and source.image_column not in columns:
        raise FatalError(
            f"--hf-dataset {source.path!r}: no image column {source.image_column!r} (columns: {', '.join(columns)}); "
            "pass --image-column"
        )
    features = dataset.features or {}
    if isinstance(features.get(source.image_column), datasets.Image):
        dataset = dataset.cast_column(source.image_column, datasets.Image(decode=False))
    return dataset


def hf_input_shards(source: HFSource, dataset) -> list[InputShard]:
    """Map-style: runs of ``rows_per_shard`` rows; streaming: the dataset's own shards (files)."""
    if source.streaming:
        count = dataset.num_shards
    else:
        count = max(1, -(-len(dataset) // source.rows_per_shard))
    return [
        InputShard(name=f"{source.split}-{index:05d}", index=index, count=count) for index in range(count)
    ]


def _cell_bytes(value) -> bytes | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path") and os.path.isfile(value["path"]):
            return Path(value["path"]).read_bytes()
    return None


def read_hf_shard(
    source: HFSource, dataset, shard: InputShard, require_captions: bool = False
) -> ShardContents:
    """Rows of one input shard of an HF dataset (see the module docstring)."""
    contents = ShardContents()
    if source.streaming:
        rows, first_row = dataset.shard(num_shards=shard.count, index=shard.index), 0
    else:
        first_row = shard.index * source.rows_per_shard
        rows = dataset.select(range(first_row, min(len(dataset), first_row + source.rows_per_shard)))
    columns = dataset.column_names
    if columns is not None and source.caption_column not in columns:
        contents.errors.append(
            _error(
                shard.name,
                None,
                f"no caption column {source.caption_column!r} (columns: {', '.join(columns)}); "
                "images routed by the image fallback; pass --caption-column",
            )
        )
    for offset, row in enumerate(rows):
        key = f"{first_row + offset:09d}"
        data = _cell_bytes(row.get(source.image_column))
        if data is None:
            contents.errors.append(
                _error(shard.name, key, f"column {source.image_column!r} holds no image bytes")
            )
            continue
        caption = row.get(source.caption_column)
        caption = caption if isinstance(caption, str) and caption.strip() else None
        if caption is None and require_captions:
            contents.skipped_without_caption.append(f"{shard.name}/{key}")
            continue
        if caption is None and source.caption_column in row:
            contents.errors.append(_error(shard.name, key, "empty caption; routed by the image fallback"))
        contents.items.append(
            WorkItem(f"{shard.name}/{key}", None, caption, None, data=data, shard=shard.name, key=key)
        )
    return contents
