"""cat-tokenizer: content-adaptive image tokenization (caption -> complexity -> 8x/16x/32x nested VAE).

```python
import cat_tokenizer
enc = cat_tokenizer.encode("photo.jpg", "a red apple on a white table")   # -> Encoded
img = cat_tokenizer.decode(enc)                                          # -> PIL.Image
```

The public names are imported on first use, so ``import cat_tokenizer`` (and the light
submodules ``images`` / ``captions``) stays cheap: torch, the VAE and the router load only when
``CATTokenizer``, ``Encoded``, ``encode`` or ``decode`` is touched.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CATTokenizer": "cat_tokenizer.tokenizer",
    "default_tokenizer": "cat_tokenizer.tokenizer",
    "encode": "cat_tokenizer.tokenizer",
    "decode": "cat_tokenizer.tokenizer",
    "Encoded": "cat_tokenizer.encoded",
    "read_records": "cat_tokenizer.readers",
    "load_latent": "cat_tokenizer.readers",
    "iter_encoded": "cat_tokenizer.readers",
    "read_index": "cat_tokenizer.readers",
}

__all__ = [
    "CATTokenizer",
    "Encoded",
    "decode",
    "default_tokenizer",
    "encode",
    "iter_encoded",
    "load_latent",
    "read_index",
    "read_records",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cat_tokenizer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
