"""The training loop: accelerator, models, optimizers, checkpoints, EMA, grids and export."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from PIL import Image
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from cat_foundations.hardware import bf16_is_native, mixed_precision_for
from cat_foundations.images import tensor_to_pil

from .data import build_dataset
from .losses import NLayerDiscriminator, RatioGroup, VAELoss
from .model import RATIOS, NestedVAE, NestedVAEConfig
from .ratio_sampler import RatioSampler
from .tracking import CSVTracker
from .train_config import TrainConfig, config_to_dict

CHECKPOINT_PREFIX = "step-"
EMA_WEIGHTS_NAME = "ema.safetensors"  # the EMA model's state dict, beside accelerate's state


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


def _worthwhile_mixed_precision(requested: str) -> str:
    """``requested``, or fp32 with a warning where it is bf16 and this CPU would only emulate it."""
    # The device the Accelerator below will train on: its state is a per-process singleton, built here
    # exactly as Accelerator() would (ACCELERATE_USE_CPU decides cpu=, as in AcceleratorState).
    device_type = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device.type
    chosen = mixed_precision_for(requested, bf16_is_native(device_type))
    if chosen != requested:
        warnings.warn(
            f"mixed_precision={requested!r} asked for, but this CPU has no native bf16 (AVX512-BF16 or "
            "AMX) and emulated bf16 trains about 26x slower than fp32 here: training in fp32. Set "
            "mixed_precision: no in the config to silence this.",
            stacklevel=3,
        )
    return chosen


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
            mixed_precision=_worthwhile_mixed_precision(config.mixed_precision),
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
            if self.ema is not None:  # our own file, so export never reads accelerate's internals
                # safetensors refuses the strided weights a channels-last model holds.
                ema_state = {k: v.contiguous() for k, v in self.ema.module.state_dict().items()}
                save_file(ema_state, str(temporary / EMA_WEIGHTS_NAME))
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
