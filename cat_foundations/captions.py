"""Reading ``captions.jsonl``: one JSON object per line naming an image and its caption.

Accepted keys (first one present wins):

* image path, relative to the images directory: ``image``, ``file_name``, ``path``
* caption: ``caption``, ``text``

Other keys (``domain``, ``source``, ...) are kept in :attr:`CaptionEntry.extra`.
Captions are cleaned by :func:`clean_caption` (the one caption-cleaning rule: whitespace runs
collapse to one space, the ends are stripped). An empty or missing caption is not an error: the entry gets ``caption=None`` and the router
falls back to the image-only complexity score.

Bad lines never stop the read. Each becomes a :class:`CaptionError` with the file, the
1-based line number and the reason: bytes that are not UTF-8, text that is not JSON, JSON that
is not an object, no image key, a non-string field, or a second entry for an image already
listed (the first entry wins). Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_KEYS = ("image", "file_name", "path")
CAPTION_KEYS = ("caption", "text")


@dataclass
class CaptionEntry:
    """One usable line of a captions file."""

    image: str
    caption: str | None
    line: int
    extra: dict = field(default_factory=dict)


@dataclass
class CaptionError:
    """One rejected line of a captions file."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class CaptionsFile:
    """The parsed file: usable entries in file order, and the lines that were rejected."""

    path: str
    entries: list[CaptionEntry]
    errors: list[CaptionError]


def clean_caption(caption) -> str | None:
    """The one caption-cleaning rule: collapse whitespace runs to one space, strip the ends.

    Collapsing keeps a caption from breaking the router's prompt layout and makes score caches
    match. ``None`` and a caption that is empty after cleaning give ``None`` (no caption: the
    image fallback routes it).

    Raises:
        TypeError: ``caption`` is neither a string nor None.
    """
    if caption is None:
        return None
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a string or None, got {type(caption).__name__}")
    return " ".join(caption.split()) or None


def _first_present(record: dict, keys: tuple[str, ...]) -> tuple[str | None, object]:
    for key in keys:
        if key in record:
            return key, record[key]
    return None, None


def parse_caption_line(record: object, line: int) -> CaptionEntry | str:
    """Turn one decoded JSON value into an entry, or return the reason it is unusable."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    image_key, image = _first_present(record, IMAGE_KEYS)
    if image_key is None:
        return f"no image key (expected one of {', '.join(IMAGE_KEYS)})"
    if not isinstance(image, str) or not image.strip():
        return f"'{image_key}' must be a non-empty string"
    caption_key, caption = _first_present(record, CAPTION_KEYS)
    if caption is not None and not isinstance(caption, str):
        return f"'{caption_key}' must be a string, got {type(caption).__name__}"
    extra = {k: v for k, v in record.items() if k not in (image_key, caption_key)}
    return CaptionEntry(image=image.strip(), caption=clean_caption(caption), line=line, extra=extra)


def read_captions_jsonl(path: str | Path) -> CaptionsFile:
    """Parse a captions.jsonl file; see the module docstring for the rules.

    Raises:
        FileNotFoundError / IsADirectoryError / PermissionError: the file itself cannot be read
        (a fatal error for a batch job, unlike a bad line).
    """
    path = Path(path)
    raw_lines = path.read_bytes().split(b"\n")
    entries: list[CaptionEntry] = []
    errors: list[CaptionError] = []
    first_line_of: dict[str, int] = {}
    for number, raw in enumerate(raw_lines, start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            errors.append(
                CaptionError(str(path), number, f"not valid UTF-8 ({error.reason} at byte {error.start})")
            )
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            errors.append(
                CaptionError(str(path), number, f"not valid JSON: {error.msg} (column {error.colno})")
            )
            continue
        parsed = parse_caption_line(record, number)
        if isinstance(parsed, str):
            errors.append(CaptionError(str(path), number, parsed))
            continue
        if parsed.image in first_line_of:
            reason = f"duplicate entry for '{parsed.image}' (first given on line {first_line_of[parsed.image]}; this line ignored)"
            errors.append(CaptionError(str(path), number, reason))
            continue
        first_line_of[parsed.image] = number
        entries.append(parsed)
    return CaptionsFile(path=str(path), entries=entries, errors=errors)
