"""Executors: two ways to run one optimizer micro-step of any task (:mod:`mm.train.tasks`), each accumulating the
gradients of ``loss / divide`` into the parameters and returning the step's terms and model output.

- :class:`PlainStep`: one forward of the whole micro-batch with its graph, the task's every term, one backward.
- :class:`~mm.train.grad_cache.GradCache` (``train.grad_cache_chunk``): the same gradients from chunks of the
  batch (its module docstring says how), for batches whose activations do not fit.

Neither knows which objective it runs: that is the task's business.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from ..models import ModelOutput
from .grad_cache import GradCache
from .tasks import Batch, Task

__all__ = ["GradCache", "PlainStep", "make_executor"]


class PlainStep:
    """``model`` is what runs (DDP-wrapped or compiled), ``autocast`` the forward's context, ``backward`` the
    stepper's (scales fp16 losses), ``no_sync`` DDP's no-sync context for all but the step's last micro-batch."""

    def __init__(self, model: nn.Module, task: Task, *, autocast: Callable[[], AbstractContextManager],
                 backward: Callable[[torch.Tensor], None],
                 no_sync: Callable[[], AbstractContextManager] = nullcontext):
        self.model, self.task = model, task
        self.autocast, self.backward, self.no_sync = autocast, backward, no_sync

    def step(self, batch: Batch, *, divide: int = 1, sync: bool = True) -> tuple[dict[str, torch.Tensor], ModelOutput]:
        with nullcontext() if sync else self.no_sync():
            with self.autocast():
                out = self.task.forward(self.model, batch)
            losses = self.task.losses(out, batch)
            self.backward(losses["loss"] / divide)
        return losses, out

    def log_record(self, elapsed: float) -> dict[str, float]:
        return {}


def make_executor(model: nn.Module, core: nn.Module, task: Task, *, chunk: int | None, device: torch.device,
                  autocast: Callable[[], AbstractContextManager], scale: Callable[[torch.Tensor], torch.Tensor],
                  backward: Callable[[torch.Tensor], None],
                  no_sync: Callable[[], AbstractContextManager]) -> PlainStep | GradCache:
    """Gradient caching in chunks of ``chunk`` samples, or the plain step (``chunk`` None)."""
    if chunk is None:
        return PlainStep(model, task, autocast=autocast, backward=backward, no_sync=no_sync)
    return GradCache(model, core, task, chunk, device=device, autocast=autocast, scale=scale, no_sync=no_sync)
