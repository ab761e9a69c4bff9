"""cat_generation: train generative models on CAT's variable-length latents.

The data API (what users' own trainers import) and a compact reference generator:

```python
from cat_generation import read_tokens, load_or_compute_stats, pack_latents, unpack
items = read_tokens("tokens/")                       # cat-tokenize output -> list[LatentItem]
stats = load_or_compute_stats("tokens/", items)      # per-ratio, per-channel mean/std
batch = pack_latents([stats.normalize(i.latent, i.ratio) for i in items[:8]],
                     [i.ratio for i in items[:8]], max_tokens=1024)
batch.attention_mask()                               # (S, 1, L, L) block-diagonal, for SDPA
latents = batch.latents()                            # each image back, (C, h, w)
```

Files: ``data.py`` (reader, labels), ``stats.py`` (latents_stats.json), ``packing.py``
(PackedBatch, pack/pad/unpack), ``batching.py`` (bucket and packed streams, collate),
``config.py`` / ``model.py`` / ``rope.py`` / ``head.py`` (the generator), ``flow.py`` and
``masked.py`` (the two objectives), ``generator.py`` (both on one backbone, checkpoint I/O),
``train.py`` (accelerate loop), ``sample.py`` (routing, generation, decoding), ``cli.py`` (cat-gen).
"""

from __future__ import annotations

from .batching import bucket_batches, collate, packed_batches
from .config import GeneratorConfig
from .data import LatentItem, assign_labels, read_tokens
from .generator import LatentGenerator
from .packing import PackedBatch, Placement, pack_latents, pad_latents, unpack
from .stats import LatentStats, RatioStats, compute_stats, load_or_compute_stats

__all__ = [
    "GeneratorConfig",
    "LatentGenerator",
    "LatentItem",
    "LatentStats",
    "PackedBatch",
    "Placement",
    "RatioStats",
    "assign_labels",
    "bucket_batches",
    "collate",
    "compute_stats",
    "load_or_compute_stats",
    "pack_latents",
    "packed_batches",
    "pad_latents",
    "read_tokens",
    "unpack",
]
