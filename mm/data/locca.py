"""LocCa's decoder sequences (Wan et al. 2024, the decoder of SigLIP 2): one captioning decoder, three tasks told
apart by their prompt, boxes written as quantised coordinate tokens.

========== ======================================================== ===============================
task       sequence (``|`` = where the prompt ends)                  trained on (the targets)
========== ======================================================== ===============================
caption    ``sot | caption eot``                                    the caption and ``eot``
referring  ``sot locate: expression | x0 y0 x1 y1 eot``             the four box tokens and ``eot``
grounded   ``sot describe: x0 y0 x1 y1 | caption eot``              the region's caption and ``eot``
========== ======================================================== ===============================

A plain caption has no prompt, so a LocCa model captions as a CoCa model does (``mm caption``). The box tokens are
the last ``decoder.loc_bins`` ids of the text vocabulary (:class:`LocTokens`): the model's text embedding and LM
head have a row for each, and ``x0`` is the token of bin ``floor(x0 / width * bins)`` (:func:`mm.data.regions.
quantize`). The prompts' words go through the model's own tokenizer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .regions import Box, dequantize, quantize

TASKS = ("caption", "referring", "grounded")
REFERRING_PREFIX = "locate:"
GROUNDED_PREFIX = "describe:"


@dataclass(frozen=True)
class LocTokens:
    """The box tokens: ids ``base .. base + bins - 1`` (the last ``bins`` ids of the text vocabulary)."""

    base: int
    bins: int

    @classmethod
    def of(cls, model_config: Any) -> LocTokens:
        """A model's (its ``decoder.loc_bins``); ValueError naming the key when it has none."""
        dec = getattr(model_config, "decoder", None)
        bins = dec.loc_bins if dec is not None else 0
        if not bins:
            raise ValueError("decoder.loc_bins: the model has no box tokens (a decoder with loc_bins > 0 is needed "
                             "to read or write boxes)")
        return cls(model_config.text.vocab_size - bins, bins)

    def ids(self) -> range:
        return range(self.base, self.base + self.bins)

    def encode(self, box: Box, width: float, height: float) -> list[int]:
        return [self.base + b for b in quantize(box, width, height, self.bins)]

    def decode(self, ids: Sequence[int], width: float, height: float) -> Box:
        bins4 = [int(i) - self.base for i in ids]
        if len(bins4) != 4 or not all(0 <= b < self.bins for b in bins4):
            raise ValueError(f"not four box tokens of {self.base}..{self.base + self.bins - 1}: {list(ids)}")
        return dequantize(bins4, width, height, self.bins)


class DecoderPrompts:
    """Builds the three tasks' sequences with a tokenizer (``encode``, ``sot_id``, ``eot_id``) at a context length;
    picklable, so the data workers build them. Each builder returns ``(ids, targets)``: the ids without padding and,
    per position, whether that token is a target (the decoder's loss is on the targets only); a sequence that does
    not fit drops words of its text (the expression or caption), never box tokens or ``eot``."""

    def __init__(self, tokenizer: Any, loc: LocTokens, context_length: int):
        self.tok, self.loc, self.context_length = tokenizer, loc, context_length
        self._prefix = {"referring": tokenizer.encode(REFERRING_PREFIX), "grounded": tokenizer.encode(GROUNDED_PREFIX)}

    def _words(self, text: str, room: int) -> list[int]:
        return self.tok.encode(text)[: max(room, 0)]

    def caption(self, text: str) -> tuple[list[int], list[bool]]:
        words = self._words(text, self.context_length - 2)
        return [self.tok.sot_id, *words, self.tok.eot_id], [False] + [True] * (len(words) + 1)

    def referring_prompt(self, expression: str) -> list[int]:
        """``sot locate: expression``: what the decoder continues with the four box tokens."""
        head = [self.tok.sot_id, *self._prefix["referring"]]
        return head + self._words(expression, self.context_length - len(head) - 5)

    def referring(self, expression: str, box: Box, width: float, height: float) -> tuple[list[int], list[bool]]:
        prompt = self.referring_prompt(expression)
        return prompt + self.loc.encode(box, width, height) + [self.tok.eot_id], [False] * len(prompt) + [True] * 5

    def grounded_prompt(self, box: Box, width: float, height: float) -> list[int]:
        """``sot describe: x0 y0 x1 y1``: what the decoder continues with the region's caption."""
        return [self.tok.sot_id, *self._prefix["grounded"], *self.loc.encode(box, width, height)]

    def grounded(self, box: Box, width: float, height: float, caption: str) -> tuple[list[int], list[bool]]:
        prompt = self.grounded_prompt(box, width, height)
        words = self._words(caption, self.context_length - len(prompt) - 1)
        return prompt + words + [self.tok.eot_id], [False] * len(prompt) + [True] * (len(words) + 1)

    def batch(self, rows: Sequence[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, targets)``: (B, context_length) ids padded with 0 and the bool target mask."""
        tokens = torch.zeros(len(rows), self.context_length, dtype=torch.long)
        targets = torch.zeros(len(rows), self.context_length, dtype=torch.bool)
        for i, (ids, tgt) in enumerate(rows):
            if len(ids) > self.context_length:
                raise ValueError(f"decoder sequence of {len(ids)} tokens exceeds the context ({self.context_length})")
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            targets[i, : len(tgt)] = torch.tensor(tgt, dtype=torch.bool)
        return tokens, targets
