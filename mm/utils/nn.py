"""Small helpers over ``torch.nn.Module``s: evaluation mode that restores every submodule, the device a model
is on, and a hash of its weights."""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter; the CPU for parameter-free or duck-typed models."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``no_grad`` with the model in eval mode (dropout, patch dropout off). Every submodule's previous mode
    is restored, not the root's flag pushed down: a frozen tower kept in eval mode while the rest trains
    (``train.freeze``) stays so after a mid-run evaluation."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def params_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names and fp32 values, sorted by name): equal on every process of a
    data-parallel run whose replicas stayed identical."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
