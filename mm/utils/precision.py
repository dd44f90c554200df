"""Precision names (``fp32`` / ``bf16`` / ``fp16``, as configs and commands spell them) -> autocast dtypes,
and the one autocast context every forward pass of mm runs under."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of a precision name (None: fp32, no autocast); a dtype or None passes through."""
    if precision is None or isinstance(precision, torch.dtype):
        return precision
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return _DTYPES[precision]


def autocast(device: torch.device | str, precision: str | torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type at ``precision`` (a name or a dtype); a no-op for fp32 / None."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def emulated_on_cpu(precision: str | torch.dtype | None) -> bool:
    """Whether ``precision`` is bf16 on a CPU without native bf16 arithmetic (AVX-512 BF16 or AMX: oneDNN's bf16
    support), where every bf16 matmul is emulated: measured 20-30x slower than fp32 on an AVX2 EPYC (tiny-siglip2's
    image tower, forward + backward)."""
    if autocast_dtype(precision) != torch.bfloat16:
        return False
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch without the query: assume native
        return False
