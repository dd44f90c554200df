"""Classification (``mm finetune``): the cross-entropy of a linear head on the normalised image embedding over the
batch's labels. The model runs its image tower alone; the head is the task's own parameter, started as the zero-shot
classifier (:func:`mm.train.classifier.zero_shot_head`) and checkpointed as ``classifier.safetensors``, the file a
saved classifier keeps it in, so the run's final directory is a classifier directory."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...models import ModelOutput
from ..classifier import load_head, save_classes, save_head
from ..optim import param_groups
from .base import Batch, Task, Terms, weighted_sum


@dataclass
class ClassifierOutput(ModelOutput):
    logits: torch.Tensor | None = None  # (B, n_classes): the head on the normalised image embedding


class ClassifyTask(Task):
    """``cross_entropy(head(image_emb), labels)``, a mean over the samples (``label_smoothing`` as
    ``F.cross_entropy`` takes it). The head learns at ``lr * lr_mult``, its weight decayed and its bias not (the
    rule of the model's own parameters). ``classes`` and ``meta`` (what it was trained with) go beside the head into
    the final directory (``classes.json``). The batch's accuracy is logged as ``batch_top1``."""

    name = "classify"

    def __init__(self, head: nn.Linear, classes: list[str], *, label_smoothing: float = 0.0, lr_mult: float = 1.0,
                 meta: dict[str, Any] | None = None):
        self.head, self.classes = head, list(classes)
        self.label_smoothing, self.lr_mult, self.meta = label_smoothing, lr_mult, dict(meta or {})

    def forward(self, module: nn.Module, batch: Batch, embed_only: bool = False, **model_kwargs) -> ModelOutput:
        labels = batch["labels"]
        bad = (labels < 0) | (labels >= self.head.out_features)
        if bool(bad.any()):
            raise ValueError(f"training label {int(labels[bad][0])} is not a class index (there are "
                             f"{self.head.out_features} classes); do the class names belong to these shards?")
        out = module(batch["images"], None)  # the image tower alone, through the module (DDP's hooks see it)
        if embed_only:
            return out
        return ClassifierOutput(**{f.name: getattr(out, f.name) for f in fields(out)}, logits=self.head(out.image_emb))

    def local_terms(self, out: ModelOutput, batch: Batch) -> Terms:
        return {"cross_entropy": F.cross_entropy(out.logits.float(), batch["labels"],
                                                 label_smoothing=self.label_smoothing)}

    def local_units(self, batch: Batch) -> dict[str, float]:
        return {"cross_entropy": float(batch["labels"].shape[0])}

    def combine(self, terms: Terms) -> torch.Tensor | None:
        return weighted_sum(terms, [("cross_entropy", 1.0)])

    def losses(self, out: ModelOutput, batch: Batch) -> Terms:
        terms = super().losses(out, batch)
        terms["batch_top1"] = (out.logits.detach().argmax(1) == batch["labels"]).float().mean()
        return terms

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        scales = {name: self.lr_mult for name, _ in self.head.named_parameters()}
        return [g for g in param_groups(self.head, weight_decay, scales, lr) if g["params"]]

    def save(self, directory: str | Path) -> None:
        save_head(self.head, directory)

    def load(self, directory: str | Path) -> None:
        load_head(self.head, directory)

    def save_final(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        save_head(self.head, directory)
        save_classes(self.classes, directory, {**self.meta, **(extra or {})})

    def describe(self) -> str | None:
        c, d = self.head.out_features, self.head.in_features
        mult = f", its lr x {self.lr_mult:g}" if self.lr_mult != 1 else ""
        return f"classification over {c} classes: a linear head ({d} -> {c}) started as the zero-shot classifier{mult}"
