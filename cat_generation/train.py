"""Training the reference generator on a ``cat-tokenize`` output folder, with ``accelerate``.

The same loop runs on a CPU, one GPU, or many (``accelerate launch -m cat_generation.cli train ...``):
each process draws its own seeded stream of batches (seed + process index) and accelerate
averages the gradients. A run folder holds everything ``cat-gen sample`` needs:

```
RUN/config.json, model.safetensors   the generator (LatentGenerator.save_pretrained)
RUN/latents_stats.json               the per-ratio normalisation it was trained with
RUN/run.json                         tokens folder, VAE, router + policy, labels, sizes, losses, speed
RUN/train_log.jsonl                  one line per logged step
```
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from cat_foundations.atomic import atomic_write_json, write_jsonl
from cat_tokenizer.store import RUN_INFO as TOKENS_RUN_INFO

from .batching import BATCHING_MODES, bucket_batches, collate, packed_batches
from .config import GeneratorConfig
from .data import LatentItem, assign_labels, read_tokens
from .generator import LatentGenerator
from .stats import STATS_FILE, load_or_compute_stats

RUN_FORMAT = "cat-gen-run-v1"
RUN_INFO = "run.json"
TRAIN_LOG = "train_log.jsonl"


@dataclass
class TrainSettings:
    """One training run.

    Args:
        tokens: a ``cat-tokenize`` output folder.
        out: the run folder to write.
        objective: ``"flow"`` or ``"masked"``.
        steps: optimizer steps.
        batching: ``"pack"`` (rows of ``max_tokens``) or ``"bucket"`` (one ratio per batch).
        max_tokens: tokens per packed row (at least the largest image's token count).
        rows: packed rows per batch.
        batch_size: images per bucket batch.
        learning_rate: AdamW learning rate (linear warm-up over the first 5 % of steps).
        seed: seeds the model init and the batch stream.
        label_rule: how images get class labels (``cat_generation.data.LABEL_RULES``).
        log_every: steps per logged loss (the mean over those steps).
        mixed_precision: accelerate's ``"no"``, ``"bf16"`` or ``"fp16"``.
        model: :class:`GeneratorConfig` fields to override (width, depth, heads, caption_dim, ...).
    """

    tokens: Path
    out: Path
    objective: str = "flow"
    steps: int = 200
    batching: str = "pack"
    max_tokens: int = 1024
    rows: int = 4
    batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    label_rule: str = "none"
    log_every: int = 10
    mixed_precision: str = "no"
    model: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 1 or self.rows < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ValueError("steps, rows, batch_size and log_every must be >= 1")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclass
class TrainResult:
    """What a run did.

    Args:
        out: the run folder.
        losses: ``(step, mean loss over the last log_every steps)`` pairs.
        tokens_per_s: real (non-padding) training tokens per second, over the whole run.
        images_per_s: training images per second.
        padding_fraction: mean share of padded token slots per batch.
        wall_s: training time (excluding reading the tokens).
    """

    out: Path
    losses: list[tuple[int, float]]
    tokens_per_s: float
    images_per_s: float
    padding_fraction: float
    wall_s: float


def _batch_stream(items: list[LatentItem], settings: TrainSettings, patch_size: int, seed: int):
    if settings.batching == "pack":
        return packed_batches(items, settings.max_tokens, settings.rows, patch_size, seed)
    return bucket_batches(items, settings.batch_size, seed)


def _model_config(items: list[LatentItem], labels: list[str], settings: TrainSettings) -> GeneratorConfig:
    values = {"latent_channels": int(items[0].latent.shape[0]), "num_labels": len(labels), **settings.model}
    return GeneratorConfig(objective=settings.objective, **values)


def _tokens_run_info(tokens: Path) -> dict:
    path = tokens / TOKENS_RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _run_info(
    settings: TrainSettings, items: list[LatentItem], labels: list[str], result: TrainResult
) -> dict:
    tokenized = _tokens_run_info(settings.tokens)
    sizes = Counter(tuple(item.size) for item in items)
    return {
        "format": RUN_FORMAT,
        "tokens": str(settings.tokens.resolve()),
        "objective": settings.objective,
        "vae": tokenized.get("vae", "default"),
        "router_model": tokenized.get("router_model"),
        "policy": tokenized.get("policy"),
        "labels": {"rule": settings.label_rule, "names": labels},
        "image_size": list(sizes.most_common(1)[0][0]),
        "ratio_mix": {str(r): n for r, n in sorted(Counter(item.ratio for item in items).items())},
        "images": len(items),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "losses": result.losses,
        "tokens_per_s": result.tokens_per_s,
        "images_per_s": result.images_per_s,
        "padding_fraction": result.padding_fraction,
        "wall_s": result.wall_s,
    }


def train(settings: TrainSettings) -> TrainResult:
    """Train one generator and write its run folder (see the module docstring)."""
    items = read_tokens(settings.tokens)
    items, labels = assign_labels(items, settings.label_rule)
    stats = load_or_compute_stats(settings.tokens, items)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(settings.seed)
    config = _model_config(items, labels, settings)
    model = LatentGenerator(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, settings.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    stream = _batch_stream(items, settings, config.patch_size, settings.seed + accelerator.process_index)
    generator = torch.Generator().manual_seed(settings.seed + 1000 * accelerator.process_index)
    losses, window, log_lines = [], [], []
    real_tokens = images = 0
    padding = 0.0
    started = time.perf_counter()
    model.train()
    for step in range(1, settings.steps + 1):
        batch = collate(
            items,
            next(stream),
            stats,
            settings.batching,
            settings.max_tokens,
            config.patch_size,
            config.caption_dim,
        ).to(accelerator.device)
        with accelerator.autocast():
            loss = model(batch, generator)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(float(loss.detach()))
        real_tokens += int(batch.real_tokens.sum())
        images += batch.num_images
        padding += batch.padding_fraction
        if step % settings.log_every == 0 or step == settings.steps:
            mean = sum(window) / len(window)
            losses.append((step, mean))
            log_lines.append({"step": step, "loss": mean, "elapsed_s": time.perf_counter() - started})
            window = []
    wall = time.perf_counter() - started
    result = TrainResult(
        settings.out, losses, real_tokens / wall, images / wall, padding / settings.steps, wall
    )
    if accelerator.is_main_process:
        settings.out.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(settings.out)
        stats.save(settings.out / STATS_FILE)
        write_jsonl(settings.out / TRAIN_LOG, log_lines)
        atomic_write_json(settings.out / RUN_INFO, _run_info(settings, items, labels, result))
    accelerator.wait_for_everyone()
    return result
