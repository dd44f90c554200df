"""Distillation as a task around any other: ``task_weight * inner + kl_weight * KL + feature_weight * feature``,
the teacher's embeddings coming from :class:`mm.train.distill.Distiller` (a frozen teacher or ``mm embed``
outputs). KL and the feature loss are batch terms (the in-batch similarity distribution couples the samples), so
gradient caching runs distillation like any other objective; the feature projection is the task's parameter."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...models import ModelOutput
from ..distill import Distiller
from .base import Batch, Task, Terms


class DistillTask(Task):
    name = "distill"

    def __init__(self, inner: Task, distiller: Distiller):
        self.inner, self.distiller = inner, distiller
        self.joint = inner.joint
        self.loss = distiller.loss  # DistillLoss: the weights, the KL and the feature terms

    def forward(self, module: nn.Module, batch: Batch, embed_only: bool = False, **model_kwargs) -> ModelOutput:
        return self.inner.forward(module, batch, embed_only, **model_kwargs)

    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)

    def end_step(self, step: int) -> None:
        self.inner.end_step(step)

    def batch_terms(self, out: ModelOutput, batch: Batch) -> Terms:
        img, txt = self.distiller.teacher_embeddings(batch, batch["images"], batch["tokens"])
        return {**self.inner.batch_terms(out, batch),
                **self.loss.teacher_terms(out, (img, txt, self.distiller.scale))}

    def local_terms(self, out: ModelOutput, batch: Batch) -> Terms:
        return self.inner.local_terms(out, batch)

    def local_units(self, batch: Batch) -> dict[str, float]:
        return self.inner.local_units(batch)

    def combine(self, terms: Terms) -> torch.Tensor | None:
        inner = self.inner.combine(terms)
        total = None if inner is None else self.loss.task_weight * inner
        for key, w in (("kl_loss", self.loss.kl_weight), ("feature_loss", self.loss.feature_weight)):
            if key in terms:
                total = w * terms[key] if total is None else total + w * terms[key]
        return total

    def log_terms(self, terms: Terms) -> Terms:
        inner = self.inner.combine(terms)
        return {"task_loss": inner} if inner is not None else {}

    def parameters(self) -> list[nn.Parameter]:
        return [*self.inner.parameters(), *self.distiller.parameters()]

    def save(self, directory: str | Path) -> None:
        self.inner.save(directory)
        self.distiller.save(directory)

    def load(self, directory: str | Path) -> None:
        self.inner.load(directory)
        self.distiller.load(directory)

    def describe(self) -> str | None:
        return self.distiller.describe()
