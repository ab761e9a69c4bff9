"""Benchmark: training and sampling throughput of the reference generator on CAT's variable-length latents.

    python -m eval.bench_generation --tokens /tmp/devset_tokens           # CPU, 1 thread, ~3 min
    python -m eval.bench_generation --tokens TOKENS --device cuda --subset 0 --steps 10

Three tables, all with one model (``GeneratorConfig`` defaults unless overridden: width 128,
depth 4, 4 heads) and the real ``cat_generation`` code path (``collate`` -> ``PackedBatch`` ->
``LatentGenerator``; one optimizer step = forward, backward, AdamW):

1. **Per ratio** -- 256x256 images at 8x / 16x / 32x (1024 / 256 / 64 tokens), batches of
   ``--batch-tokens`` tokens (4 / 16 / 64 images): training tokens/s and images/s, and sampling
   images/s for both objectives (flow: ``--sample-steps`` Euler steps; masked: as many parallel
   decoding steps, head ``--head-steps``).
2. **Router mix vs all-16x** -- the images of a ``cat-tokenize`` folder (``--tokens``; a seeded
   ``--subset`` keeping each ratio's share) with the shapes the router gave them, against the same images all at 16x, both
   packed into rows of ``--max-tokens``: one training epoch and sampling every image.
3. **Packed vs padded** -- the same router-mix batches laid out packed, or one image per row padded
   to the longest in the batch: share of token slots that are padding, and real tokens/s.

Latent *values* are random normal: speed does not depend on them, only on the shapes, which are
the real ones. Each timed quantity is the median of ``--repeats`` runs after one warm-up. Wall time
(``perf_counter``) and this process's CPU time are both written: on a loaded machine wall time also
measures the neighbours.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cat_foundations.atomic import atomic_write_json, atomic_write_text
from cat_foundations.ratios import RATIOS, latent_size, tokens_for
from cat_generation.batching import collate, packed_batches
from cat_generation.config import GeneratorConfig
from cat_generation.data import LatentItem, read_tokens
from cat_generation.generator import LatentGenerator
from cat_generation.packing import PackedBatch
from cat_generation.stats import LatentStats, RatioStats

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_generation.json"
IMAGE_SIZE = 256


def _timed(fn: Callable[[], object], repeats: int) -> dict:
    """Median wall and CPU seconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def _unit_stats(channels: int) -> LatentStats:
    unit = RatioStats(torch.zeros(channels), torch.ones(channels))
    return LatentStats(dict.fromkeys(RATIOS, unit))


def _random_items(
    shapes: list[tuple[int, tuple[int, int], tuple[int, int]]], channels: int
) -> list[LatentItem]:
    """Items of the given ``(ratio, image size, latent hw)`` with random latent values."""
    generator = torch.Generator().manual_seed(0)
    return [
        LatentItem(id=str(i), latent=torch.randn(channels, *hw, generator=generator), ratio=r, size=size)
        for i, (r, size, hw) in enumerate(shapes)
    ]


class Bench:
    """One model per objective and the two timed operations on a batch."""

    def __init__(self, args: argparse.Namespace, channels: int):
        self.args = args
        self.device = torch.device(args.device)
        self.stats = _unit_stats(channels)
        self.models, self.optimizers = {}, {}
        for objective in ("flow", "masked"):
            torch.manual_seed(0)
            config = GeneratorConfig(latent_channels=channels, objective=objective, **args.model)
            model = LatentGenerator(config).to(self.device)
            self.models[objective] = model
            self.optimizers[objective] = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def batch(self, items, indices, mode: str) -> PackedBatch:
        return collate(items, indices, self.stats, mode, self.args.max_tokens).to(self.device)

    def train_step(self, objective: str, batch: PackedBatch) -> None:
        model, optimizer = self.models[objective], self.optimizers[objective]
        model.train()
        loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._sync()

    def sample(self, objective: str, batch: PackedBatch) -> None:
        model = self.models[objective].eval()
        model.sample(batch, steps=self.args.sample_steps, head_steps=self.args.head_steps)
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @property
    def parameters(self) -> dict:
        return {name: sum(p.numel() for p in model.parameters()) for name, model in self.models.items()}


def per_ratio(bench: Bench, channels: int) -> list[dict]:
    """Table 1: equal-token batches of 256x256 images at each ratio."""
    rows = []
    for ratio in RATIOS:
        tokens = tokens_for(ratio, IMAGE_SIZE)
        count = max(1, bench.args.batch_tokens // tokens)
        hw = latent_size(IMAGE_SIZE, IMAGE_SIZE, ratio)
        items = _random_items([(ratio, (IMAGE_SIZE, IMAGE_SIZE), hw)] * count, channels)
        batch = bench.batch(items, list(range(count)), "bucket")
        row = {"ratio": ratio, "tokens_per_image": tokens, "images_per_batch": count}
        for objective in ("flow", "masked"):
            train = _timed(lambda o=objective, b=batch: bench.train_step(o, b), bench.args.repeats)
            sample = _timed(lambda o=objective, b=batch: bench.sample(o, b), bench.args.repeats)
            row[f"{objective}_train_tokens_per_s"] = count * tokens / train["wall_s"]
            row[f"{objective}_train_images_per_s"] = count / train["wall_s"]
            row[f"{objective}_sample_images_per_s"] = count / sample["wall_s"]
            row[f"{objective}_timings"] = {"train": train, "sample": sample}
        rows.append(row)
        print(f"  per ratio {ratio}x done", flush=True)
    return rows


def _epoch_batches(items: list[LatentItem], max_tokens: int, rows: int) -> list[list[int]]:
    """One epoch of packed batches (the trainer's own stream, cut where the first epoch ends)."""
    stream, batches, seen = packed_batches(items, max_tokens, rows, seed=0), [], 0
    while seen < len(items):
        batches.append(next(stream))
        seen += len(batches[-1])
    return batches


def _epoch(bench: Bench, items, batches, mode: str, objective: str, operation: str) -> dict:
    prepared = [bench.batch(items, indices, mode) for indices in batches]
    run = bench.train_step if operation == "train" else bench.sample
    timing = _timed(lambda: [run(objective, batch) for batch in prepared], bench.args.repeats)
    real = sum(int(b.real_tokens.sum()) for b in prepared)
    slots = sum(b.sequence_ids.numel() for b in prepared)
    return {
        **timing,
        "images_per_s": len(items) / timing["wall_s"],
        "tokens_per_s": real / timing["wall_s"],
        "real_tokens": real,
        "token_slots": slots,
        "padding_fraction": 1 - real / slots,
        "batches": len(prepared),
    }


def _routed_shapes(tokens_dir: Path, subset: int) -> list[tuple[int, tuple[int, int]]]:
    """``(ratio, image size)`` of a seeded subset of a tokenized folder (all when ``subset`` is 0).

    The subset keeps the router's share of each ratio (stratified), so its mean token count stays
    that of the whole set, which the routing thresholds were calibrated on.
    """
    found = [(item.ratio, tuple(item.size)) for item in read_tokens(tokens_dir)]
    if not subset or subset >= len(found):
        return found
    generator, picked = torch.Generator().manual_seed(0), []
    for ratio in RATIOS:
        members = [shape for shape in found if shape[0] == ratio]
        share = round(subset * len(members) / len(found))
        picked += [members[int(i)] for i in torch.randperm(len(members), generator=generator)[:share]]
    return picked


def mix_vs_16(bench: Bench, routed, channels: int) -> dict:
    """Tables 2 and 3: the router's mix vs all-16x (packed), and the mix packed vs padded."""
    arms = {
        "router_mix": [(r, size, latent_size(*size, r)) for r, size in routed],
        "all_16x": [(16, size, latent_size(*size, 16)) for _, size in routed],
    }
    result = {}
    for name, shapes in arms.items():
        items = _random_items(shapes, channels)
        batches = _epoch_batches(items, bench.args.max_tokens, bench.args.rows)
        modes = ("pack", "bucket") if name == "router_mix" else ("pack",)
        arm = {"images": len(items), "mean_tokens": sum(h * w for _, _, (h, w) in shapes) / len(shapes)}
        arm["ratio_mix"] = {str(r): sum(1 for s in shapes if s[0] == r) for r in RATIOS}
        for mode in modes:
            layout = "packed" if mode == "pack" else "padded"
            for objective in ("flow", "masked"):
                arm[f"{layout}_{objective}_train"] = _epoch(bench, items, batches, mode, objective, "train")
            if mode == "pack":
                for objective in ("flow", "masked"):
                    arm[f"packed_{objective}_sample"] = _epoch(
                        bench, items, batches, mode, objective, "sample"
                    )
            print(f"  {name} {layout} done", flush=True)
        result[name] = arm
    return result


def _table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def report(results: dict) -> str:
    """The three tables as Markdown."""
    per = [["ratio", "tokens/img", "imgs/batch", "flow train tok/s", "flow train img/s", "flow sample img/s"]]
    per[0] += ["masked train tok/s", "masked sample img/s"]
    for row in results["per_ratio"]:
        per.append(
            [f"{row['ratio']}x", str(row["tokens_per_image"]), str(row["images_per_batch"])]
            + [f"{row[k]:.0f}" for k in ("flow_train_tokens_per_s",)]
            + [f"{row[k]:.2f}" for k in ("flow_train_images_per_s", "flow_sample_images_per_s")]
            + [f"{row['masked_train_tokens_per_s']:.0f}", f"{row['masked_sample_images_per_s']:.2f}"]
        )
    mix, fixed = results["mix_vs_16"]["router_mix"], results["mix_vs_16"]["all_16x"]
    versus = [
        [
            "arm",
            "mean tokens",
            "flow train img/s",
            "masked train img/s",
            "flow sample img/s",
            "masked sample img/s",
        ]
    ]
    for name, arm in (("router mix", mix), ("all 16x", fixed)):
        versus.append(
            [name, f"{arm['mean_tokens']:.1f}"]
            + [f"{arm[k]['images_per_s']:.2f}" for k in ("packed_flow_train", "packed_masked_train")]
            + [f"{arm[k]['images_per_s']:.2f}" for k in ("packed_flow_sample", "packed_masked_sample")]
        )
    layout = [
        [
            "router-mix batches",
            "padding share",
            "token slots",
            "flow train real tok/s",
            "masked train real tok/s",
        ]
    ]
    for name in ("packed", "padded"):
        flow, masked = mix[f"{name}_flow_train"], mix[f"{name}_masked_train"]
        layout.append(
            [name, f"{flow['padding_fraction']:.1%}", str(flow["token_slots"])]
            + [f"{flow['tokens_per_s']:.0f}", f"{masked['tokens_per_s']:.0f}"]
        )
    return "\n\n".join([_table(per), _table(versus), _table(layout)]) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokens", type=Path, required=True, help="a cat-tokenize output folder (router mix)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--subset", type=int, default=96, help="images of --tokens to use (0: all)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--head-steps", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    args = parser.parse_args(argv)
    args.model = {"hidden_size": args.hidden_size, "depth": args.depth, "num_heads": args.num_heads}
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    routed = _routed_shapes(args.tokens, args.subset)
    channels = int(read_tokens(args.tokens)[0].latent.shape[0])
    bench = Bench(args, channels)
    started = time.perf_counter()
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": args.threads,
            "device": args.device,
            "load_avg": os.getloadavg(),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": bench.parameters,
        "per_ratio": per_ratio(bench, channels),
        "mix_vs_16": mix_vs_16(bench, routed, channels),
    }
    results["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    text = report(results)
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)
    return results


if __name__ == "__main__":
    main()
