"""``index.parquet``: one row per tokenized image, for filtering and joining without opening a shard.

Columns: ``id``, ``key`` (the sample key inside its shard), ``source_shard`` (input shard name, or
null for folder runs), ``shard`` (output file, relative to OUT), ``ratio``, ``latent_shape``
(``[C, h, w]``), ``tokens``, ``height``/``width`` (encoded size), ``score`` and ``score_source``,
``caption``, and the provenance of the row: ``router_model``, ``router_prompt_version``,
``router_dtype``, ``router_head`` (the score-combination rule, JSON), ``vae`` and
``vae_weights_sha256``. Written with ``pyarrow`` through an atomic file write.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

from cat_foundations.atomic import atomic_write_bytes

INDEX = "index.parquet"
PROVENANCE_FIELDS = (
    "router_model",
    "router_prompt_version",
    "router_dtype",
    "router_head",
    "vae",
    "vae_weights_sha256",
)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(tokenizer, vae_name: str, router_used: bool) -> dict:
    """What made this process's rows: the router (when it routes) and the VAE weights."""
    from router import PROMPT_VERSION

    scorer = tokenizer.loaded_scorer if router_used else None
    rule = getattr(scorer, "rule", None)
    model = getattr(scorer, "inner", scorer)  # a score-cache wrapper holds the model scorer
    weights = getattr(tokenizer.vae, "weights_path", None)
    return {
        "router_model": tokenizer.router_name if router_used else None,
        "router_prompt_version": PROMPT_VERSION if router_used else None,
        "router_dtype": str(getattr(model, "dtype", None) or "") or None,
        "router_head": _head_name(scorer, rule),
        "vae": vae_name,
        "vae_weights_sha256": file_sha256(weights) if weights is not None else None,
    }


def _head_name(scorer, rule) -> str | None:
    """A fitted head's ``kind:digest``, else the combination rule's parameters as JSON."""
    head = getattr(scorer, "head", None)
    if head is not None:
        return f"{head.kind}:{head.digest}"
    return json.dumps(asdict(rule), sort_keys=True, default=str) if is_dataclass(rule) else None


def write_index(out_dir: Path, rows: list[tuple[dict, dict]]) -> None:
    """``rows``: ``(record, provenance)`` per image, in the order to write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "id": pa.string(),
        "key": pa.string(),
        "source_shard": pa.string(),
        "shard": pa.string(),
        "ratio": pa.int16(),
        "latent_shape": pa.list_(pa.int32()),
        "tokens": pa.int64(),
        "height": pa.int32(),
        "width": pa.int32(),
        "score": pa.float64(),
        "score_source": pa.string(),
        "caption": pa.string(),
        **{name: pa.string() for name in PROVENANCE_FIELDS},
    }
    data = {name: [] for name in columns}
    for record, origin in rows:
        values = {
            "id": record["id"],
            "key": record["key"],
            "source_shard": record.get("source_shard"),
            "shard": record["shard"],
            "ratio": record["ratio"],
            "latent_shape": record["latent_shape"],
            "tokens": record["tokens"],
            "height": record["size"][0],
            "width": record["size"][1],
            "score": record.get("score"),
            "score_source": record["score_source"],
            "caption": record.get("caption"),
            **{name: origin.get(name) for name in PROVENANCE_FIELDS},
        }
        for name, value in values.items():
            data[name].append(value)
    table = pa.table({name: pa.array(data[name], type=kind) for name, kind in columns.items()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(Path(out_dir) / INDEX, buffer.getvalue())
