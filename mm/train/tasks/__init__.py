"""A run's objective as a task (:mod:`.base` says what a task answers): contrastive (CLIP / SigLIP), CoCa,
distillation around either, and classification (a fine-tuning run's). :func:`build_task` makes the run's from its
config; executors and the trainer see only the :class:`Task` interface."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from ...config import to_dict
from ...losses import CocaLoss, make_loss
from ...models import ImageTextModel
from ...utils.dist import world_size
from ..classifier import zero_shot_head
from ..config import RunConfig
from ..distill import build_distiller
from .base import Batch, Task, Terms, weighted_sum
from .classify import ClassifierOutput, ClassifyTask
from .contrastive import CocaTask, ContrastiveTask
from .distill import DistillTask
from .siglip2 import Siglip2Task

__all__ = ["Batch", "ClassifierOutput", "ClassifyTask", "CocaTask", "ContrastiveTask", "DistillTask", "Siglip2Task", "Task", "Terms",
           "build_task", "load_objective", "weighted_sum"]


def load_objective(spec: str) -> Callable[..., Task]:
    """The factory ``train.objective`` names (``module:factory``); ConfigError naming what is missing."""
    import importlib
    import sys

    from ...config import ConfigError

    module, _, name = spec.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the run's working directory, as `python -m` would have it
    try:
        factory = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(f"train.objective: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise ConfigError(f"train.objective: module {module!r} has no {name!r}") from None
    if not callable(factory):
        raise ConfigError(f"train.objective: {spec} is not callable")
    return factory


def build_task(cfg: RunConfig, model: ImageTextModel, optimizer: torch.optim.Optimizer | None = None,
               device: torch.device | str = "cpu",
               autocast: Callable[[], AbstractContextManager] = nullcontext) -> Task:
    """``train.objective``'s task, else the configured contrastive loss (``train.loss``), CoCa's when the model has
    a decoder, classification in a fine-tuning run; inside distillation when the run has a ``distill`` section. What
    the task trains itself joins ``optimizer`` as its own groups (call before the scheduler is made: it reads the
    groups)."""
    t = cfg.train
    distiller = build_distiller(cfg, model, torch.device(device), autocast)
    if t.objective:
        task = load_objective(t.objective)(cfg, model, torch.device(device))
    else:
        task = classify_task(cfg, model, device) if cfg.finetune is not None else _own_task(cfg, model)
    if t.objectives is not None:
        dec = t.objectives.decoder
        if dec is not None and dec.start > 0 and world_size() > 1:
            from ...config import ConfigError

            # DDP requires every parameter of the model to take part in every step's backward
            raise ConfigError("train.objectives.decoder.start: a decoder that starts later sits out the first steps, "
                              "which DDP does not allow over several processes; use 0")
        task = Siglip2Task(task, t.objectives, model, t.steps, device)
    task = task if distiller is None else DistillTask(task, distiller)
    for group in task.param_groups(t.lr, t.weight_decay) if optimizer is not None else []:
        optimizer.add_param_group(group)
    return task


def classify_task(cfg: RunConfig, model: ImageTextModel, device: torch.device | str) -> ClassifyTask:
    """A fine-tuning run's (``finetune`` section): the head starts as the zero-shot classifier of its classes."""
    f = cfg.finetune
    head = zero_shot_head(model, f.classes, f.templates, device=device)
    return ClassifyTask(head, f.classes, label_smoothing=cfg.train.label_smoothing, lr_mult=f.head_lr_mult,
                        meta={"templates": f.templates, "config": to_dict(cfg)})


def _own_task(cfg: RunConfig, model: ImageTextModel) -> Task:
    """The model's own objective: CoCa's with a decoder, else contrastive (``train.loss``)."""
    t = cfg.train
    loss_kw = {"local_loss": t.local_loss} if t.loss == "clip" else {}
    loss_kw = {**loss_kw, "block": t.loss_block} if t.loss == "siglip" else loss_kw
    loss = make_loss(t.loss, aux_weight=t.aux_weight, **loss_kw)
    if model.config.decoder is not None:
        # with train.objectives.decoder (LocCa) the caption term is the decoder's over its three tasks, weighted so
        caption_weight = t.objectives.decoder.weight if t.objectives and t.objectives.decoder else t.caption_weight
        return CocaTask(CocaLoss(loss, contrastive_weight=t.contrastive_weight, caption_weight=caption_weight,
                                 label_smoothing=t.label_smoothing, aux_weight=t.aux_weight,
                                 caption_fraction=t.caption_fraction), model.config.text)
    return ContrastiveTask(loss, t.aux_weight)
