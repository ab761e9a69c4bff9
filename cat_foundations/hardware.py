"""What this machine's CPU can do that changes which numerics are worth using."""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX); elsewhere bf16 is a slow emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mixed_precision_for(requested: str, device_type: str, native_bf16: bool) -> str:
    """The mixed precision worth training in: ``requested``, except bf16 on a CPU that only emulates it.

    Emulated bf16 autocast costs 26x an fp32 training step on a 2-core AVX2 CPU
    (``eval/results/bench_train_avx2.json``: 107 s vs 4.05 s at 128², batch 8), so a config written
    for AVX512-BF16/AMX machines or GPUs falls back to fp32 (``"no"``) there instead of crawling.

    Args:
        requested: the configured ``mixed_precision`` (``"no"``, ``"bf16"`` or ``"fp16"``).
        device_type: the training device's type (``"cpu"``, ``"cuda"``, ...).
        native_bf16: whether this CPU runs bf16 natively (:func:`cpu_has_native_bf16`).
    """
    if requested == "bf16" and device_type == "cpu" and not native_bf16:
        return "no"
    return requested
