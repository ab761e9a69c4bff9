"""What this machine's CPU can do that changes which numerics are worth using."""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX); elsewhere bf16 is a slow emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
