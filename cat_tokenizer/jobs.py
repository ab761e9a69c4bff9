"""Which images a ``cat-tokenize`` run processes, with which caption: the join of DIR and captions.jsonl.

Rules (documented in the CLI help too):

* Every file under ``--images`` (recursively, hidden files and folders skipped) whose extension
  Pillow can open is an image of the run. Other files are ignored unless a caption line names
  them (then they are tried, and a non-image lands in errors.jsonl).
* A caption line's image path is relative to ``--images``. A path that is absolute or leaves the
  directory, or names a file that does not exist, is an error for that line.
* Two lines naming the same image (also after normalising ``./a.jpg`` to ``a.jpg``): the first
  wins, the second is an error. Rejected lines (not UTF-8, not JSON, ...) come from
  :func:`cat_tokenizer.captions.read_captions_jsonl`.
* An image without a caption line, or with an empty caption, is routed by the image-only
  fallback; with ``require_captions`` an image without a caption line is skipped instead.
* The work list is sorted by image id (the path relative to ``--images``), so every process of
  a distributed run sees the same list.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cat_foundations.captions import read_captions_jsonl
from cat_foundations.images import load_image, load_image_bytes


@dataclass(frozen=True)
class WorkItem:
    """One image to tokenize.

    Args:
        id: path relative to the images directory, POSIX separators (the manifest's ``id``).
        path: the file.
        caption: its caption, or None (image fallback).
        line: the captions.jsonl line it came from, or None.
        data: the encoded image bytes when it does not live in a file of its own (a tar member,
            a dataset cell); ``path`` is then None.
        shard: the input shard it came from (``--shards`` / ``--hf-dataset`` runs), else None.
        key: its sample key inside that shard, else None.
    """

    id: str
    path: Path | None
    caption: str | None
    line: int | None
    data: bytes | None = field(default=None, repr=False)
    shard: str | None = None
    key: str | None = None

    def load(self):
        """The RGB PIL image (:func:`cat_foundations.images.load_image` rules, errors name the item)."""
        if self.data is not None:
            return load_image_bytes(self.data, f"{self.shard}:{self.key}" if self.shard else self.id)
        return load_image(self.path)

    def error(self, reason: str) -> dict:
        """This item's errors.jsonl record (with shard and key for sharded input)."""
        record = {"path": self.id, "line": self.line, "reason": reason}
        if self.shard is not None:
            record.update(shard=self.shard, key=self.key)
        return record


@dataclass
class WorkPlan:
    """The run's work list plus what was rejected or skipped while building it."""

    items: list[WorkItem]
    errors: list[dict] = field(default_factory=list)
    skipped_without_caption: list[str] = field(default_factory=list)


def openable_extensions() -> set[str]:
    """Lower-case file extensions Pillow has an opener for (``.jpg``, ``.png``, ``.tif``, ...)."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def scan_images(images_dir: Path) -> list[str]:
    """Image ids (relative POSIX paths) under ``images_dir``, sorted; hidden entries skipped."""
    extensions = openable_extensions()
    found = []
    for path in images_dir.rglob("*"):
        relative = path.relative_to(images_dir)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in extensions:
            found.append(relative.as_posix())
    return sorted(found)


def normalise_image_key(raw: str) -> str | None:
    """``./a/../b.jpg`` -> ``b.jpg``; None when the path is absolute or leaves the directory."""
    raw = raw.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        return None
    normal = posixpath.normpath(raw)
    if normal == ".." or normal.startswith("../") or normal == ".":
        return None
    return normal


def _error(path: str, line: int | None, reason: str) -> dict:
    return {"path": path, "line": line, "reason": reason}


def plan_work(images_dir: Path, captions_path: Path | None, require_captions: bool = False) -> WorkPlan:
    """Build the work list; see the module docstring for the rules.

    Raises:
        OSError: the captions file itself cannot be read (fatal for a run).
    """
    images_dir = Path(images_dir)
    plan = WorkPlan(items=[])
    captioned: dict[str, WorkItem] = {}
    if captions_path is not None:
        parsed = read_captions_jsonl(captions_path)
        plan.errors.extend(_error(e.path, e.line, e.reason) for e in parsed.errors)
        for entry in parsed.entries:
            image_id = normalise_image_key(entry.image)
            if image_id is None:
                plan.errors.append(
                    _error(entry.image, entry.line, "image path is absolute or outside --images")
                )
                continue
            if image_id in captioned:
                first = captioned[image_id].line
                plan.errors.append(
                    _error(
                        entry.image,
                        entry.line,
                        f"duplicate entry for '{image_id}' (first given on line {first}; this line ignored)",
                    )
                )
                continue
            path = images_dir / image_id
            if not path.is_file():
                plan.errors.append(
                    _error(image_id, entry.line, f"caption for a missing file: {path} does not exist")
                )
                continue
            captioned[image_id] = WorkItem(image_id, path, entry.caption, entry.line)
    items = dict(captioned)
    for image_id in scan_images(images_dir):
        if image_id in items:
            continue
        if require_captions:
            plan.skipped_without_caption.append(image_id)
            continue
        items[image_id] = WorkItem(image_id, images_dir / image_id, None, None)
    plan.items = [items[key] for key in sorted(items)]
    return plan
