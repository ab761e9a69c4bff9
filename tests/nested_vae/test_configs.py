"""Every training recipe in configs/ is a valid cat-train config (unknown keys and bad values fail)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nested_vae.train import load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads_and_validates(path):
    config = load_config(str(path))
    assert config.max_steps > config.start_step


def test_v3_recipes_use_the_smooth_shortcut_and_real_lpips():
    for name in ("cpu_stage1", "gpu_stage1"):
        config = load_config(str(CONFIG_DIR / "v3" / f"{name}.yaml"))
        assert config.model["pixel_shortcut"] == "smooth" and config.loss.perceptual == "lpips"
