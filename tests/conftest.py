"""Fixtures shared by every test package.

The development image set lives in ``../shared/data/devset`` beside the repository (or wherever
``CAT_DEVSET`` points). Outside CI a missing devset skips the tests that need it; in CI
(``CI=true``) it is an error, so a broken checkout never passes by skipping.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _devset_dir() -> Path:
    return Path(os.environ.get("CAT_DEVSET", REPO_ROOT.parent / "shared" / "data" / "devset"))


@pytest.fixture(scope="session")
def devset_dir() -> Path:
    """Directory of the shared development images (with captions.jsonl)."""
    directory = _devset_dir()
    if not (directory / "captions.jsonl").is_file():
        message = f"development set not found at {directory} (set CAT_DEVSET)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return directory


@pytest.fixture(scope="session")
def devset_records(devset_dir) -> list[dict]:
    """The devset captions.jsonl records, in file order."""
    with open(devset_dir / "captions.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="session")
def devset_sample(devset_records) -> list[dict]:
    """Two records per domain (deterministic): small real data for end-to-end tests."""
    picked: dict[str, list[dict]] = {}
    for record in devset_records:
        picked.setdefault(record["domain"], [])
        if len(picked[record["domain"]]) < 2:
            picked[record["domain"]].append(record)
    return [record for records in picked.values() for record in records]


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A tiny random NestedVAE saved with save_pretrained (real model code, seconds to build)."""
    from cat_tokenizer.testing import build_tiny_vae

    return build_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama + real byte-level BPE tokenizer (real transformers code path)."""
    from router.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
