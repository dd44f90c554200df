"""A run's objective as a task (:mod:`.base` says what a task answers): contrastive (CLIP / SigLIP), CoCa, and
distillation around either. :func:`build_task` makes the run's from its config; executors and the trainer see only
the :class:`Task` interface."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from ...losses import make_loss
from ...models import ImageTextModel
from ..config import RunConfig
from ..distill import build_distiller
from .base import Batch, Task, Terms, weighted_sum
from .contrastive import CocaTask, ContrastiveTask
from .distill import DistillTask

__all__ = ["Batch", "CocaTask", "ContrastiveTask", "DistillTask", "Task", "Terms", "build_task", "weighted_sum"]


def build_task(cfg: RunConfig, model: ImageTextModel, optimizer: torch.optim.Optimizer | None = None,
               device: torch.device | str = "cpu",
               autocast: Callable[[], AbstractContextManager] = nullcontext) -> Task:
    """The configured contrastive loss (``train.loss``); CoCa's when the model has a decoder; inside distillation
    when the run has a ``distill`` section (its projection, if any, joins ``optimizer`` as its own group: call
    before the scheduler is made)."""
    t = cfg.train
    loss_kw = {"local_loss": t.local_loss} if t.loss == "clip" else {}
    loss_kw = {**loss_kw, "block": t.loss_block} if t.loss == "siglip" else loss_kw
    loss = make_loss(t.loss, aux_weight=t.aux_weight, **loss_kw)
    if model.config.decoder is not None:
        task: Task = CocaTask(loss, model.config.text, contrastive_weight=t.contrastive_weight,
                              caption_weight=t.caption_weight, label_smoothing=t.label_smoothing,
                              aux_weight=t.aux_weight, caption_fraction=t.caption_fraction)
    else:
        task = ContrastiveTask(loss, t.aux_weight)
    distiller = build_distiller(cfg, model, optimizer, torch.device(device), autocast)
    return task if distiller is None else DistillTask(task, distiller)
