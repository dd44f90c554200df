"""Image-text objectives: contrastive (CLIP's softmax or SigLIP's sigmoid loss, :mod:`mm.losses`) and CoCa
(contrastive + the decoder's caption cross-entropy), with MoE's auxiliary loss when the model has MoE layers."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...layers.pool import text_valid_mask
from ...losses import CocaLoss, caption_loss
from ...models import ModelOutput, TextConfig
from .base import Batch, Task, Terms, weighted_sum


def _aux(out: ModelOutput) -> Terms:
    return {"aux_loss": out.aux_loss} if out.aux_loss is not None else {}


class ContrastiveTask(Task):
    """``contrastive + aux_weight * aux``. ``loss`` is a ClipLoss / SigLipLoss (its ``contrastive(out)``)."""

    name = "contrastive"

    def __init__(self, loss: nn.Module, aux_weight: float = 1.0):
        self.loss, self.aux_weight = loss, aux_weight

    def batch_terms(self, out: ModelOutput, batch: Batch) -> Terms:
        return {"contrastive_loss": self.loss.contrastive(out)}

    def local_terms(self, out: ModelOutput, batch: Batch) -> Terms:
        return _aux(out)

    def local_units(self, batch: Batch) -> dict[str, float]:
        return {"aux_loss": float(batch["tokens"].shape[0])}

    def combine(self, terms: Terms) -> torch.Tensor | None:
        return weighted_sum(terms, [("contrastive_loss", 1.0), ("aux_loss", self.aux_weight)])


class CocaTask(ContrastiveTask):
    """CoCa (:class:`mm.losses.CocaLoss`'s weights, label smoothing and caption fraction):
    ``contrastive_weight * contrastive + caption_weight * caption CE (+ aux_weight * aux)``, the decoder training on
    the loss's ``caption_rows`` of each batch, split into a batch term and per-sample terms. The caption term is a
    mean over the caption tokens the decoder predicts (padding left out by the model)."""

    name = "coca"
    joint = True  # the decoder reads the image tower's tokens and the text tower's

    def __init__(self, loss: CocaLoss, text: TextConfig):
        super().__init__(loss.contrastive_loss, loss.aux_weight)
        self.coca, self.eot_id, self.pad_id = loss, text.eot_id, text.pad_id
        self.decoder_on = True  # a schedule (train.objectives.decoder.start) may keep the decoder off for a while

    def caption_rows(self, batch: int) -> int:
        return self.coca.caption_rows(batch) if self.decoder_on else 0

    def forward(self, module: nn.Module, batch: Batch, embed_only: bool = False, **model_kwargs: Any) -> ModelOutput:
        """The decoder reads the batch's ``decoder_tokens`` / ``decoder_targets`` when the data made them (LocCa's
        prompted tasks, mm/data/views.py), else the captions."""
        if embed_only:
            return module.embed(batch["images"], batch["tokens"])
        if "decoder_tokens" in batch:
            model_kwargs = {**model_kwargs, "decoder_tokens": batch["decoder_tokens"],
                            "decoder_targets": batch["decoder_targets"]}
        return module(batch["images"], batch["tokens"], caption_rows=self.caption_rows(batch["tokens"].shape[0]),
                      **model_kwargs)

    def local_terms(self, out: ModelOutput, batch: Batch) -> Terms:
        if not self.decoder_on:
            return _aux(out)
        if out.caption_logits is None or out.caption_labels is None:
            raise ValueError("the CoCa objective needs out.caption_logits and out.caption_labels (a CoCa model "
                             "called with images and tokens)")
        return {"caption_loss": caption_loss(out.caption_logits, out.caption_labels, self.coca.label_smoothing),
                **_aux(out)}

    def local_units(self, batch: Batch) -> dict[str, float]:
        """Caption tokens: how many labels the decoder's forward makes of the batch's caption rows (the positions
        up to the rows' longest sequence whose next token is real and, with decoder sequences, a target)."""
        tokens = batch["tokens"]
        units = {"aux_loss": float(tokens.shape[0])}
        rows = self.caption_rows(tokens.shape[0])
        if rows == 0:
            return units
        seqs = batch["decoder_tokens"][:rows] if "decoder_tokens" in batch else tokens[:rows]
        valid = text_valid_mask(seqs, eot_id=self.eot_id, pad_id=self.pad_id)
        n = int(valid.sum(1).max().clamp_min(2))
        predicts = valid[:, 1:n]
        if "decoder_tokens" in batch:
            predicts = predicts & batch["decoder_targets"][:rows, 1:n]
        return {"caption_loss": float(predicts.sum()), **units}

    def combine(self, terms: Terms) -> torch.Tensor | None:
        c = self.coca
        return weighted_sum(terms, [("contrastive_loss", c.contrastive_weight), ("caption_loss", c.caption_weight),
                                    ("aux_loss", c.aux_weight)])
