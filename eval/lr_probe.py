"""Probe: can a new nested VAE fit ONE fixed batch, and at which learning rates?

    python -m eval.lr_probe                                   # 1e-3 3e-4 1e-4 3e-5, 60 steps, 8x
    python -m eval.lr_probe --lrs 1e-4 5e-5 --steps 100 --ratio 16

A fresh default :class:`~nested_vae.NestedVAE` (seed 0) trains on the same batch of centre crops
of devset training images for ``--steps`` AdamW steps (the recipe's betas, bf16 autocast where
the CPU has native bf16) with an L1 loss at one ratio, once per learning rate. The table gives
the batch's PSNR at the start (the pixel shortcut's thumbnail: the learned parts start at zero)
and at the end. A rate at which the model cannot improve on a batch it sees every step cannot
train it on a dataset either: this is the check that found recipe v3's learning rate too high
(see ``nested_vae/weights/default/MODEL_CARD.md``). It measures optimisation, not generalisation.
Writes ``eval/results/lr_probe.json``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from cat_foundations.atomic import atomic_write_json
from cat_foundations.hardware import cpu_has_native_bf16
from cat_foundations.images import center_crop_resize, load_image, pil_to_tensor
from cat_foundations.ratios import RATIOS
from nested_vae import NestedVAE
from nested_vae.data import DataConfig, load_training_dataset

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lr_probe.json"
DEFAULT_DEVSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "devset" / "captions.jsonl"
DEFAULT_SPLIT = Path(__file__).resolve().parents[1] / "nested_vae" / "weights" / "default" / "split.json"


def fixed_batch(captions: Path, split_file: Path | None, count: int, size: int) -> torch.Tensor:
    """``count`` centre crops of training images, evenly spaced over the split (domains mix)."""
    dataset = load_training_dataset(
        DataConfig(source=str(captions), split_file=str(split_file) if split_file else None, subset="train")
    )
    step = max(len(dataset) // count, 1)
    rows = [dataset[i] for i in range(0, step * count, step)][:count]
    return torch.stack([pil_to_tensor(center_crop_resize(load_image(row["image"]), size)) for row in rows])


def batch_psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    error = (reconstruction.float().clamp(-1, 1) - images).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(4.0 / error)).mean())


def fit_one_batch(images: torch.Tensor, ratio: int, lr: float, steps: int, bf16: bool, seed: int = 0) -> dict:
    """Train a fresh model on ``images`` for ``steps`` steps; PSNR before and after, seconds."""
    torch.manual_seed(seed)
    vae = NestedVAE()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99))
    with torch.no_grad():
        start = batch_psnr(vae(images, ratio).sample, images)
    started = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            reconstruction = vae(images, ratio).sample
        loss = (reconstruction.float() - images).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        end = batch_psnr(vae(images, ratio).sample, images)
    return {"lr": lr, "psnr_start": start, "psnr_end": end, "gain_db": end - start, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.lr_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4, 3e-5])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ratio", type=int, choices=RATIOS, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--captions", type=Path, default=DEFAULT_DEVSET)
    parser.add_argument("--split-file", type=Path, default=DEFAULT_SPLIT)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = cpu_has_native_bf16()  # emulated bf16 would only be slower
    images = fixed_batch(args.captions, args.split_file, args.batch, args.size)
    rows = [fit_one_batch(images, args.ratio, lr, args.steps, bf16) for lr in args.lrs]
    print(f"one fixed batch of {args.batch} x {args.size}^2, ratio {args.ratio}x, {args.steps} steps, L1")
    print(f"{'lr':>8} {'PSNR start':>11} {'PSNR end':>9} {'gain dB':>8} {'s/step':>7}")
    for row in rows:
        print(
            f"{row['lr']:>8.0e} {row['psnr_start']:>11.2f} {row['psnr_end']:>9.2f} "
            f"{row['gain_db']:>+8.2f} {row['seconds'] / args.steps:>7.2f}"
        )
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "captions", "split_file")}
    result = {
        "settings": settings,
        "bf16_autocast": bf16,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
