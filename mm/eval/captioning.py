"""Captioning evaluation: generate a caption per image and score the set against reference captions
(BLEU-4 and CIDEr-D as the COCO caption toolkit defines them)."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..inference.generate import GenerationConfig, generate
from ..utils.precision import autocast
from .caption_metrics import caption_scores


def caption_eval(
    model,
    tok,
    batches: Iterable[tuple[torch.Tensor, list[list[str]], list[str]]],
    generation: GenerationConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """``batches`` yield (images, references per image, keys). Returns ``caption_bleu1..4``,
    ``caption_cider``, ``caption_n`` and ``captions``: a list of {key, caption, references}."""
    eot = model.config.text.eot_id
    device = torch.device(device)
    rows: list[dict[str, Any]] = []
    for images, refs, keys in batches:
        with autocast(device, autocast_dtype):
            ids = generate(model, images.to(device), generation)
        for row, r, key in zip(ids.tolist(), refs, keys):
            row = row[: row.index(eot)] if eot in row else row
            rows.append({"key": key, "caption": tok.decode(row), "references": list(r)})
    if not rows:
        raise ValueError("captioning evaluation got no samples")
    scores = caption_scores([r["caption"] for r in rows], [r["references"] for r in rows])
    return {**{f"caption_{k}": v for k, v in scores.items()}, "caption_n": len(rows), "captions": rows}
