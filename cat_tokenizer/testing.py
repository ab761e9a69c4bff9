"""Test and benchmark helpers: a tiny random NestedVAE saved to disk in well under a second, and
webdataset tar shards of noise images.

The model is untrained (reconstructions are noise) but it is the real NestedVAE code path:
same config class, ``save_pretrained``/``from_pretrained``, padding, every ratio.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nested_vae import NestedVAE, NestedVAEConfig

TINY_VAE_CONFIG = {
    "base_channels": 8,
    "channel_multipliers": (1, 1, 2, 2, 2),
    "latent_channels": 4,
    "norm_num_groups": 4,
    "attention_ratios": (),
}


def build_tiny_vae(directory: str | Path, seed: int = 0) -> Path:
    """Save a ~0.1 M-parameter random NestedVAE (latent_channels 4) to ``directory``; return it."""
    torch.manual_seed(seed)
    NestedVAE(NestedVAEConfig(**TINY_VAE_CONFIG)).save_pretrained(directory)
    return Path(directory)


def png_bytes(seed: int, size: int = 32) -> bytes:
    """A ``size`` x ``size`` RGB noise PNG (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar_shards(directory: str | Path, shards: int, per_shard: int, size: int = 32) -> list[str]:
    """``shards`` webdataset tars ``00000.tar``... of ``per_shard`` noise samples, img2dataset-style.

    Each sample is ``KEY.png`` plus its caption as ``KEY.json`` (``{"caption": ...}``, even indices)
    or ``KEY.txt`` (odd). Keys are the shard number and the index (``000030004``). Returns every
    sample id as ``cat-tokenize`` names it (``shard/key``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = []
    for shard in range(shards):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                caption = f"noise sample {shard}-{index}"
                if index % 2:
                    text = (f"{key}.txt", caption.encode())
                else:
                    text = (f"{key}.json", json.dumps({"caption": caption, "width": size}).encode())
                for name, data in ((f"{key}.png", png_bytes(shard * 1000 + index, size)), text):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                ids.append(f"{shard:05d}/{key}")
    return ids
