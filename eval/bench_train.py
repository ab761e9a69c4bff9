"""Benchmark: nested-VAE training steps/s and peak memory (the real ``cat-train`` step).

    python -m eval.bench_train                                       # CPU: precision x layout x threads
    python -m eval.bench_train --sizes 128 256 --variants bf16 --threads 2
    python -m eval.bench_train --device cuda --variants bf16 bf16:cl --sizes 256 --batch 32

Each row times :meth:`nested_vae.train.Trainer.train_step` -- VAE forward on a uniformly mixed
8x/16x/32x batch, L1 + KL + the perceptual term (``--perceptual``: LPIPS-AlexNet, LPIPS-VGG,
EfficientNet-Lite0 features or none), backward, optimizer step, and in the ``gan`` phase also the
PatchGAN generator term with its adaptive weight and the discriminator update -- on random crops
of real devset images, default ``NestedVAE`` config. A variant is a precision (``no`` or ``bf16``)
with ``:cl`` for channels-last memory format. accelerate allows one mixed precision per process,
so a ``bf16`` row runs the step inside ``torch.autocast(dtype=bfloat16)``, which is what
``mixed_precision="bf16"`` does (accelerate adds a GradScaler only for fp16). Every (size, phase, variant,
threads) row gets one warm-up step, then ``--steps`` timed steps (median), all rows interleaved
per round in one process, so ratios between rows are measured side by side. Wall time
(``perf_counter``) and this process's CPU time (``process_time``) are both reported: on a loaded
machine wall time mostly measures the neighbours.

Peak memory (CPU): the largest tensor memory held at once during one step beyond what was held
before it, with :func:`eval.bench_vae.peak_tensor_memory_bytes`; on CUDA
``torch.cuda.max_memory_allocated`` during the step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cat_foundations.atomic import atomic_write_json
from cat_foundations.hardware import bf16_is_native, cpu_flags
from eval.bench_vae import peak_tensor_memory_bytes
from nested_vae.train import Trainer, load_config

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_train.json"
DEFAULT_DEVSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "devset" / "captions.jsonl"
PHASES = {"reconstruction": 10**9, "gan": 0}  # disc_start for each phase
PERCEPTUAL = {
    "lpips-alex": ("lpips", {"net": "alex"}),
    "lpips-vgg": ("lpips", {"net": "vgg"}),
    "efficientnet": ("efficientnet", {}),
    "none": ("none", {}),
}


def _trainer(size: int, phase: str, variant: str, args: argparse.Namespace, workdir: Path):
    layout = variant.partition(":")[2]
    perceptual, options = PERCEPTUAL[args.perceptual]
    overrides = {
        "output_dir": str(workdir / f"{phase}_{size}_{variant.replace(':', '_')}"),
        "data.source": str(args.captions),
        "data.resolution": size,
        "batch_size": args.batch,
        "loss.perceptual": perceptual,
        "loss.perceptual_options": json.dumps(options),
        "loss.disc_start": PHASES[phase],
        "tracker": "none",
        "image_every": 0,
        "mixed_precision": "no",  # bf16 rows autocast in _step_call (see the module docstring)
        "channels_last": layout == "cl",
    }
    trainer = Trainer(load_config(None, [f"--{k}={v}" for k, v in overrides.items()]))
    if trainer.device.type != args.device:
        raise SystemExit(f"asked for {args.device} but accelerate chose {trainer.device}")
    return trainer


def _step_call(trainer, precision: str, threads: int) -> Callable[[], None]:
    """One training step of ``trainer`` on its next batch, at ``threads`` intra-op threads."""
    batches = itertools.chain.from_iterable(itertools.repeat(trainer.loader))
    micro = itertools.count()
    device = trainer.device.type

    def call():
        torch.set_num_threads(threads)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            trainer.train_step(next(batches), next(micro))

    return call


def _timed(call: Callable[[], None], device: str) -> tuple[float, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _peak_bytes(call: Callable[[], None], device: str) -> int:
    if device != "cuda":
        return peak_tensor_memory_bytes(call)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    return torch.cuda.max_memory_allocated() - before


def measure(args: argparse.Namespace) -> dict[str, dict]:
    """Rows of side-by-side timings (see the module docstring)."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        calls = {}
        for size, phase, variant in itertools.product(args.sizes, args.phases, args.variants):
            trainer = _trainer(size, phase, variant, args, Path(tmp))
            for threads in args.threads:
                calls[(size, phase, variant, threads)] = _step_call(
                    trainer, variant.partition(":")[0], threads
                )
        for call in calls.values():  # warm-up
            call()
        times = {key: [] for key in calls}
        for _ in range(args.steps):
            for key, call in calls.items():
                times[key].append(_timed(call, args.device))
        for key, call in calls.items():
            size, phase, variant, threads = key
            wall = statistics.median(t[0] for t in times[key])
            cpu = statistics.median(t[1] for t in times[key])
            rows[f"{phase}@{size} {variant} x{threads}"] = {
                "phase": phase,
                "size": size,
                "variant": variant,
                "threads": threads,
                "batch": args.batch,
                "step_s_wall": round(wall, 3),
                "step_s_cpu": round(cpu, 3),
                "steps_per_s_wall": round(1 / wall, 4),
                "images_per_s_wall": round(args.batch / wall, 3),
                "peak_step_memory_mib": round(_peak_bytes(call, args.device) / 2**20, 1),
            }
    return rows


def _cpu_flags() -> list[str]:
    """The flags that decide which numerics pay (bf16 natively or emulated)."""
    return sorted(flag for flag in cpu_flags() if flag.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up)")
    parser.add_argument("--phases", nargs="+", default=["reconstruction"], choices=list(PHASES))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="default: no bf16 bf16:cl; on a CPU without native bf16 no no:cl (emulated bf16 is ~26x slower)",
    )
    parser.add_argument("--perceptual", default="lpips-alex", choices=list(PERCEPTUAL))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads")
    parser.add_argument("--captions", type=Path, default=DEFAULT_DEVSET, help="captions.jsonl to crop")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.variants is None:
        args.variants = ["no", "bf16", "bf16:cl"] if bf16_is_native(args.device) else ["no", "no:cl"]
    for variant in args.variants:
        precision, _, layout = variant.partition(":")
        if precision not in ("no", "bf16") or layout not in ("", "cl"):
            raise SystemExit(f"variant {variant!r}: expected no or bf16, optionally with ':cl'")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    rows = measure(args)
    result = {
        "setup": {
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_flags": _cpu_flags(),
            "perceptual": args.perceptual,
            "timed_steps": args.steps,
            "torch": torch.__version__,
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "what": "Trainer.train_step, default NestedVAE, uniform 8/16/32 mix, L1+KL+perceptual"
            " (+ PatchGAN with adaptive weight and D update in the 'gan' phase)",
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"{'row':<30}{'s/step wall':>12}{'s/step cpu':>12}{'img/s':>8}{'peak MiB':>10}")
    for name, row in rows.items():
        print(
            f"{name:<30}{row['step_s_wall']:>12.2f}{row['step_s_cpu']:>12.2f}"
            f"{row['images_per_s_wall']:>8.2f}{row['peak_step_memory_mib']:>10.0f}"
        )
    print(f"setup: {result['setup']}\nwritten to {args.out}")
    return result


if __name__ == "__main__":
    main()
