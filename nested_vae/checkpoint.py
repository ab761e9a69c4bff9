"""NestedVAE checkpoint files: where a name points, reading with strict checks, writing atomically.

A checkpoint is a folder with ``config.json`` (:class:`~nested_vae.config.NestedVAEConfig` plus
``_class_name``) and ``model.safetensors``. ``"default"`` is the one shipped in
``nested_vae/weights/default/``; an ``org/name`` that is not a local path is a Hugging Face Hub repo
(:mod:`cat_foundations.hub`). :class:`~nested_vae.model.NestedVAE` ``save_pretrained`` /
``from_pretrained`` are the public face of this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from cat_foundations import hub
from cat_foundations.atomic import atomic_write_bytes, atomic_write_text

from .config import NestedVAEConfig
from .outputs import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "default"


def checkpoint_directory(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder of ``"default"``, a directory, or a Hub repo id (fetched into the HF cache)."""
    if str(name_or_path) == "default":
        return DEFAULT_WEIGHTS_DIR
    if hub.is_hub_repo_id(name_or_path):
        return hub.download_files(
            str(name_or_path),
            [CONFIG_NAME, WEIGHTS_NAME],
            revision=revision,
            cache_dir=cache_dir,
            token=token,
        )
    return Path(name_or_path)


def read_config(directory: Path, name_or_path) -> tuple[NestedVAEConfig, Path, Path]:
    """``(config, config path, weights path)`` of a checkpoint folder.

    Raises:
        FileNotFoundError: a file is missing (named).
        CheckpointError: the config is not valid JSON (file and line) or not a valid config.
    """
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            hint = (
                " The shipped checkpoint is produced by `cat-train` (nested_vae.train); "
                "pass a directory from save_pretrained instead."
                if str(name_or_path) == "default"
                else ""
            )
            raise FileNotFoundError(f"NestedVAE checkpoint file not found: {path}.{hint}")
    try:
        config_data = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path}: line {error.lineno}: invalid JSON ({error.msg})") from error
    # Checkpoints saved before the pixel shortcut existed were trained without it, and those
    # saved before trunk_shortcuts could be switched off all had them.
    if isinstance(config_data, dict):
        config_data.setdefault("pixel_shortcut", False)
        config_data.setdefault("trunk_shortcuts", True)
    try:
        config = NestedVAEConfig.from_dict(config_data, source=str(config_path))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: {error}") from error
    return config, config_path, weights_path


def load_weights(model: torch.nn.Module, config_path: Path, weights_path: Path) -> None:
    """Load ``weights_path`` into ``model`` strictly.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped tensors, every one named.
    """
    state = load_file(str(weights_path), device="cpu")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        problems = [
            f"{label} {keys}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("mis-shaped tensors", mis_shaped),
            )
            if keys
        ]
        raise CheckpointError(
            f"{weights_path} does not match the config in {config_path}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def write_checkpoint(model: torch.nn.Module, directory: str | Path) -> Path:
    """``config.json`` then ``model.safetensors``, each atomically, into ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": type(model).__name__, **model.config.to_dict()}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_NAME, save_safetensors(state, metadata={"format": "pt"}))
    return directory
