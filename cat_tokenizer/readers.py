"""Reading a ``cat-tokenize`` output folder back, whatever wrote it.

Folder runs (``shards/r00-00000.safetensors``), sharded-input runs with ``--format safetensors``
(``shards/<name>.safetensors``) and with ``--format webdataset`` (``shards/<name>.tar``) all read
through the same three calls:

```python
from cat_tokenizer.readers import read_records, load_latent, iter_encoded, read_index
records = read_records("tokens/")            # manifest.jsonl, else rebuilt from the shards
enc = load_latent("tokens/", records[0])     # -> Encoded
for record, enc in iter_encoded("tokens/"): ...   # every shard opened once
table = read_index("tokens/")                # index.parquet as a pyarrow.Table
```
"""

from __future__ import annotations

import functools
import tarfile
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import load as load_safetensors_bytes

from cat_tokenizer import shard_store, store
from cat_tokenizer.encoded import Encoded
from cat_tokenizer.index import INDEX


def read_records(out_dir: str | Path) -> list[dict]:
    """Every tokenized image's record: ``manifest.jsonl`` of a finished run, else the committed shards."""
    out_dir = Path(out_dir)
    manifest = out_dir / store.MANIFEST
    if manifest.exists():
        return store.read_jsonl(manifest)
    records = store.read_shard_records(out_dir)
    for meta in shard_store.committed(out_dir).values():
        records.extend(meta["records"])
    return records


@functools.lru_cache(maxsize=4)
def _tar(path: str) -> tarfile.TarFile:
    # Kept open (a few at a time): opening a tar scans its headers once, then members are seeks.
    return tarfile.open(path, mode="r:")


def load_latent(out_dir: str | Path, record: dict) -> Encoded:
    """The :class:`Encoded` of one record, from a safetensors shard or a webdataset tar.

    Raises:
        ValueError: the shard does not hold the record's sample (names both).
    """
    path = Path(out_dir) / record["shard"]
    if path.suffix != ".tar":
        return store.load_latent(out_dir, record)
    member = f"{record['key']}.{shard_store.TAR_LATENT}"
    try:
        handle = _tar(str(path)).extractfile(member)
    except KeyError:
        raise ValueError(f"{path}: no member {member} (record {record['id']})") from None
    return Encoded.from_record(load_safetensors_bytes(handle.read())["latent"], record)


def iter_encoded(out_dir: str | Path) -> Iterator[tuple[dict, Encoded]]:
    """``(record, Encoded)`` for every tokenized image, grouped by shard (each opened once)."""
    by_shard: dict[str, list[dict]] = {}
    for record in read_records(out_dir):
        by_shard.setdefault(record["shard"], []).append(record)
    for _, records in sorted(by_shard.items()):
        for record in records:
            yield record, load_latent(out_dir, record)


def read_index(out_dir: str | Path):
    """``index.parquet`` of a finished run as a ``pyarrow.Table``."""
    import pyarrow.parquet as pq

    path = Path(out_dir) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (written when a cat-tokenize run finishes)")
    return pq.read_table(path)
