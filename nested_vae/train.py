"""Train the nested VAE: ``cat-train [--config run.yaml] [--key=value ...]``.

Runs on one CPU process, one GPU, or many GPUs/nodes through ``accelerate launch`` (all the
distributed work is accelerate's). Every sample of a batch trains one ratio chosen by a
:class:`~nested_vae.ratio_sampler.RatioSampler`; the VAE and the PatchGAN discriminator have their
own optimizers, both passed through ``accelerator.prepare``.

Configuration is a :class:`TrainConfig` dataclass, optionally loaded from YAML, with CLI
overrides in nanoGPT style: ``--max_steps=100 --loss.disc_start=0.5 --data.source=path``.
Each run writes its resolved config to ``<output_dir>/config.yaml``.

Outputs under ``output_dir``: ``checkpoints/step-XXXXXXXX/`` (model, discriminator, both
optimizers, scheduler, EMA, RNG, step; written atomically), ``logs/`` (CSV or TensorBoard),
``images/`` (reconstruction grids per ratio) and ``export/`` (the EMA model via
``save_pretrained``, loadable with ``NestedVAE.from_pretrained``).

``cat-train export --checkpoint <dir> --out <dir> [--dtype float16] [--scaling-images captions.jsonl]``
exports a checkpoint's EMA weights (optionally setting ``scaling_factor`` = 1 / std of the
latents of the given images).
"""

from __future__ import annotations

import argparse
import sys

from cat_foundations.cli import run_cli

from .export import export_checkpoint, export_main, latent_scaling_factor
from .train_config import TrainConfig, config_to_dict, load_config
from .trainer import Trainer, build_vae, checkpoint_dirs

__all__ = [
    "TrainConfig",
    "Trainer",
    "build_vae",
    "checkpoint_dirs",
    "config_to_dict",
    "export_checkpoint",
    "latent_scaling_factor",
    "load_config",
    "main",
]


def main(argv: list[str] | None = None) -> int:
    """``cat-train``: exit codes and error lines follow :mod:`cat_foundations.cli` (0 done, 1 fatal)."""
    return run_cli(
        "cat-train",
        lambda: _main(argv),
        interrupted="interrupted (rerun with --resume=latest to continue from the last checkpoint)",
    )


def _main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    if argv and argv[0] == "ratio-labels":
        from . import ratio_labels  # imports the LPIPS loader: only for this subcommand

        ratio_labels.main(argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog="cat-train",
        description="Train the nested VAE. Overrides: --key=value, dotted for nested fields (--loss.disc_start=0.5).",
    )
    parser.add_argument("--config", help="YAML file with TrainConfig fields")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    Trainer(config).train()


if __name__ == "__main__":
    sys.exit(main())
