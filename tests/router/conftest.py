"""Fixtures for router tests: a tiny random Llama (built once per session) and the real default model."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_scorer(tiny_llama_dir):
    from router.transformers_backend import TransformersScorer

    return TransformersScorer.from_pretrained(tiny_llama_dir, dtype=torch.float32, batch_size=4)


@pytest.fixture(scope="session")
def default_scorer():
    """The real default router model, loaded once; skips when its wheels are not installed."""
    from router import default_model

    if not default_model.parts_available() and not default_model.is_converted():
        pytest.skip(f"default router model not installed: {default_model.PIP_COMMAND}")
    from router import load_scorer

    # fp32 on every machine: the default dtype is bf16 where the CPU has it natively, and bf16
    # scores differ from fp32 by up to 0.3, enough to flip a comparison between close captions.
    return load_scorer("default", batch_size=8, dtype=torch.float32)
