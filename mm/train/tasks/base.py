"""The objective interface: what a run optimises, apart from how a step is executed (mm/train/executors.py).

A task answers what the executors ask of it, and nothing else:

- ``forward(module, batch, embed_only=False)``: run the model on a batch. ``embed_only``: the towers alone, without
  per-sample heads such as CoCa's decoder (gradient caching's graph-free first pass needs no more). ``joint``:
  whether the forward joins the towers (then both run even when one of them is frozen).
- ``batch_terms(out, batch)``: the terms that couple the samples of a batch, computed from the embeddings (the
  contrastive loss, gathered across processes; distillation's in-batch KL). Gradient caching computes them once
  for the whole batch, on embeddings that are leaves.
- ``local_terms(out, batch)``: per-sample terms of one forward (CoCa's caption cross-entropy, MoE's aux loss), each
  a mean over its units; ``local_units(batch)``: how many units of each term a batch holds (caption tokens,
  samples), so that chunks of a batch weigh their local terms by their share.
- ``combine(terms)``: the loss, a fixed linear combination of the terms present (absent terms count 0; None when
  none is present); ``log_terms(terms)``: derived entries the log shows (distillation's ``task_loss``).
- ``begin_step(step)`` / ``end_step(step)``: around each optimizer step (a schedule of objectives, an EMA teacher).
- what the task itself trains: ``parameters()``, ``param_groups(lr, weight_decay)`` (how they join the optimizer),
  ``sync_grads()`` (averaged over processes: they are outside DDP), ``save(dir)`` / ``load(dir)`` in a checkpoint
  directory, ``save_final(dir)`` (what it adds to the run's final directory), ``describe()`` for the run's log.

A batch is a dict: ``images`` on the device, ``keys`` (sample keys), and what the data holds: ``tokens`` (on the
device) and ``texts`` (captions) for an image-text run, ``labels`` (on the device) for a classification run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...models import ModelOutput
from ...utils.dist import average_gradients

Batch = dict[str, Any]
Terms = dict[str, torch.Tensor]


def weighted_sum(terms: Terms, weights: list[tuple[str, float]]) -> torch.Tensor | None:
    """``sum(w * terms[k])`` over the ``(k, w)`` whose term is present, in that order (so a run's loss is
    computed by the same operations whatever executor runs it); None when no term is present."""
    total = None
    for k, w in weights:
        if k in terms:
            part = w * terms[k]
            total = part if total is None else total + part
    return total


class Task:
    """The default parts of a task: no batch terms, no local terms, nothing trained of its own."""

    name = "task"
    joint = False  # whether the forward joins the towers (a decoder reading both): both run whenever one does

    def forward(self, module: nn.Module, batch: Batch, embed_only: bool = False, **model_kwargs: Any) -> ModelOutput:
        """``model_kwargs``: further arguments of the model's forward a wrapping task adds (extra image views)."""
        if embed_only:
            return module.embed(batch["images"], batch["tokens"])
        return module(batch["images"], batch["tokens"], **model_kwargs)

    def begin_step(self, step: int) -> None:
        """Before optimizer step ``step`` (0-based): a task whose objectives follow a schedule sets them here."""
        return None

    def end_step(self, step: int) -> None:
        """After the optimizer has stepped (``step`` steps done): what follows the weights (an EMA teacher)."""
        return None

    def batch_terms(self, out: ModelOutput, batch: Batch) -> Terms:
        return {}

    def local_terms(self, out: ModelOutput, batch: Batch) -> Terms:
        return {}

    def local_units(self, batch: Batch) -> dict[str, float]:
        return {}

    def combine(self, terms: Terms) -> torch.Tensor | None:  # pragma: no cover - every task defines its loss
        raise NotImplementedError

    def log_terms(self, terms: Terms) -> Terms:
        return {}

    def losses(self, out: ModelOutput, batch: Batch) -> Terms:
        """Every term of one forward over a whole batch, its derived entries and ``loss`` (the plain step's)."""
        terms = {**self.batch_terms(out, batch), **self.local_terms(out, batch)}
        terms.update(self.log_terms(terms))
        terms["loss"] = self.combine(terms)
        return terms

    def parameters(self) -> list[nn.Parameter]:
        return []

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The optimizer groups of :meth:`parameters`: one, with plain weight decay and the base learning rate."""
        params = self.parameters()
        return [{"params": params, "weight_decay": weight_decay, "lr": lr, "lr_scale": 1.0}] if params else []

    def sync_grads(self) -> None:
        average_gradients(self.parameters())

    def save(self, directory: str | Path) -> None:
        return None

    def save_final(self, directory: str | Path) -> None:
        """What the task adds to the run's final directory (beside the model the run's state writes there)."""
        return None

    def load(self, directory: str | Path) -> None:
        return None

    def describe(self) -> str | None:
        return None
