"""The one cache root of cat-tokenizer (converted router model, benchmark results, ...).

``cache_root()`` is ``$CAT_TOKENIZER_CACHE`` when set, else the platform's user cache directory
for ``cat-tokenizer`` (platformdirs: ``$XDG_CACHE_HOME/cat-tokenizer``, by default
``~/.cache/cat-tokenizer``, on Linux). Each user of the cache takes a subfolder
(``router/``, ``bench/``).

Older versions cached under ``~/.cache/cat_tokenizer`` (underscore, XDG ignored).
:func:`find_cached` still reads a complete entry from there, so nothing is rebuilt after an upgrade;
new entries are always written under :func:`cache_root`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from platformdirs import user_cache_dir

APP_NAME = "cat-tokenizer"
CACHE_ENV = "CAT_TOKENIZER_CACHE"


def cache_root() -> Path:
    """``$CAT_TOKENIZER_CACHE``, else platformdirs' user cache dir (honours ``XDG_CACHE_HOME``)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else Path(user_cache_dir(APP_NAME, appauthor=False))


def legacy_cache_root() -> Path:
    """Where versions before the one cache root wrote (read-only fallback)."""
    return Path.home() / ".cache" / "cat_tokenizer"


def find_cached(relative: str | os.PathLike, is_complete: Callable[[Path], bool]) -> Path:
    """``cache_root() / relative``, or the legacy location when only that holds a complete entry.

    The legacy location is consulted only when ``$CAT_TOKENIZER_CACHE`` is unset (an explicit
    override means exactly that folder).
    """
    current = cache_root() / relative
    if is_complete(current) or os.environ.get(CACHE_ENV):
        return current
    legacy = legacy_cache_root() / relative
    return legacy if is_complete(legacy) else current
