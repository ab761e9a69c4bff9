"""What this machine's CPU can do that changes which numerics are worth using."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX); elsewhere bf16 is a slow emulation.

    Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: oneDNN says yes on every AVX-512 CPU, also those
    without the BF16 instructions, where a bf16-autocast training step at 128² with LPIPS-VGG takes 1.9x
    the fp32 one (``eval/results/bench_train_avx512_nobf16.json``: 9.9 s vs 5.3 s).
    """
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without these probes: fp32 is never the slow choice
        return False


def _cpuinfo_values(key: str) -> list[str]:
    """Every value of ``key`` in Linux's /proc/cpuinfo, one per logical CPU (empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    fields = (line.split(":", 1) for line in lines if ":" in line)
    return [value.strip() for name, value in fields if name.strip() == key]


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them in /proc/cpuinfo (empty elsewhere)."""
    return {flag for value in _cpuinfo_values("flags") for flag in value.split()}


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or ``platform.processor()`` where that file names none."""
    names = _cpuinfo_values("model name")
    return names[0] if names else platform.processor()


def bf16_is_native(device_type: str) -> bool:
    """Whether bf16 runs natively on a ``device_type`` device: on GPUs, and on CPUs with AVX512-BF16/AMX."""
    return device_type != "cpu" or cpu_has_native_bf16()


def mixed_precision_for(requested: str, native_bf16: bool) -> str:
    """The mixed precision worth training in: ``requested``, except bf16 where it would only be emulated.

    Emulated bf16 autocast costs 26x an fp32 training step on a 2-core AVX2 CPU
    (``eval/results/bench_train_avx2.json``: 107 s vs 4.05 s at 128², batch 8), so a config written
    for AVX512-BF16/AMX machines or GPUs falls back to fp32 (``"no"``) there instead of crawling.

    Args:
        requested: the configured ``mixed_precision`` (``"no"``, ``"bf16"`` or ``"fp16"``).
        native_bf16: whether the training device runs bf16 natively (:func:`bf16_is_native`).
    """
    if requested == "bf16" and not native_bf16:
        return "no"
    return requested
