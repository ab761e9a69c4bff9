"""`Encoded`: one tokenized image (latent + why it got its ratio) and its safetensors form.

The latent is the VAE posterior **mean** (or a sample when asked), *unscaled*, shaped
``C x h x w`` with ``h = Hp / ratio`` and ``w = Wp / ratio`` where ``Hp x Wp`` is the encoded
image size reflect-padded up to a multiple of 32. ``tokens == h * w``.

Latent scaling for diffusion models: like Stable Diffusion's VAE, a downstream diffusion model
should see ``latent * scaling_factor`` (:meth:`Encoded.scaled_latent`), which has roughly unit
variance; divide by the same factor before decoding. ``scaling_factor`` is the VAE's
``config.scaling_factor`` and travels with every ``Encoded`` so a saved file is self-describing.

On disk (:meth:`Encoded.save`) an ``Encoded`` is one safetensors file with the tensor ``latent``
and the fields below as string metadata (safetensors metadata is ``str -> str``; numbers and
lists are JSON-encoded). The CLI's shards use the same per-image record (:meth:`Encoded.record`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from cat_foundations.atomic import atomic_write_bytes

FORMAT = "cat-tokenizer-encoded-v1"


@dataclass
class Encoded:
    """One image, tokenized.

    Args:
        latent: float tensor ``C x h x w`` (unscaled posterior mean, or a sample).
        ratio: spatial compression per side: 8, 16 or 32.
        score: the complexity score that chose the ratio (1..9), or None when the ratio was
            given by the user.
        score_source: what chose the ratio: ``"caption_llm"`` (the router LLM read the caption),
            ``"image_jpeg_bpp"`` (no caption: JPEG bits-per-pixel fallback) or ``"override"``
            (``ratio=`` given by the user).
        original_size: ``(height, width)`` of the image as loaded (EXIF orientation applied),
            before any ``max_side`` downscale.
        size: ``(height, width)`` that was encoded (after the ``max_side`` downscale); decoding
            returns an image of this size.
        padding: rows and columns the VAE reflect-padded at the bottom and right to reach a
            multiple of 32, as ``(bottom, right)``.
        scaling_factor: the VAE's latent scaling factor (see the module docstring).
        extra: free-form JSON-serialisable details (e.g. the router's perception flags).
    """

    latent: torch.Tensor
    ratio: int
    score: float | None
    score_source: str
    original_size: tuple[int, int]
    size: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    scaling_factor: float = 1.0
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Number of latent tokens (spatial positions): ``h * w``."""
        return int(self.latent.shape[-2] * self.latent.shape[-1])

    def scaled_latent(self) -> torch.Tensor:
        """``latent * scaling_factor``: what a downstream diffusion model should train on."""
        return self.latent * self.scaling_factor

    def record(self) -> dict:
        """Everything but the tensor, as a JSON-ready dict (one manifest line's worth)."""
        return {
            "ratio": self.ratio,
            "tokens": self.tokens,
            "score": self.score,
            "score_source": self.score_source,
            "original_size": list(self.original_size),
            "size": list(self.size),
            "padding": list(self.padding),
            "latent_shape": list(self.latent.shape),
            "scaling_factor": self.scaling_factor,
            "extra": self.extra,
        }

    @classmethod
    def from_record(cls, latent: torch.Tensor, record: dict) -> Encoded:
        """Inverse of :meth:`record` (the tensor comes separately)."""
        expected = record.get("latent_shape")
        if expected is not None and list(latent.shape) != list(expected):
            raise ValueError(f"latent shape {list(latent.shape)} does not match the record's {expected}")
        return cls(
            latent=latent,
            ratio=int(record["ratio"]),
            score=None if record.get("score") is None else float(record["score"]),
            score_source=str(record["score_source"]),
            original_size=tuple(int(v) for v in record["original_size"]),
            size=tuple(int(v) for v in record["size"]),
            padding=tuple(int(v) for v in record.get("padding", (0, 0))),
            scaling_factor=float(record.get("scaling_factor", 1.0)),
            extra=dict(record.get("extra") or {}),
        )

    def save(self, path: str | Path) -> None:
        """Write one safetensors file (tensor ``latent`` + metadata), atomically."""
        metadata = {"format": FORMAT, "record": json.dumps(self.record())}
        atomic_write_bytes(Path(path), save({"latent": self.latent.detach().cpu().contiguous()}, metadata))

    @classmethod
    def load(cls, path: str | Path) -> Encoded:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: the file is not an ``Encoded`` safetensors file.
        """
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise ValueError(
                        f"{path}: not a cat-tokenizer Encoded file (format {metadata.get('format')!r})"
                    )
                latent = handle.get_tensor("latent")
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
        return cls.from_record(latent, json.loads(metadata["record"]))
