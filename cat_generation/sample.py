"""Sampling a trained run: pick the ratio (the CAT way for a caption), generate, decode, save.

Text-to-image the CAT way: with ``ratio="auto"`` and a caption, the run's router LLM scores the
caption and the routing policy the tokens were made with picks 8x, 16x or 32x *before* anything is
generated, so a plain sky costs 64 tokens and a chart 1024 (for a 256x256 image).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cat_foundations.atomic import atomic_write_bytes, atomic_write_json
from cat_foundations.captions import clean_caption
from cat_foundations.images import tensor_to_pil
from cat_foundations.ratios import check_ratio, latent_size
from nested_vae import NestedVAE
from router import RoutingPolicy, load_scorer

from .generator import LatentGenerator
from .packing import pack_latents
from .stats import STATS_FILE, LatentStats
from .text import embed_captions
from .train import RUN_INFO

AUTO = "auto"


@dataclass
class SampleSettings:
    """One sampling call.

    Args:
        run: a run folder written by ``cat-gen train``.
        n: images to generate.
        ratio: 8, 16, 32, ``"auto"`` (the router picks from ``caption``) or None (``auto`` with a
            caption, else the ratio the run saw most).
        caption: the caption (routing with ``auto``; conditioning when the model has caption_dim).
        label: a class/domain name of the run (default: its first label).
        size: ``(H, W)`` of the images (default: the run's most common image size).
        steps: flow Euler steps, or masked parallel decoding steps.
        head_steps: Euler steps of the masked objective's per-token head.
        temperature: noise scale of the masked head's draws.
        seed: random seed.
        vae: the VAE to decode with (default: the one the tokens were made with).
        router_model: the router LLM for ``auto`` (default: the one the tokens were routed with).
        device: torch device (default CUDA when available, else CPU).
    """

    run: Path
    n: int = 4
    ratio: int | str | None = None
    caption: str | None = None
    label: str | None = None
    size: tuple[int, int] | None = None
    steps: int = 32
    head_steps: int = 16
    temperature: float = 1.0
    seed: int = 0
    vae: str | None = None
    router_model: str | None = None
    device: str | None = None


@dataclass
class SampleResult:
    """Generated images and how their ratio was chosen.

    Args:
        images: RGB PIL images, all of ``size``.
        ratio: the ratio generated at.
        tokens: tokens per image.
        score: the router's score of the caption (``auto``), else None.
        size: ``(H, W)``.
    """

    images: list[Image.Image]
    ratio: int
    tokens: int
    score: float | None
    size: tuple[int, int]


def read_run_info(run: Path) -> dict:
    path = Path(run) / RUN_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {RUN_INFO} (not a cat-gen train run folder)")
    return json.loads(path.read_text())


def route_caption(caption: str, info: dict, router_model: str | None = None) -> tuple[int, float]:
    """``(ratio, score)`` for ``caption``: the run's router LLM and the tokens' routing thresholds."""
    cleaned = clean_caption(caption)
    if cleaned is None:
        raise ValueError("ratio 'auto' needs a non-empty caption (or give --ratio 8, 16 or 32)")
    scorer = load_scorer(router_model or info.get("router_model") or "default")
    score = scorer.score([cleaned])[0]
    policy = RoutingPolicy(**info["policy"]) if info.get("policy") else RoutingPolicy()
    decision = policy.decide(score)
    return decision.ratio, decision.score


def choose_ratio(settings: SampleSettings, info: dict) -> tuple[int, float | None]:
    """The ratio to generate at, and the caption's score when the router chose it."""
    ratio = settings.ratio
    if ratio is None:
        ratio = AUTO if settings.caption else max(info["ratio_mix"], key=lambda r: info["ratio_mix"][r])
    if ratio == AUTO:
        if not settings.caption:
            raise ValueError("ratio 'auto' routes a caption: give --caption TEXT, or --ratio 8, 16 or 32")
        return route_caption(settings.caption, info, settings.router_model)
    return check_ratio(int(ratio)), None


def _label_index(settings: SampleSettings, info: dict) -> int:
    names = info["labels"]["names"]
    if settings.label is None:
        return 0
    if settings.label not in names:
        raise ValueError(f"label {settings.label!r} is not one of the run's labels {names}")
    return names.index(settings.label)


def generate(settings: SampleSettings) -> SampleResult:
    """Generate ``settings.n`` images (see :class:`SampleSettings`)."""
    if settings.n < 1:
        raise ValueError(f"n must be >= 1, got {settings.n}")
    info = read_run_info(settings.run)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LatentGenerator.from_pretrained(settings.run, device=device)
    stats = LatentStats.load(Path(settings.run) / STATS_FILE)
    ratio, score = choose_ratio(settings, info)
    size = tuple(settings.size or info["image_size"])
    shape = (model.config.latent_channels, *latent_size(size[0], size[1], ratio))
    captions = None
    if model.config.caption_dim:
        captions = embed_captions([settings.caption] * settings.n, model.config.caption_dim)
    layout = pack_latents(
        [torch.zeros(shape)] * settings.n,
        [ratio] * settings.n,
        [_label_index(settings, info)] * settings.n,
        max_tokens=shape[1] * shape[2],
        patch_size=model.config.patch_size,
        caption_embeddings=captions,
    ).to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    tokens = model.sample(layout, settings.steps, settings.head_steps, settings.temperature, generator)
    latents = torch.stack([stats.denormalize(latent, ratio) for latent in layout.latents(tokens)])
    vae = NestedVAE.from_pretrained(settings.vae or info.get("vae") or "default", device=device)
    with torch.no_grad():
        decoded = vae.decode(latents.to(device), ratio, output_size=size).sample
    return SampleResult([tensor_to_pil(image) for image in decoded], ratio, shape[1] * shape[2], score, size)


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """The images tiled row by row (``columns`` default: the ceiling of the square root)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_samples(result: SampleResult, out: Path, settings: SampleSettings) -> list[Path]:
    """Write ``sample_000.png``..., ``grid.png`` and ``samples.json`` to ``out``; returns the PNGs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(result.images):
        paths.append(out / f"sample_{index:03d}.png")
        atomic_write_bytes(paths[-1], _png_bytes(image))
    atomic_write_bytes(out / "grid.png", _png_bytes(image_grid(result.images)))
    record = {
        "run": str(settings.run),
        "ratio": result.ratio,
        "tokens": result.tokens,
        "score": result.score,
        "size": list(result.size),
        "caption": settings.caption,
        "label": settings.label,
        "steps": settings.steps,
        "seed": settings.seed,
    }
    atomic_write_json(out / "samples.json", record)
    return paths
