"""Every training recipe in configs/ is a valid cat-train config (unknown keys and bad values fail),
and the files it names ship with the repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cat_foundations.atomic import iter_json_lines
from nested_vae.data import read_ratio_labels
from nested_vae.ratio_labels import QualityBar, labels_from_targets
from nested_vae.train import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in CONFIGS} >= {"cpu_stage1.yaml", "cpu_stage2.yaml", "gpu_stage1.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_recipe_loads_validates_and_names_files_that_ship(path):
    config = load_config(str(path))
    assert config.max_steps > config.start_step
    # The split and ratio labels are part of the recipe (in git); data.source and init_from may be
    # a run's outputs or the shared data, which are not.
    for name in (config.data.split_file, config.data.ratio_labels):
        if name is not None:
            assert (REPO_ROOT / name).is_file(), f"{path.name} names {name}, which is not in the repository"
    if config.ratio_sampling == "router":
        assert config.data.ratio_labels, f"{path.name}: ratio_sampling router needs data.ratio_labels"


def test_v3_recipes_use_the_smooth_shortcut_and_real_lpips():
    for name in ("cpu_stage1", "gpu_stage1"):
        config = load_config(str(REPO_ROOT / "configs" / "v3" / f"{name}.yaml"))
        assert config.model["pixel_shortcut"] == "smooth" and config.loss.perceptual == "lpips"


def test_shipped_ratio_labels_cover_exactly_the_training_split():
    """Routed training must not see held-out images: the labels name the 294 training images only."""
    config = load_config(str(REPO_ROOT / "configs" / "v3" / "cpu_stage2.yaml"))
    labels = read_ratio_labels(REPO_ROOT / config.data.ratio_labels)
    split = json.loads((REPO_ROOT / config.data.split_file).read_text())
    assert set(labels) == {Path(name).name for name in split["train"]}
    assert not set(labels) & {Path(name).name for name in split["heldout"]}
    # They are the shipped checkpoint's own oracle labels (what the recipe continues from): the cheapest
    # ratio meeting one LPIPS bar in its route_targets.json. The bar is the recipe's choice, so it is
    # recovered from the labels, not repeated here: if any bar gives these labels, so does the tightest
    # one, the largest LPIPS among images labelled coarser than 8x (plus the labels' rounding, 1e-5).
    records = [record for _, record in iter_json_lines(REPO_ROOT / config.data.ratio_labels)]
    tightest = max(record["lpips"][str(record["ratio"])] for record in records if record["ratio"] > 8)
    targets = REPO_ROOT / config.init_from / "route_targets.json"
    oracle = labels_from_targets(targets, QualityBar.parse(f"lpips<={tightest + 1e-5}"), subset="train")
    assert labels == {record["image"]: record["ratio"] for record in oracle}, (
        f"{config.data.ratio_labels} are not the oracle labels of {targets} at any LPIPS bar: regenerate them"
    )
    assert all(list(labels.values()).count(ratio) >= 30 for ratio in (8, 16, 32))
