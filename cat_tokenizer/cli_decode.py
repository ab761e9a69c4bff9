"""``cat-tokenize decode``: a cat-tokenize output folder back to PNG files."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cat_foundations.cli import EXIT_OK, EXIT_PARTIAL, FatalError
from cat_tokenizer import readers, store
from cat_tokenizer.cli_settings import DecodeSettings
from cat_tokenizer.cli_summary import log
from cat_tokenizer.cli_tokenize import prepare_out_dir
from cat_tokenizer.tokenizer import CATTokenizer
from nested_vae import NestedVAE


def _png_names(ids: list[str]) -> dict[str, str]:
    """Image id -> output PNG path: ``a/b.jpg`` -> ``a/b.png``, or ``a/b.jpg.png`` if that collides."""
    stems = Counter(str(Path(i).with_suffix(".png")) for i in ids)
    return {
        i: (str(Path(i).with_suffix(".png")) if stems[str(Path(i).with_suffix(".png"))] == 1 else i + ".png")
        for i in ids
    }


def run_decode(settings: DecodeSettings) -> int:
    """Decode every latent of ``settings.tokens`` to PNG; returns 0 (all done) or 2 (some failed)."""
    started = time.perf_counter()
    tokens_dir = settings.tokens
    if not tokens_dir.is_dir():
        raise FatalError(f"--tokens {tokens_dir} is not a folder")
    records = readers.read_records(tokens_dir)
    if not records:
        raise FatalError(f"{tokens_dir} holds no tokenized images (no manifest.jsonl, no shards)")
    run_info = tokens_dir / store.RUN_INFO
    vae_name = settings.vae or (json.loads(run_info.read_text())["vae"] if run_info.exists() else "default")
    prepare_out_dir(settings.out)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        vae = NestedVAE.from_pretrained(vae_name, device=device)
    except (OSError, ValueError) as error:
        raise FatalError(f"cannot load the VAE {vae_name!r}: {error}") from None
    tokenizer = CATTokenizer(vae, scorer=None)
    names = _png_names([r["id"] for r in records])
    errors = []
    with tqdm(
        total=len(records), unit="img", disable=settings.quiet, desc="decode", dynamic_ncols=True
    ) as bar:
        for start in range(0, len(records), settings.batch_size):
            chunk = records[start : start + settings.batch_size]
            loaded = []
            for record in chunk:
                try:
                    loaded.append((record, readers.load_latent(tokens_dir, record)))
                except Exception as error:
                    errors.append(
                        {"path": record["id"], "line": None, "reason": f"cannot read latent: {error}"}
                    )
            images = tokenizer.decode_batch([enc for _, enc in loaded], batch_size=settings.batch_size)
            for (record, _), image in zip(loaded, images):
                target = settings.out / names[record["id"]]
                target.parent.mkdir(parents=True, exist_ok=True)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                store.atomic_write_bytes(target, buffer.getvalue())
            bar.update(len(chunk))
    if errors:
        store.write_jsonl(settings.out / store.ERRORS, errors)
    wall = time.perf_counter() - started
    log(
        f"decoded {len(records) - len(errors)} image(s) to {settings.out}, failed {len(errors)}, {wall:.1f} s",
        settings.quiet,
    )
    return EXIT_PARTIAL if errors else EXIT_OK
