"""Retrieval-augmented captioning's decoder sequences (SmallCap, Ramos et al. 2023): the decoder reads the captions a
datastore returned for the image before writing its own.

sequence (``|``: where the prompt ends; the loss is on the caption after it)::

    sot similar images show: CAPTION_1 *** CAPTION_2 *** ... CAPTION_k . this image shows: | caption eot

With k = 0 the prompt is ``sot`` alone: the sequence, and so the decoder's loss and its captions, are exactly a plain
CoCa's. The retrieved captions are truncated, each to an equal share of the room the context leaves after the
caption (at most ``caption_tokens`` of it), so a sequence always fits; their order is the datastore's ranking.

For training, what each sample retrieved is computed once before the run (``mm retrieve``: deterministic, the
sample's own captions excluded) and read here by sample key from a JSON-lines file (``{"key": ..., "captions":
[...]}``), so data workers do no search and a resumed run reads exactly the same prompts.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .decode import BadSample, SampleDecoder

PROMPT_HEAD, PROMPT_SEP, PROMPT_TAIL = "similar images show:", "***", ". this image shows:"


class RetrievalPrompts:
    """Builds retrieval-augmented sequences with a tokenizer (``encode``, ``sot_id``, ``eot_id``) at a context
    length; picklable (the data workers build them). ``k``: retrieved captions a prompt holds (0: none, plain
    captioning); ``caption_tokens``: the most a target caption may take of the context."""

    def __init__(self, tokenizer: Any, context_length: int, k: int, caption_tokens: int = 30):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.tok, self.context_length, self.k = tokenizer, context_length, k
        self.caption_tokens = min(caption_tokens, context_length - 2)
        self.head, self.sep, self.tail = (tokenizer.encode(t) for t in (PROMPT_HEAD, PROMPT_SEP, PROMPT_TAIL))
        fixed = 1 + len(self.head) + len(self.tail) + len(self.sep) * max(k - 1, 0)
        self.per_caption = (context_length - 1 - self.caption_tokens - fixed) // k if k else 0
        if k and self.per_caption < 1:
            raise ValueError(f"a context of {context_length} tokens has no room for {k} retrieved captions beside a "
                             f"caption of {self.caption_tokens}: raise the model's text.context_length or lower k")

    def prompt(self, retrieved: Sequence[str]) -> list[int]:
        """``sot`` and, with k > 0, the first k ``retrieved`` captions in the template: what the decoder continues."""
        if not self.k:
            return [self.tok.sot_id]
        if len(retrieved) < self.k:
            raise ValueError(f"{len(retrieved)} retrieved captions, the prompt holds {self.k}")
        ids = [self.tok.sot_id, *self.head]
        for i, cap in enumerate(retrieved[: self.k]):
            ids += (self.sep if i else []) + self.tok.encode(cap)[: self.per_caption]
        return ids + self.tail

    def sequence(self, retrieved: Sequence[str], caption: str) -> tuple[list[int], list[bool]]:
        """``(ids, targets)``: the prompt, then the caption and eot, which alone are targets."""
        prompt = self.prompt(retrieved)
        words = self.tok.encode(caption)[: min(self.caption_tokens, self.context_length - len(prompt) - 1)]
        return prompt + words + [self.tok.eot_id], [False] * len(prompt) + [True] * (len(words) + 1)

    def tensors(self, ids: list[int], targets: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, targets)`` (context_length,), padded with 0 / False."""
        tokens = torch.zeros(self.context_length, dtype=torch.long)
        mask = torch.zeros(self.context_length, dtype=torch.bool)
        tokens[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[: len(targets)] = torch.tensor(targets, dtype=torch.bool)
        return tokens, mask


def read_retrieved(path: str | Path, k: int) -> dict[str, list[str]]:
    """{sample key: its retrieved captions} of an ``mm retrieve`` output; ValueError naming the file and line of a
    malformed entry, or of one with fewer than ``k`` captions."""
    path = Path(path)
    found: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, caps = row["key"], row["captions"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected {{\"key\": ..., \"captions\": [...]}}") from None
            if not isinstance(caps, list) or len(caps) < k or not all(isinstance(c, str) for c in caps):
                raise ValueError(f"{path}:{n}: sample {key!r} has {len(caps) if isinstance(caps, list) else 0} "
                                 f"retrieved captions, k is {k}")
            found[str(key)] = caps
    return found


class RetrievalDecoder(SampleDecoder):
    """A SampleDecoder whose samples also carry ``decoder_tokens`` / ``decoder_targets``: the retrieval-augmented
    sequence of the sample's caption, with the captions ``retrieved`` (a JSON-lines path, read once per worker)
    holds for its key. A sample the file does not hold is skipped and counted (``no retrieved captions``)."""

    def __init__(self, transform: Any, prompts: RetrievalPrompts, retrieved: str | Path, **kwargs: Any):
        super().__init__(transform, **kwargs)
        self.prompts, self.path = prompts, str(retrieved)
        self._found: dict[str, list[str]] | None = None

    def __getstate__(self) -> dict[str, Any]:  # workers read the file themselves, not a pickled copy
        return {**self.__dict__, "_found": None}

    def __call__(self, sample: dict[str, Any], rng: random.Random | None = None) -> dict[str, Any]:
        if self._found is None:
            self._found = read_retrieved(self.path, self.prompts.k)
        caps = self._found.get(sample.get("__key__")) if self.prompts.k else []
        if caps is None:
            raise BadSample("no retrieved captions", f"key {sample.get('__key__')!r} is not in {self.path}")
        out = super().__call__(sample, rng)
        out["decoder_tokens"], out["decoder_targets"] = self.prompts.tensors(*self.prompts.sequence(caps, out["text"]))
        return out
