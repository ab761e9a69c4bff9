"""Output shards of a sharded-input run (``--shards`` / ``--hf-dataset``): one per input shard.

```
OUT/shards/<name>.safetensors   --format safetensors: tensor per sample key + the records (metadata)
OUT/shards/<name>.tar           --format webdataset: <key>.latent.safetensors + <key>.json per sample
OUT/shards/<name>.meta.json     the commit marker: records, error records, latent sums, provenance
```

``<name>`` is the input shard's name (``00003`` for ``in/00003.tar``) and the sample keys are the
input's, so a rerun maps every input shard onto the same files. **An input shard is the unit of
commit:** its data file is written atomically (:func:`cat_foundations.atomic.atomic_write_bytes`),
then its ``.meta.json``; an input shard counts as done only when both exist. A kill leaves at
worst a data file without its marker or a ``*.tmp`` file: ``--resume`` redoes that input shard
whole and overwrites both. The webdataset tar is what streaming trainers read directly
(``webdataset.WebDataset(...)`` gives ``latent.safetensors`` and ``json`` per sample); its
``latent.safetensors`` holds one tensor ``latent`` and ``json`` the record (ratio, size, padding,
scaling factor, ...), so :meth:`~cat_tokenizer.encoded.Encoded.from_record` rebuilds it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from safetensors.torch import save

from cat_foundations.atomic import atomic_write_bytes, atomic_write_json
from cat_tokenizer.encoded import Encoded
from cat_tokenizer.latent_stats import LatentStats
from cat_tokenizer.sources import require_webdataset
from cat_tokenizer.store import SHARD_DIR, SHARD_FORMAT

META_SUFFIX = ".meta.json"
META_FORMAT = "cat-tokenizer-input-shard-v1"
FORMATS = {"safetensors": ".safetensors", "webdataset": ".tar"}
TAR_LATENT = "latent.safetensors"


def data_name(name: str, fmt: str) -> str:
    """The data file of input shard ``name``, relative to OUT (what records name as ``shard``)."""
    return f"{SHARD_DIR}/{name}{FORMATS[fmt]}"


def meta_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / SHARD_DIR / f"{name}{META_SUFFIX}"


def committed(out_dir: Path) -> dict[str, dict]:
    """Input shard name -> its meta, for every input shard whose data file and marker both exist."""
    directory = Path(out_dir) / SHARD_DIR
    if not directory.is_dir():
        return {}
    done = {}
    for path in sorted(directory.glob(f"*{META_SUFFIX}")):
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"{path}: not a cat-tokenizer shard marker (format {meta.get('format')!r})")
        if (Path(out_dir) / meta["output"]).is_file():
            done[meta["name"]] = meta
    return done


def _tar_bytes(entries: list[tuple[dict, torch.Tensor]]) -> bytes:
    wds = require_webdataset()
    buffer = io.BytesIO()
    # mtime fixed so a rerun writes the same bytes (idempotent outputs).
    with wds.TarWriter(buffer, encoder=False, mtime=0) as writer:
        for record, latent in entries:
            writer.write(
                {
                    "__key__": record["key"],
                    TAR_LATENT: save({"latent": latent}),
                    "json": json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                }
            )
    return buffer.getvalue()


def write_output_shard(
    out_dir: Path,
    name: str,
    fmt: str,
    encoded: list[tuple[str, Encoded, dict]],
    errors: list[dict],
    info: dict,
) -> dict:
    """Commit input shard ``name``: data file, then marker (see the module docstring); returns the meta.

    Args:
        encoded: ``(sample key, Encoded, details)`` in input order; ``details`` must hold ``path`` (the id).
        errors: the shard's error records.
        info: ``source`` (the input URL or dataset), ``provenance`` (router/VAE), skipped keys.
    """
    output = data_name(name, fmt)
    stats = LatentStats()
    entries = []
    for key, result, details in encoded:
        record = {"id": details["path"], **details, **result.record(), "shard": output, "key": key}
        entries.append((record, result.latent.detach().to("cpu", torch.float32).contiguous()))
        stats.add(result.ratio, entries[-1][1])
    records = [record for record, _ in entries]
    if fmt == "safetensors":
        metadata = {"format": SHARD_FORMAT, "records": json.dumps(records, ensure_ascii=False)}
        data = save({record["key"]: latent for record, latent in entries}, metadata)
    else:
        data = _tar_bytes(entries)
    (Path(out_dir) / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(out_dir) / output, data)
    meta = {
        "format": META_FORMAT,
        "name": name,
        "output": output,
        "records": records,
        "errors": errors,
        "stats": stats.to_dict(),
        **info,
    }
    atomic_write_json(meta_path(out_dir, name), meta, indent=None)
    return meta
