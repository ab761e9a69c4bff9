"""Benchmark: nested-VAE training steps/s and peak memory (the real ``cat-train`` step).

    python -m eval.bench_train                                   # 128 and 256, batch 8, CPU, 1 thread
    python -m eval.bench_train --sizes 128 --steps 3 --phases gan
    python -m eval.bench_train --device cuda --mixed-precision bf16  # on a GPU

Each row times :meth:`nested_vae.train.Trainer.train_step` -- VAE forward on a uniformly mixed
8x/16x/32x batch, L1 + KL + EfficientNet-Lite0 feature loss, backward, optimizer step, and in the
``gan`` phase also the PatchGAN generator term with its adaptive weight and the discriminator
update -- on random crops of real devset images, default ``NestedVAE`` config. One warm-up
step, then ``--steps`` timed steps (median); wall time (``perf_counter``) and this process's CPU
time (``process_time``) are both reported, because on a loaded shared machine wall time mostly
measures the neighbours. Phases and sizes run interleaved per round, side by side in one process.

Peak memory (CPU): the largest tensor memory held at once during one step beyond what was held
before it (weights and optimizer state already allocated excluded), with
:func:`eval.bench_vae.peak_tensor_memory_bytes`; plus the process's ``ru_maxrss``. On CUDA:
``torch.cuda.max_memory_allocated`` during the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from eval.bench_vae import peak_tensor_memory_bytes

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_train.json"
DEFAULT_DEVSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "devset" / "captions.jsonl"
PHASES = {"reconstruction": 10**9, "gan": 0}  # disc_start for each phase


def _trainer(size: int, batch: int, phase: str, captions: Path, workdir: Path, device: str, precision: str):
    from nested_vae.train import Trainer, load_config

    overrides = {
        "output_dir": str(workdir / f"{phase}_{size}"),
        "data.source": str(captions),
        "data.resolution": size,
        "batch_size": batch,
        "loss.perceptual": "efficientnet",
        "loss.disc_start": PHASES[phase],
        "tracker": "none",
        "image_every": 0,
        "mixed_precision": precision,
    }
    trainer = Trainer(load_config(None, [f"--{k}={v}" for k, v in overrides.items()]))
    if trainer.device.type != device:
        raise SystemExit(f"asked for {device} but accelerate chose {trainer.device}")
    return trainer


def _step_call(trainer, batches):
    state = {"micro": 0}

    def call():
        batch = next(batches)
        trainer.train_step(batch, state["micro"])
        trainer.state.step += 1
        state["micro"] += 1

    return call


def _cycle(loader):
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 by default: on a shared 2-core machine 2 threads spin-wait and run slower)",
    )
    parser.add_argument(
        "--captions", type=Path, default=DEFAULT_DEVSET, help="captions.jsonl of the images to crop"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        calls, trainers = {}, {}
        for size in args.sizes:
            for phase in args.phases:
                trainer = _trainer(
                    size, args.batch, phase, args.captions, Path(tmp), args.device, args.mixed_precision
                )
                trainers[(size, phase)] = trainer
                calls[(size, phase)] = _step_call(trainer, _cycle(trainer.loader))
        for call in calls.values():  # warm-up
            call()
        times = {key: {"wall": [], "cpu": []} for key in calls}
        for _ in range(args.steps):
            for key, call in calls.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter(), time.process_time()
                call()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[key]["cpu"].append(time.process_time() - cpu)
                times[key]["wall"].append(time.perf_counter() - wall)
        for key, call in calls.items():
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                call()
                peak = torch.cuda.max_memory_allocated() - before
            else:
                peak = peak_tensor_memory_bytes(call)
            size, phase = key
            wall, cpu = statistics.median(times[key]["wall"]), statistics.median(times[key]["cpu"])
            rows[f"{phase}@{size}"] = {
                "phase": phase,
                "size": size,
                "batch": args.batch,
                "step_s_wall": round(wall, 3),
                "step_s_cpu": round(cpu, 3),
                "steps_per_s_wall": round(1 / wall, 4),
                "steps_per_s_cpu": round(1 / cpu, 4),
                "images_per_s_wall": round(args.batch / wall, 3),
                "peak_step_memory_mib": round(peak / 2**20, 1),
            }
    result = {
        "setup": {
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "mixed_precision": args.mixed_precision,
            "timed_steps": args.steps,
            "torch": torch.__version__,
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "what": "Trainer.train_step, default NestedVAE, uniform 8/16/32 mix, L1+KL+EfficientNet feature loss"
            " (+ PatchGAN with adaptive weight and D update in the 'gan' phase)",
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'row':<22}{'s/step wall':>12}{'s/step cpu':>12}{'steps/s wall':>14}{'img/s':>8}{'peak MiB':>10}")
    for name, row in rows.items():
        print(
            f"{name:<22}{row['step_s_wall']:>12.2f}{row['step_s_cpu']:>12.2f}{row['steps_per_s_wall']:>14.3f}"
            f"{row['images_per_s_wall']:>8.2f}{row['peak_step_memory_mib']:>10.0f}"
        )
    print(f"setup: {result['setup']}\nwritten to {args.out}")
    return result


if __name__ == "__main__":
    main()
