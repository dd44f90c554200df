"""Captioning evaluation: generate a caption per image and score the set against reference captions
(BLEU-4 and CIDEr-D as the COCO caption toolkit defines them), and, for images whose json records what they
show (the built-in shapes: colour, shape, size, position), the fraction of captions that state each right."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..data.synthetic import ATTRIBUTES, attribute_accuracy
from ..inference.generate import GenerationConfig, generate
from ..utils.precision import autocast
from .caption_metrics import caption_scores


def caption_eval(
    model,
    tok,
    batches: Iterable[tuple[torch.Tensor, list[list[str]], list[str], list[dict[str, Any]] | None]],
    generation: GenerationConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """``batches`` yield (images, references per image, keys, each image's json or None). Returns
    ``caption_bleu1..4``, ``caption_cider``, ``caption_n``, ``captions`` (a list of {key, caption, references,
    and the image's attributes when its json has them}) and, when every image's json records the built-in set's
    attributes, ``caption_attr_color`` / ``_shape`` / ``_size`` / ``_position`` / ``_all``
    (:func:`mm.data.synthetic.attribute_accuracy`)."""
    eot = model.config.text.eot_id
    device = torch.device(device)
    rows: list[dict[str, Any]] = []
    for images, refs, keys, infos in batches:
        with autocast(device, autocast_dtype):
            ids = generate(model, images.to(device), generation)
        for i, (row, r, key) in enumerate(zip(ids.tolist(), refs, keys)):
            row = row[: row.index(eot)] if eot in row else row
            rows.append({"key": key, "caption": tok.decode(row), "references": list(r)})
            info = infos[i] if infos is not None else {}
            if all(a in info for a in ATTRIBUTES):
                rows[-1]["attributes"] = {a: info[a] for a in ATTRIBUTES}
    if not rows:
        raise ValueError("captioning evaluation got no samples")
    scores = caption_scores([r["caption"] for r in rows], [r["references"] for r in rows])
    out = {**{f"caption_{k}": v for k, v in scores.items()}, "caption_n": len(rows), "captions": rows}
    if all("attributes" in r for r in rows):
        acc = attribute_accuracy([r["caption"] for r in rows], [r["attributes"] for r in rows])
        out.update({f"caption_attr_{k}": v for k, v in acc.items()})
    return out
