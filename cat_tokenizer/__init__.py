"""cat-tokenizer: content-adaptive image tokenization (caption -> complexity -> 8x/16x/32x nested VAE)."""

__version__ = "0.1.0"
