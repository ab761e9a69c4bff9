"""Hugging Face Hub checkpoints: one rule for what names a Hub repo, download into the HF cache, upload.

Used by ``NestedVAE.from_pretrained`` / ``push_to_hub`` and by the ``CATTokenizer`` bundle; all
transfers go through ``huggingface_hub`` (its cache layout, ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``,
``HF_TOKEN`` and ``hf auth login`` all apply unchanged).

A name is a Hub repo id when it has the form ``org/name`` (``huggingface_hub``'s own id rules), and
no local path of that name exists: a local directory always wins, so ``runs/export`` keeps meaning
the folder when it is there.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_hub_repo_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` should be looked up on the Hub (``org/name`` form, not an existing local path)."""
    text = str(name)
    if not _REPO_ID.match(text) or Path(text).exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def download_files(
    repo_id: str,
    filenames: list[str],
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """Fetch ``filenames`` of a Hub model repo into the HF cache; return the snapshot folder.

    Offline (``HF_HUB_OFFLINE=1``) the files come from the cache alone.

    Raises:
        FileNotFoundError: the repo, the revision or a file is neither on the Hub (or unreachable)
            nor in the local cache; the message names the repo, the file and how to fix it.
    """
    # huggingface_hub is imported here: a plain local-directory load never needs it.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    folder = None
    for filename in filenames:
        try:
            path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token)
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
            where = f"{repo_id}@{revision}" if revision else repo_id
            raise FileNotFoundError(
                f"cannot fetch {filename} of the Hugging Face Hub repo {where!r}: "
                f"{type(error).__name__}: {' '.join(str(error).split())[:300]} "
                "(check the repo id and your login (`hf auth login`), or pass a local directory; "
                "offline, the files must already be in the HF cache)"
            ) from None
        # Each file's snapshot folder mirrors the repo, so strip the file's own sub-path.
        folder = Path(path).parents[len(Path(filename).parts) - 1]
    return folder


def upload_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload with cat-tokenizer",
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` as one commit; return the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision
    )
    return str(getattr(info, "commit_url", info))


def push_saved(save_pretrained: Callable[[Path], object], repo_id: str, **upload_options) -> str:
    """``push_to_hub`` of anything with a ``save_pretrained``: save into a scratch folder, upload it.

    ``upload_options`` are :func:`upload_folder`'s (``private``, ``token``, ``commit_message``).
    """
    with tempfile.TemporaryDirectory() as scratch:
        save_pretrained(Path(scratch))
        return upload_folder(scratch, repo_id, **upload_options)
