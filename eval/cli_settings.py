"""Typed settings of ``cat-bench``: what the parser hands on to the commands.

The argparse ``Namespace`` stops at :mod:`eval.cli_args` (:func:`eval.cli_args.parse_settings`);
every command and helper after the parser works with these frozen dataclasses
(``dataclasses.replace`` makes a changed copy). The option groups of ``cat-bench --help`` map to
:class:`DataSettings`, :class:`ModelSettings`, :class:`RunSettings` and :class:`MetricSettings`;
each command's settings add its own options. :class:`Provenance` keeps the command line and the
parsed options exactly as results.json records them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar


@dataclass(frozen=True)
class DataSettings:
    """Which images (``data`` options): the source, its overrides, the crop size and the splits."""

    dataset: str
    limit: int | None = None
    size: int = 256
    hf_id: str | None = None
    hf_config: str | None = None
    split: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    data_files: str | None = None
    split_file: str | None = None


@dataclass(frozen=True)
class ModelSettings:
    """Which models (``models`` options)."""

    vae: str = "default"
    router: str = "default"
    router_backend: str = "transformers"
    policy: str | None = None


@dataclass(frozen=True)
class RunSettings:
    """Where and how (``run`` options)."""

    out: Path = Path("runs/bench")
    cache_dir: str | None = None
    device: str = "cpu"
    batch_size: int = 8
    shard: tuple[int, int] | None = None  # (K, N): only images K, K+N, ...
    seed: int = 0
    shuffle_seed: int | None = None
    cached_only: bool = False
    progress: bool = True
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricSettings:
    """Which metrics (``metrics`` options)."""

    fid: bool = True
    inception: str | None = None
    effnet: bool = True
    lpips: bool = True


@dataclass(frozen=True)
class Provenance:
    """The command line (without the program) and the parsed options, as results.json's ``run``
    block records them (``config``: every option by its argparse name, tuples as lists)."""

    argv: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class BenchSettings:
    """What every dataset command (recon, router, prepare, speed) shares."""

    command: ClassVar[str]
    data: DataSettings
    models: ModelSettings
    run: RunSettings
    provenance: Provenance


@dataclass(frozen=True)
class ReconSettings(BenchSettings):
    """``cat-bench recon``."""

    command: ClassVar[str] = "recon"
    metrics: MetricSettings = MetricSettings()
    fixed_ratios: tuple[int, ...] = (8, 16, 32)
    adaptive: bool = True  # "auto" in --ratios
    grid_per_domain: int = 2


@dataclass(frozen=True)
class RouterSettings(BenchSettings):
    """``cat-bench router``."""

    command: ClassVar[str] = "router"
    metrics: MetricSettings = MetricSettings()
    bar_db: float = 1.0
    bar_psnr: float | None = None


@dataclass(frozen=True)
class PrepareSettings(BenchSettings):
    """``cat-bench prepare``."""

    command: ClassVar[str] = "prepare"
    metrics: MetricSettings = MetricSettings()


@dataclass(frozen=True)
class SpeedSettings(BenchSettings):
    """``cat-bench speed``."""

    command: ClassVar[str] = "speed"
    resolutions: tuple[int, ...] = (256, 512)
    ratios: tuple[int, ...] = (8, 16, 32)
    repeats: int = 3


@dataclass(frozen=True)
class HeadroomSettings:
    """What one ``cat-bench headroom`` run measures (built from the CLI by :mod:`eval.cli_args`)."""

    command: ClassVar[str] = "headroom"
    dataset: str
    out: Path
    vae: str = "default"
    size: int = 256
    split_file: str | None = None
    only_split: str | None = None
    limit: int | None = None
    budget: float | None = None  # mean tokens per image; None: fixed 16x's
    cache_dir: str | None = None
    device: str = "cpu"
    batch_size: int = 8
    lpips: bool = True
    progress: bool = True
    argv: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteTargetsSettings(HeadroomSettings):
    """``cat-bench route-targets``: the headroom measurement of every image, model codec only."""

    command: ClassVar[str] = "route-targets"


CommandSettings = (
    ReconSettings | RouterSettings | PrepareSettings | SpeedSettings | HeadroomSettings | RouteTargetsSettings
)
