"""Training configuration: a dataclass, optionally loaded from YAML, with ``--key=value`` overrides.

nanoGPT-style overrides: ``--max_steps=100 --loss.disc_start=0.5 --data.source=path`` (values
parsed as YAML). Unknown keys and bad values are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data import DataConfig
from .losses import LossConfig, resolve_disc_start
from .model import PAD_MULTIPLE, RATIOS


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
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (accelerate's autocast/GradScaler). On a CPU
            without native bf16 (no AVX512-BF16/AMX) ``"bf16"`` trains in fp32 instead, with a warning.
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
