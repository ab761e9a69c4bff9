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
import copy
import csv
import dataclasses
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import set_seed
from PIL import Image
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from cat_foundations.cli import run_cli
from cat_foundations.images import tensor_to_pil

from .data import DataConfig, build_dataset
from .losses import LossConfig, RatioGroup, VAELoss, resolve_disc_start
from .model import PAD_MULTIPLE, RATIOS, NestedVAE, NestedVAEConfig
from .ratio_sampler import RatioSampler

CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainConfig:
    """Everything a training run needs.

    Args:
        output_dir: run directory (checkpoints, logs, images, export, resolved config).
        seed: seed of every random choice (crops, ratios, posterior noise, initialisation).
        model: :class:`NestedVAEConfig` fields of a new model (with ``init_from``: shape-preserving
            overrides of the loaded model's config, see :func:`build_vae`).
        init_from: start from ``NestedVAE.from_pretrained(init_from)`` instead of a new model.
        data: the :class:`DataConfig`.
        loss: the :class:`LossConfig`.
        ratio_sampling: ``"router"`` (dataset labels), ``"uniform"`` or ``"all"``.
        ratio_resolution: crop side per ratio, e.g. ``{8: 128, 16: 256, 32: 256}``: the deep exits
            need larger crops to see context (the 32x latent of a 128^2 crop is only 4x4) while
            8x learns well, and 4x cheaper, from small ones. The loader crops at
            ``data.resolution`` (at least every side given here); each ratio's samples are then
            randomly cropped to their side and run through the VAE as one group. Ratios not named
            use ``data.resolution``. Not combinable with the GAN phase (the discriminator scores all
            ratios in one batch of one size). ``None``: every ratio at ``data.resolution``.
        start_step: continue a schedule from exported weights: with ``init_from`` set to the
            weights a run of ``max_steps`` exported at step ``start_step``, training resumes at
            that step of the LR schedule and of the GAN's delayed start, so a long run can be
            extended over several sessions without the optimizer state (which a checkpoint
            directory holds, at 4x the size of the weights). 0: a new schedule.
        batch_size: images per process per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_steps: optimizer steps of the run.
        learning_rate: VAE learning rate (Adam).
        disc_learning_rate_scale: discriminator LR = ``learning_rate * this`` (< 1 is a GAN guard).
        adam_betas: Adam betas of both optimizers (taming/LDM use (0.5, 0.9)).
        weight_decay: AdamW weight decay.
        lr_scheduler: a ``transformers.get_scheduler`` name for the VAE optimizer.
        lr_warmup_steps: warm-up steps of the scheduler.
        max_grad_norm: gradient clipping of both models (0: off).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (accelerate's autocast/GradScaler).
        ema: keep an exponential moving average of the VAE weights (exported instead of the raw weights).
        ema_decay: EMA decay per optimizer step.
        checkpoint_every: save a checkpoint every this many steps (and always at the end).
        checkpoints_to_keep: how many of the newest checkpoints to keep.
        log_every: log scalars every this many steps.
        image_every: write reconstruction grids every this many steps (0: only at the end).
        num_grid_images: images per reconstruction grid.
        tracker: ``"csv"``, ``"tensorboard"`` or ``"none"``.
        resume: checkpoint directory to continue from, or ``"latest"`` (newest in ``output_dir``).
        export_dir: where to ``save_pretrained`` the final model (default ``<output_dir>/export``).
        export_dtype: dtype of the exported weights (``"float32"`` or ``"float16"``).
        cpu_threads: ``torch.set_num_threads`` for CPU runs (``None``: torch's default).
        channels_last: keep the VAE's weights and inputs in channels-last memory format (NHWC),
            which oneDNN's CPU convolutions and GPU tensor cores prefer; see eval/bench_train.py
            for what it buys on a given machine.
        time_limit_minutes: stop early (checkpoint + export as at the end) once the run has
            trained this long; for wall-clock-limited jobs. ``None``: no limit.
    """

    output_dir: str = "runs/nested_vae"
    seed: int = 0
    model: dict = field(default_factory=dict)
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ratio_sampling: str = "uniform"
    ratio_resolution: dict | None = None
    start_step: int = 0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-4
    disc_learning_rate_scale: float = 1.0
    adam_betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 100
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    ema: bool = True
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    checkpoints_to_keep: int = 2
    log_every: int = 10
    image_every: int = 250
    num_grid_images: int = 4
    tracker: str = "csv"
    resume: str | None = None
    export_dir: str | None = None
    export_dtype: str = "float32"
    cpu_threads: int | None = None
    channels_last: bool = False
    time_limit_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.ratio_resolution:
            self.ratio_resolution = {int(r): int(side) for r, side in self.ratio_resolution.items()}
            for ratio, side in self.ratio_resolution.items():
                if ratio not in RATIOS:
                    raise ValueError(f"ratio_resolution: {ratio} is not a supported ratio {RATIOS}")
                if side % PAD_MULTIPLE or not 0 < side <= self.data.resolution:
                    raise ValueError(
                        f"ratio_resolution[{ratio}] = {side} must be a multiple of {PAD_MULTIPLE} and at "
                        f"most data.resolution ({self.data.resolution}): the loader crops at "
                        "data.resolution, each ratio's crop is cut from that"
                    )
            if resolve_disc_start(self.loss.disc_start, self.max_steps) < self.max_steps:
                raise ValueError(
                    "ratio_resolution cannot be combined with the GAN phase (loss.disc_start < max_steps): "
                    "the discriminator scores every ratio in one batch of one size. Train the GAN phase "
                    "as its own stage at one data.resolution (init_from the exported weights)."
                )
        if not 0 <= self.start_step < self.max_steps:
            raise ValueError(f"start_step={self.start_step} must be in [0, max_steps={self.max_steps})")
        if self.start_step and not self.init_from:
            raise ValueError(
                "start_step continues a schedule from exported weights: set init_from to them "
                "(or use resume=<checkpoint> to continue from a full checkpoint)"
            )


# --------------------------------------------------------------------------------------------
# Config: dataclass <- YAML <- CLI overrides
# --------------------------------------------------------------------------------------------


def _from_dict(cls, data: dict, where: str):
    """Build a (nested) config dataclass, naming any unknown key and where it came from."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
        kind = fields[key].type
        nested = {"DataConfig": DataConfig, "LossConfig": LossConfig}.get(
            kind if isinstance(kind, str) else ""
        )
        if nested is not None:
            value = _from_dict(nested, value, f"{where}.{key}")
        elif key == "adam_betas":
            value = tuple(float(v) for v in value)
        elif key == "mixed_precision" and value is False:
            value = "no"  # YAML reads a bare `no` as False
        else:
            value = _coerce(value, kind, f"{where}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Numbers YAML reads as strings (``2e-6``: YAML 1.1 wants ``2.0e-6``) become the field's type."""
    base = str(kind).replace(" | None", "")
    if value is None or base not in ("float", "int") or not isinstance(value, (str, int, float)):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if base == "int":
        if number != int(number):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    return number


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def config_to_dict(config: TrainConfig) -> dict:
    data = dataclasses.asdict(config)
    data["adam_betas"] = list(config.adam_betas)
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then ``--key=value`` overrides (values parsed as YAML)."""
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{path}{line}: invalid YAML ({getattr(error, 'problem', error)})") from error
    merged = config_to_dict(_from_dict(TrainConfig, data, path or "config"))
    for item in overrides or []:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"override {item!r} must look like --key=value (e.g. --loss.disc_start=0.5)")
        key, raw = item[2:].split("=", 1)
        _set_dotted(merged, key, yaml.safe_load(raw))
    return _from_dict(TrainConfig, merged, "config + overrides")


# --------------------------------------------------------------------------------------------
# CSV tracker (accelerate's GeneralTracker extension point; accelerate ships no CSV tracker)
# --------------------------------------------------------------------------------------------


class CSVTracker(GeneralTracker):
    """Long-format ``step,name,value`` CSV, so metrics that start late (the GAN) need no schema."""

    name = "csv"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "metrics.csv"
        self._handle = None  # opened on first use, on the main process only
        self._writer = None

    def _open(self):
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            self._handle = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in finish()
            self._writer = csv.writer(self._handle)
            if new:
                self._writer.writerow(["step", "name", "value"])
        return self._writer

    @property
    def tracker(self):
        return self._writer

    @on_main_process
    def store_init_configuration(self, values: dict):
        self._open()
        (self.path.parent / "hparams.json").write_text(
            json.dumps(values, indent=2, default=str), encoding="utf-8"
        )

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        writer = self._open()
        for name, value in values.items():
            writer.writerow([step, name, value])
        self._handle.flush()

    @on_main_process
    def finish(self):
        if self._handle is not None:
            self._handle.close()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def build_vae(config: TrainConfig) -> NestedVAE:
    """The model a run starts from: a new one from ``config.model``, or ``init_from`` weights.

    With ``init_from``, ``config.model`` may still override fields that keep every parameter's
    shape (e.g. ``norm_num_groups``: GroupNorm weights are per channel whatever the grouping), so
    a trained model can be fine-tuned with a changed architecture setting; a field that changes a
    shape fails in ``load_state_dict`` with the keys named.
    """
    if not config.init_from:
        return NestedVAE(NestedVAEConfig.from_dict(config.model, source="model"))
    pretrained = NestedVAE.from_pretrained(config.init_from)
    if not config.model:
        return pretrained
    merged = {**pretrained.config.to_dict(), **config.model}
    vae = NestedVAE(NestedVAEConfig.from_dict(merged, source=f"{config.init_from} + model overrides"))
    vae.load_state_dict(pretrained.state_dict())
    return vae


def _set_requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def _step_generator(seed: int, step: int, process: int, device: torch.device) -> torch.Generator:
    """Posterior-noise generator of one micro-step: a resumed run draws the same noise."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step * 131 + process) & 0x7FFF_FFFF)


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (``.tmp`` leftovers of a crash are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[5:].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def random_square_crops(images: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``side`` x ``side`` crop of each image of ``(N, C, H, W)`` (offsets from ``generator``)."""
    height, width = images.shape[-2:]
    if side >= height and side >= width:
        return images
    tops = torch.randint(height - side + 1, (len(images),), generator=generator, device=generator.device)
    lefts = torch.randint(width - side + 1, (len(images),), generator=generator, device=generator.device)
    tops, lefts = tops.tolist(), lefts.tolist()
    return torch.stack(
        [image[:, top : top + side, left : left + side] for image, top, left in zip(images, tops, lefts)]
    )


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Stack image rows (each ``(N, 3, H, W)`` in [-1, 1]) into one PNG."""
    count, _, height, width = rows[0].shape
    canvas = Image.new("RGB", (count * width, len(rows) * height), "white")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            canvas.paste(tensor_to_pil(image), (c * width, r * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


class _TrainerState:
    """Step counters and LeCam anchors, checkpointed with accelerate's custom-object mechanism."""

    def __init__(self, loss: VAELoss):
        self.loss = loss
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.skipped_steps = 0

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "skipped_steps": self.skipped_steps,
            "lecam_ema_real": self.loss.lecam_ema_real.detach().cpu(),
            "lecam_ema_fake": self.loss.lecam_ema_fake.detach().cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batches_in_epoch, self.skipped_steps = (
            int(state["batches_in_epoch"]),
            int(state["skipped_steps"]),
        )
        self.loss.lecam_ema_real.copy_(state["lecam_ema_real"])
        self.loss.lecam_ema_fake.copy_(state["lecam_ema_fake"])


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Owns the accelerator, the models, the optimizers and the loop.

    Args:
        config: the resolved :class:`TrainConfig`.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=self._tracker(),
            project_dir=str(self.output_dir),
            # A batch may route no sample through the 32x layers: DDP must tolerate unused weights.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        set_seed(config.seed)
        self.device = self.accelerator.device

        vae = build_vae(config)
        vae.train()
        if config.channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        self.loss = VAELoss(config.loss, total_steps=config.max_steps).to(self.device)
        disc = self._build_discriminator()
        opt_g = torch.optim.AdamW(
            vae.parameters(),
            lr=config.learning_rate,
            betas=config.adam_betas,
            weight_decay=config.weight_decay,
        )
        opt_d = torch.optim.AdamW(
            disc.parameters(),
            lr=config.learning_rate * config.disc_learning_rate_scale,
            betas=config.adam_betas,
            weight_decay=config.weight_decay,
        )
        from transformers import get_scheduler  # heavy import, only needed here

        scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=opt_g,
            num_warmup_steps=config.lr_warmup_steps * self.accelerator.num_processes,
            num_training_steps=config.max_steps * self.accelerator.num_processes,
        )
        self.dataset = build_dataset(config.data, seed=config.seed)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=config.batch_size,
            shuffle=False,  # CropDataset shuffles per epoch itself (reproducible for --resume)
            drop_last=True,
            num_workers=config.data.num_workers,
        )
        self.vae, self.disc, self.opt_g, self.opt_d, self.scheduler, self.loader = self.accelerator.prepare(
            vae, disc, opt_g, opt_d, scheduler, loader
        )
        self.ema = None
        if config.ema:
            self.ema = AveragedModel(
                self.accelerator.unwrap_model(self.vae),
                multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay),
                use_buffers=True,
            )
            self.accelerator.register_for_checkpointing(self.ema)
        self.state = _TrainerState(self.loss)
        self.accelerator.register_for_checkpointing(self.state)
        self._continue_schedule(config.start_step)
        self.sampler = RatioSampler(
            config.ratio_sampling, RATIOS, seed=config.seed, process_index=self.accelerator.process_index
        )
        self.grid_images: torch.Tensor | None = None

    def _continue_schedule(self, start_step: int) -> None:
        """Start the step counter and the LR schedule at ``start_step`` (see ``TrainConfig.start_step``)."""
        self.state.step = start_step
        with warnings.catch_warnings():
            # torch warns that the scheduler steps before the optimizer: here that is the point.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for _ in range(start_step):  # accelerate's wrapper steps once per process itself
                self.scheduler.step()

    def _tracker(self):
        if self.config.tracker == "none":
            return None
        if self.config.tracker == "csv":
            return [CSVTracker("train", self.output_dir / "logs")]
        return self.config.tracker

    def _build_discriminator(self) -> torch.nn.Module:
        from .losses import NLayerDiscriminator

        cfg = self.config.loss
        return NLayerDiscriminator(3, cfg.disc_channels, cfg.disc_layers, cfg.disc_spectral_norm)

    # ---- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Atomic: write ``step-N.tmp`` completely, then rename it to ``step-N``."""
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.state.step:08d}"
        temporary = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(temporary))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (temporary / "trainer_state.json").write_text(
                json.dumps(self.state.state_dict(), default=float, indent=2)
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            for old in checkpoint_dirs(self.output_dir)[: -self.config.checkpoints_to_keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, which: str) -> Path:
        if which == "latest":
            found = checkpoint_dirs(self.output_dir)
            if not found:
                raise FileNotFoundError(
                    f"--resume=latest: no checkpoint in {self.output_dir / 'checkpoints'}"
                )
            path = found[-1]
        else:
            path = Path(which)
            if not path.is_dir():
                raise FileNotFoundError(f"--resume: checkpoint directory not found: {path}")
        self.accelerator.load_state(str(path))
        return path

    # ---- one optimizer step ---------------------------------------------------------------

    def _forward(self, batch: dict, micro_step: int) -> tuple[torch.Tensor, list[RatioGroup]]:
        reals = batch["pixel_values"]
        if self.config.channels_last:
            reals = reals.contiguous(memory_format=torch.channels_last)
        assignment = self.sampler.assign(len(reals), micro_step, batch.get("ratio_label"))
        generator = _step_generator(self.config.seed, micro_step, self.accelerator.process_index, self.device)
        if self.config.ratio_resolution:
            return reals, self._forward_cropped_per_ratio(reals, assignment, generator)
        inputs = reals[assignment.rows.to(reals.device)]
        output = self.vae(inputs, assignment.ratios, sample_posterior=True, generator=generator)
        groups = []
        for ratio, positions in assignment.groups().items():
            posterior = [output.latent_dist[i] for i in positions.tolist()]
            positions = positions.to(reals.device)
            groups.append(
                RatioGroup(
                    ratio,
                    inputs[positions],
                    output.sample[positions],
                    posterior,
                    assignment.rows.to(reals.device)[positions],
                )
            )
        return reals, groups

    def _forward_cropped_per_ratio(
        self, reals: torch.Tensor, assignment, generator: torch.Generator
    ) -> list[RatioGroup]:
        """One VAE pass per ratio, each on random crops of its ``ratio_resolution`` side."""
        rows = assignment.rows.to(reals.device)
        groups = []
        for ratio, positions in assignment.groups().items():
            positions = positions.to(reals.device)
            side = self.config.ratio_resolution.get(ratio, reals.shape[-1])
            inputs = random_square_crops(reals[rows[positions]], side, generator)
            output = self.vae(inputs, ratio, sample_posterior=True, generator=generator)
            groups.append(RatioGroup(ratio, inputs, output.sample, output.latent_dist, rows[positions]))
        return groups

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """NaN guard, agreed across processes so every rank skips the same step."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        return self.accelerator.reduce(bad, reduction="sum").item() == 0

    def train_step(self, batch: dict, micro_step: int) -> dict[str, float]:
        step = self.state.step
        unwrapped_vae = self.accelerator.unwrap_model(self.vae)
        unwrapped_disc = self.accelerator.unwrap_model(self.disc)
        logs: dict[str, float] = {}
        with self.accelerator.accumulate(self.vae, self.disc):
            with self.accelerator.autocast():
                reals, groups = self._forward(batch, micro_step)
            # Generator step. The discriminator is frozen and used unwrapped: its gradients are not
            # wanted here, and a DDP module must run forward only once per backward.
            _set_requires_grad(unwrapped_disc, False)
            with self.accelerator.autocast():
                g_loss, g_logs = self.loss.generator_loss(
                    groups,
                    step,
                    discriminator=unwrapped_disc if self.loss.adversarial_factor(step) > 0 else None,
                    last_layer=unwrapped_vae.get_last_layer(),
                )
            _set_requires_grad(unwrapped_disc, True)
            if not self._all_finite(g_loss):
                self.opt_g.zero_grad(set_to_none=True)
                self.state.skipped_steps += 1
                return {"train/skipped_nonfinite": 1.0}
            logs.update(g_logs)
            self.accelerator.backward(g_loss)
            if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.vae.parameters(), self.config.max_grad_norm)
            self.opt_g.step()
            self.scheduler.step()
            self.opt_g.zero_grad(set_to_none=True)

            if self.loss.discriminator_active(step):
                with self.accelerator.autocast():
                    d_loss, d_logs = self.loss.discriminator_loss(self.disc, reals, groups, step)
                if self._all_finite(d_loss):
                    logs.update(d_logs)
                    self.accelerator.backward(d_loss)
                    if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                        self.accelerator.clip_grad_norm_(self.disc.parameters(), self.config.max_grad_norm)
                    self.opt_d.step()
                self.opt_d.zero_grad(set_to_none=True)
        logs["train/lr"] = self.scheduler.get_last_lr()[0]
        return logs

    # ---- images and export ----------------------------------------------------------------

    def _eval_model(self) -> NestedVAE:
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.vae)

    @torch.no_grad()
    def write_grids(self) -> None:
        if not self.accelerator.is_main_process or self.grid_images is None:
            return
        model = self._eval_model()
        was_training = model.training
        model.eval()
        for ratio in RATIOS:
            reconstruction = model(self.grid_images, ratio).sample.clamp(-1, 1)
            path = self.output_dir / "images" / f"step-{self.state.step:08d}_r{ratio}.png"
            save_grid([self.grid_images.cpu(), reconstruction.float().cpu()], path)
        model.train(was_training)

    def export(self) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        directory = Path(self.config.export_dir or self.output_dir / "export")
        model = copy.deepcopy(self._eval_model()).cpu().to(getattr(torch, self.config.export_dtype))
        return model.save_pretrained(directory)

    # ---- the loop -------------------------------------------------------------------------

    def _out_of_time(self, started: float) -> bool:
        """Wall-clock limit, agreed across processes (rank 0's clock decides)."""
        if self.config.time_limit_minutes is None:
            return False
        elapsed = torch.tensor([time.monotonic() - started], device=self.device)
        elapsed = self.accelerator.reduce(elapsed, reduction="sum") / self.accelerator.num_processes
        return elapsed.item() >= 60 * self.config.time_limit_minutes

    def train(self) -> dict[str, float]:
        config = self.config
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(
                yaml.safe_dump(config_to_dict(config), sort_keys=False)
            )
        self.accelerator.init_trackers("nested_vae", config=_flat_hparams(config))
        self.accelerator.print(
            f"{self.accelerator.distributed_type}, world size {self.accelerator.num_processes}, "
            f"device {self.device}, mixed precision {self.accelerator.mixed_precision}"
        )
        if config.resume:
            path = self.load_checkpoint(config.resume)
            self.accelerator.print(f"resumed from {path} at step {self.state.step}")
        accumulation = config.gradient_accumulation_steps
        progress = tqdm(
            total=config.max_steps,
            initial=self.state.step,
            disable=not self.accelerator.is_local_main_process,
        )
        logs: dict[str, float] = {}
        started = time.monotonic()
        while self.state.step < config.max_steps:
            # accelerate's loader calls dataset.set_epoch(<its own counter>) when iterated: set the
            # counter, so a resumed run is in the right epoch too.
            self.loader.set_epoch(self.state.epoch)
            loader = self.loader
            if self.state.batches_in_epoch:
                loader = self.accelerator.skip_first_batches(self.loader, self.state.batches_in_epoch)
            for batch in loader:
                if self.grid_images is None:
                    self.grid_images = batch["pixel_values"][: config.num_grid_images].detach().clone()
                micro_step = self.state.step * accumulation + self.state.batches_in_epoch % accumulation
                logs = self.train_step(batch, micro_step)
                self.state.batches_in_epoch += 1
                if not self.accelerator.sync_gradients:
                    continue
                if self.ema is not None:
                    self.ema.update_parameters(self.accelerator.unwrap_model(self.vae))
                self.state.step += 1
                progress.update(1)
                progress.set_postfix(
                    {k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.count("/") == 1}
                )
                if self.state.step % config.log_every == 0 or self.state.step == config.max_steps:
                    self.accelerator.log(logs, step=self.state.step)
                if config.image_every and self.state.step % config.image_every == 0:
                    self.write_grids()
                if self.state.step % config.checkpoint_every == 0 and self.state.step < config.max_steps:
                    self.save_checkpoint()
                if self.state.step >= config.max_steps or self._out_of_time(started):
                    break
            else:
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
                continue
            break
        if self.state.step < config.max_steps:
            self.accelerator.print(f"time limit reached: stopping at step {self.state.step}")
        progress.close()
        self.save_checkpoint()
        self.write_grids()
        self.export()
        self.accelerator.end_training()
        return logs


def _flat_hparams(config: TrainConfig) -> dict:
    flat = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config_to_dict(config))
    return flat


# --------------------------------------------------------------------------------------------
# Export with scaling factor
# --------------------------------------------------------------------------------------------


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
) -> Path:
    """Export the EMA weights of a training checkpoint with ``save_pretrained``.

    Reads the run's ``config.yaml`` (two levels up from the checkpoint) for the model config.
    """
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    run_config = load_config(str(checkpoint.parent.parent / "config.yaml"))
    vae = build_vae(run_config)
    ema_file = checkpoint / "custom_checkpoint_0.pkl"
    if ema_file.is_file() and run_config.ema:
        state = torch.load(ema_file, map_location="cpu", weights_only=True)
        state = {k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")}
    else:
        state = load_file(str(checkpoint / "model.safetensors"))
    vae.load_state_dict(state)
    vae.eval()
    if scaling_images:
        vae.config.scaling_factor = latent_scaling_factor(vae, scaling_images)
    return vae.to(getattr(torch, dtype)).save_pretrained(out)


def _export_main(argv: list[str]) -> None:
    from cat_foundations.images import center_crop_resize, load_image, pil_to_tensor

    from .data import load_training_dataset

    parser = argparse.ArgumentParser(prog="cat-train export", description=export_checkpoint.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/step-N directory")
    parser.add_argument("--out", required=True, help="output directory for config.json + model.safetensors")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
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
    path = export_checkpoint(args.checkpoint, args.out, args.dtype, images)
    print(f"exported to {path}")


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
        _export_main(argv[1:])
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
