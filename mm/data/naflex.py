"""The token-budget batch schedule of NaFlex training (open_clip's ``--naflex-seq-lens`` /
``--naflex-max-tokens-per-batch``, timm's NaFlex loader): each batch draws one sequence length from a set and holds
as many images as the budget allows, ``max_tokens // seq_len``, so every step costs about the same.

The draw is a pure function of (seed, batch index): every rank takes the same schedule (its own samples, the same
shapes, so no rank waits on another's longer sequences), every worker knows the lengths of the batches it makes,
and a resumed run continues the schedule where it stopped with nothing to store beyond the batch count. Padding
each batch to its drawn length keeps the tensor shapes to one per length (a compiled graph each).
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenBudget:
    seq_lens: tuple[int, ...]
    max_tokens: int
    seed: int = 0

    def __post_init__(self):
        if not self.seq_lens or any(n < 1 for n in self.seq_lens):
            raise ValueError(f"sequence lengths must be positive, got {list(self.seq_lens)}")
        if self.max_tokens < max(self.seq_lens):
            raise ValueError(f"a budget of {self.max_tokens} tokens is smaller than one image of "
                             f"{max(self.seq_lens)} patches")

    def at(self, batch: int) -> tuple[int, int]:
        """(batch size, sequence length) of the process's ``batch``-th batch (counted from the run's start)."""
        seq_len = random.Random(hash((self.seed, batch, 0x5EC)) & 0xFFFFFFFFFFFF).choice(self.seq_lens)
        return self.max_tokens // seq_len, seq_len
