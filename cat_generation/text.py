"""A caption embedding with no model: signed feature hashing of the caption's words.

Hand-written on purpose: the reference generator needs *some* caption vector to show the adaLN
caption path end to end on a CPU, offline, without loading a text encoder. Words (lower-cased,
letters and digits) are hashed with CRC-32 into ``dim`` buckets with a hash-chosen sign and the
vector is L2-normalised; an absent caption is the zero vector. Users with a real text encoder
(T5, CLIP, the router LLM's hidden states) pass their own ``(N, E)`` vectors as
``PackedBatch.caption_embeddings`` instead.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import torch

_WORD = re.compile(r"[a-z0-9]+")


def embed_captions(captions: Sequence[str | None], dim: int) -> torch.Tensor:
    """``(N, dim)`` float: one hashed bag-of-words vector per caption (zeros for None / empty)."""
    if dim < 1:
        raise ValueError(f"caption embedding dim must be >= 1, got {dim}")
    vectors = torch.zeros(len(captions), dim)
    for row, caption in enumerate(captions):
        for word in _WORD.findall((caption or "").lower()):
            code = zlib.crc32(word.encode("utf-8"))
            vectors[row, code % dim] += 1.0 if (code >> 31) & 1 else -1.0
    norms = vectors.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, vectors / norms.clamp_min(1e-12), vectors)
