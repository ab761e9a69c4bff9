"""The on-disk layout of a ``cat-tokenize`` output directory, written so a kill loses nothing.

```
OUT/
  shards/r00-00000.safetensors   latents of up to --shard-size images (rank 00, shard 0)
  manifest.jsonl                 one line per tokenized image (written at the end of a run)
  errors.jsonl                   one line per failed image / rejected captions line
  summary.json                   the end-of-run summary
  run.json                       how the run was made (VAE, router, policy), read by `decode`
```

**The shard is the unit of commit.** Each shard holds its images' latents (tensor key = image
id) *and* their manifest records (in the safetensors metadata), and is written to a temporary
file, fsynced and renamed into place (:func:`cat_foundations.atomic.atomic_write_bytes`). A killed run therefore leaves only
complete shards plus, at worst, a ``*.tmp`` file, which the next ``--resume`` deletes. The
manifest is rebuilt from the shards (:func:`read_shard_records`) when a run finishes, so it can
never disagree with them; ``--resume`` skips the ids the shards already hold and redoes the
rest (including whatever sat in the unfinished shard).

Under ``accelerate launch`` every rank writes its own shards (``r<rank>-*``) and its own
``errors.rank<rank>.jsonl`` part; rank 0 merges them after a barrier.

Fault injection (tests only): with ``CAT_TOKENIZER_KILL_AFTER_SHARDS=N`` in the environment, the
process SIGKILLs itself right after committing its N-th shard of the run, before any later write
(for ``--shards`` / ``--hf-dataset`` runs: its N-th input shard, :mod:`cat_tokenizer.shard_store`).
Crash tests use it to kill a run at a known point, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from cat_foundations.atomic import (  # noqa: F401  (re-exported: store.atomic_write_* is what the CLI uses)
    TMP_SUFFIX,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    write_jsonl,
)
from cat_tokenizer.encoded import Encoded
from cat_tokenizer.latent_stats import LatentStats

SHARD_FORMAT = "cat-tokenizer-shard-v1"
SHARD_DIR = "shards"
MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"
SUMMARY = "summary.json"
RUN_INFO = "run.json"
KILL_AFTER_SHARDS_ENV = "CAT_TOKENIZER_KILL_AFTER_SHARDS"
_SHARD_NAME = re.compile(r"^r(\d+)-(\d+)\.safetensors$")


def remove_temporary_files(out_dir: Path) -> list[Path]:
    """Delete ``*.tmp`` leftovers of a killed run (partial shards or manifests); return them."""
    leftovers = [p for p in Path(out_dir).rglob(f"*{TMP_SUFFIX}") if p.is_file()]
    for path in leftovers:
        path.unlink()
    return leftovers


def shard_paths(out_dir: Path) -> list[Path]:
    """Committed shard files, sorted by (rank, sequence number)."""
    directory = Path(out_dir) / SHARD_DIR
    if not directory.is_dir():
        return []
    found = [(m, p) for p in directory.iterdir() if (m := _SHARD_NAME.match(p.name))]
    return [p for m, p in sorted(found, key=lambda item: (int(item[0][1]), int(item[0][2])))]


def read_shard_stats(out_dir: Path) -> LatentStats:
    """The latent sums of every committed shard (:mod:`cat_tokenizer.latent_stats`), summed."""
    total = LatentStats()
    for path in shard_paths(out_dir):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        total = total.merge(LatentStats(json.loads(metadata.get("stats", "{}"))))
    return total


def read_shard_records(out_dir: Path) -> list[dict]:
    """Manifest records of every committed shard (reads only the safetensors headers)."""
    records = []
    for path in shard_paths(out_dir):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != SHARD_FORMAT:
            raise ValueError(f"{path}: not a cat-tokenizer shard (format {metadata.get('format')!r})")
        records.extend(json.loads(metadata["records"]))
    return records


def load_latent(out_dir: Path, record: dict) -> Encoded:
    """The :class:`Encoded` of one manifest record (its tensor read from its shard)."""
    with safe_open(str(Path(out_dir) / record["shard"]), framework="pt") as handle:
        latent = handle.get_tensor(record["key"])
    return Encoded.from_record(latent, record)


class ShardWriter:
    """Collects encoded images and commits them ``shard_size`` at a time as one atomic shard.

    Args:
        out_dir: the run's output directory.
        rank: this process's rank (part of the shard name, so ranks never collide).
        shard_size: images per shard; smaller shards lose less work to a kill.
    """

    def __init__(self, out_dir: Path, rank: int = 0, shard_size: int = 256):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.shard_size = shard_size
        (self.out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        own = [
            int(_SHARD_NAME.match(p.name)[2])
            for p in shard_paths(out_dir)
            if int(_SHARD_NAME.match(p.name)[1]) == rank
        ]
        self.next_sequence = max(own, default=-1) + 1
        self.pending: list[tuple[str, Encoded, dict]] = []
        self.shards_this_run = 0
        self.kill_after_shards = kill_after_shards()

    def add(self, image_id: str, encoded: Encoded, details: dict) -> None:
        """Queue one image; commits a shard when ``shard_size`` images are queued."""
        self.pending.append((image_id, encoded, details))
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Commit everything queued as one shard (no-op when nothing is queued)."""
        if not self.pending:
            return
        name = f"{SHARD_DIR}/r{self.rank:02d}-{self.next_sequence:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        records = []
        stats = LatentStats()
        for image_id, encoded, details in self.pending:
            tensors[image_id] = encoded.latent.detach().to("cpu", torch.float32).contiguous()
            stats.add(encoded.ratio, tensors[image_id])
            records.append({"id": image_id, **details, **encoded.record(), "shard": name, "key": image_id})
        metadata = {
            "format": SHARD_FORMAT,
            "records": json.dumps(records, ensure_ascii=False),
            "stats": json.dumps(stats.to_dict()),
        }
        atomic_write_bytes(self.out_dir / name, save(tensors, metadata))
        self.next_sequence += 1
        self.pending = []
        self.shards_this_run += 1
        die_if_fault_point(self.shards_this_run, self.kill_after_shards)


def die_if_fault_point(commits_this_run: int, kill_after: int | None) -> None:
    """SIGKILL this process when it has just made its ``kill_after``-th commit (the test hook)."""
    if commits_this_run == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_after_shards() -> int | None:
    """The fault-injection point from :data:`KILL_AFTER_SHARDS_ENV` (``None`` when unset)."""
    value = os.environ.get(KILL_AFTER_SHARDS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{KILL_AFTER_SHARDS_ENV} must be a positive integer, got {value!r}")
    return int(value)
