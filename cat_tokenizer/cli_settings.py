"""Typed settings of ``cat-tokenize`` and ``cat-tokenize decode``: what the parser hands on.

The argparse ``Namespace`` stops at :mod:`cat_tokenizer.cli_args`; everything after the parser
works with these frozen dataclasses (``dataclasses.replace`` makes a changed copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cat_foundations.ratios import tokens_for
from cat_tokenizer.quality import QualityTarget


@dataclass(frozen=True)
class TokenBudget:
    """``--target-mean-tokens``: a mean number of tokens, or "as many as fixed ``like_ratio``x".

    Either way the budget is counted at the sizes actually encoded (after ``--max-side``, padded
    to a multiple of 32), the way ``summary.json`` counts ``mean_tokens``.
    """

    tokens: float | None = None
    like_ratio: int | None = None

    def mean_tokens(self, sizes: Sequence[tuple[int, int]]) -> float:
        """The budget for images of ``sizes`` ``(H, W)``."""
        if self.like_ratio is None:
            return float(self.tokens)
        return sum(tokens_for(self.like_ratio, size) for size in sizes) / len(sizes)

    def __str__(self) -> str:
        return f"{self.like_ratio}x" if self.like_ratio is not None else f"{self.tokens:g}"


@dataclass(frozen=True)
class TokenizeSettings:
    """One ``cat-tokenize`` run (see ``cat-tokenize --help`` for each field).

    Exactly one input: ``images`` (a folder, with ``captions``), ``shards`` (a brace pattern of
    webdataset tars) or ``hf_dataset`` (with ``split``, ``image_column``, ``caption_column``,
    ``streaming``).
    """

    out: Path
    images: Path | None = None
    captions: Path | None = None
    shards: str | None = None
    hf_dataset: str | None = None
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "caption"
    streaming: bool = False
    format: str = "safetensors"  # output of sharded input: safetensors | webdataset
    ratio: int | None = None  # None: the router decides ("auto")
    target_mean_tokens: TokenBudget | None = None
    quality: QualityTarget | None = None  # measured routing: the fewest tokens that meet it
    batch_size: int = 8
    shard_size: int = 256
    device: str | None = None
    dtype: torch.dtype | None = None
    vae: str = "default"
    router_model: str = "default"
    router_backend: str = "transformers"
    router_dtype: torch.dtype | None = None  # None: the router's default (float32 on CPUs)
    router_head: str = "auto"  # auto | none | a head directory (cat_tokenizer.router_heads)
    score_cache: Path | None = None
    policy: Path | None = None
    max_side: int = 2048
    tiling: bool = False
    require_captions: bool = False
    resume: bool = False
    quiet: bool = False

    @property
    def uses_router(self) -> bool:
        """Whether the router LLM picks the ratios (not ``--ratio N``, not ``--quality``)."""
        return self.ratio is None and self.quality is None

    @property
    def sharded(self) -> bool:
        """Whether the input comes in shards (one output shard per input shard)."""
        return self.shards is not None or self.hf_dataset is not None


@dataclass(frozen=True)
class DecodeSettings:
    """One ``cat-tokenize decode`` run."""

    tokens: Path
    out: Path
    vae: str | None = None
    batch_size: int = 8
    device: str | None = None
    quiet: bool = False
