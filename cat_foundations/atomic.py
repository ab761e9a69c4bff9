"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The one recipe, used for every file cat-tokenizer writes that a kill must not corrupt (shards,
manifests, policies, checkpoint configs, benchmark caches): write ``<path>.<pid>.tmp`` in the
same directory (same filesystem, so the rename is atomic), flush and fsync it, then
:func:`os.replace` it over ``path``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsync'd temporary file + rename)."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 ``text`` to ``path``, atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value, indent: int | None = 2) -> None:
    """``value`` as JSON (plus a final newline) to ``path``, atomically."""
    atomic_write_text(path, json.dumps(value, indent=indent) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Records as JSON lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of a JSON-lines file someone else wrote.

    Raises:
        ValueError: a line that is not JSON, named as ``<path>:<line>: not JSON (<reason>)``.
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file written by :func:`write_jsonl` (an absent file reads as empty)."""
    if not Path(path).exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
