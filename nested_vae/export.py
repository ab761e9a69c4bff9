"""Export a training checkpoint's EMA weights with ``save_pretrained`` (``cat-train export``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from cat_foundations.images import center_crop_resize, load_image, pil_to_tensor

from .data import DataConfig, load_training_dataset
from .model import RATIOS, NestedVAE
from .train_config import load_config
from .trainer import EMA_WEIGHTS_NAME, build_vae

logger = logging.getLogger(__name__)


@torch.no_grad()
def latent_scaling_factor(
    vae: NestedVAE, images: list[torch.Tensor], ratios: tuple[int, ...] = RATIOS
) -> float:
    """1 / std of the posterior means of ``images`` over all ratios (the SD-style latent scale)."""
    values = []
    for image in images:
        for ratio in ratios:
            values.append(vae.encode(image.unsqueeze(0), ratio).latent_dist.mean.flatten().float())
    return float(1.0 / torch.cat(values).std())


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str = "float16",
    scaling_images: list[torch.Tensor] | None = None,
    weights: str = "ema",
) -> Path:
    """Export the EMA (or raw) weights of a training checkpoint with ``save_pretrained``.

    Reads the run's ``config.yaml`` (two levels up from the checkpoint) for the model config,
    and the checkpoint's ``ema.safetensors`` (its raw ``model.safetensors`` when the run kept no
    EMA, said in the log, or when ``weights="raw"``: in a run much shorter than the EMA's
    horizon, the average still holds a large share of the early weights).
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    checkpoint = Path(checkpoint)
    run_config = load_config(str(checkpoint.parent.parent / "config.yaml"))
    vae = build_vae(run_config)
    ema_file = checkpoint / EMA_WEIGHTS_NAME
    if weights == "ema" and ema_file.is_file():
        state = load_file(str(ema_file))
    else:
        if weights == "ema":
            logger.warning("%s has no %s: exporting the raw (non-EMA) weights", checkpoint, EMA_WEIGHTS_NAME)
        state = load_file(str(checkpoint / "model.safetensors"))
    vae.load_state_dict(state)
    vae.eval()
    if scaling_images:
        vae.config.scaling_factor = latent_scaling_factor(vae, scaling_images)
    return vae.to(getattr(torch, dtype)).save_pretrained(out)


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="cat-train export", description=export_checkpoint.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/step-N directory")
    parser.add_argument("--out", required=True, help="output directory for config.json + model.safetensors")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument(
        "--weights",
        default="ema",
        choices=["ema", "raw"],
        help="the EMA average (default) or the raw weights",
    )
    parser.add_argument(
        "--scaling-images", help="captions.jsonl / image folder whose latents set scaling_factor"
    )
    parser.add_argument("--split-file", help="JSON split file restricting --scaling-images")
    parser.add_argument("--subset", default="heldout")
    parser.add_argument("--size", type=int, default=256, help="center-crop size of the scaling images")
    args = parser.parse_args(argv)
    images = None
    if args.scaling_images:
        dataset = load_training_dataset(
            DataConfig(source=args.scaling_images, split_file=args.split_file, subset=args.subset)
        )
        images = [pil_to_tensor(center_crop_resize(load_image(row["image"]), args.size)) for row in dataset]
    path = export_checkpoint(args.checkpoint, args.out, args.dtype, images, args.weights)
    print(f"exported to {path}")
