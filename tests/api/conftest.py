"""Tiny real models for the API tests: a random NestedVAE and a random Llama router (both built here)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer(tiny_vae_dir, tiny_llama_dir):
    from cat_tokenizer import CATTokenizer

    return CATTokenizer.from_pretrained(vae=tiny_vae_dir, router=str(tiny_llama_dir), device="cpu")
