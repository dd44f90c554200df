"""Referring evaluation of a LocCa model: ground each region's caption (its referring expression) in its image and
score the box against the region's own (:func:`mm.inference.ground.locate`, :func:`mm.data.regions.iou`).

Regions come from each sample's json (``{"regions": [{"box": [x0, y0, x1, y1], "caption": ...}]}``, boxes in pixels
of the stored image, :func:`mm.data.regions.parse_regions`); a region that breaks a rule is counted in
``bad_regions`` and left out, a sample without regions contributes none. The shards are read as
:func:`mm.eval.runner.eval_batches` (with a decoder that adds one thing: each image's stored size, which a region's box is in and which the model's box is mapped back to).
"""
from __future__ import annotations

from typing import Any

import torch

from ..data.decode import SampleDecoder
from ..data.regions import iou, parse_regions
from ..data.wds import check_urls
from ..inference.ground import box_tokens, locate
from ..utils.nn import eval_mode
from .config import ShardReading
from .runner import eval_batches


class _SizedDecoder(SampleDecoder):
    """The eval decoder, keeping each decoded image's stored ``size`` (width, height) beside it."""

    def image_fields(self, img: Any, out: dict[str, Any], rng: Any) -> dict[str, Any]:
        return {**super().image_fields(img, out, rng), "size": torch.tensor(img.size)}


def referring_accuracy(model: Any, tok: Any, shards: str | list[str], *, max_samples: int | None = None,
                       batch_size: int = 32, device: torch.device | str | None = None, threshold: float = 0.5,
                       reading: ShardReading = ShardReading(), what: str = "shards") -> dict[str, Any]:
    """``referring_acc`` (the fraction of regions whose grounded box has IoU > ``threshold`` with theirs),
    ``referring_miou`` (mean IoU), ``regions`` (scored), ``bad_regions`` (left out, each a rule it broke),
    ``skipped`` (samples the reader could not use) over the first ``max_samples`` samples of ``shards``
    (``what`` names them in errors). A ValueError when no region is left to score."""
    box_tokens(model)  # a model without box tokens fails before reading any shard
    urls = check_urls(shards, what)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ious: list[float] = []
    bad, skipped = 0, [0]

    def count(meta: dict[str, Any]) -> None:
        skipped[0] += sum(meta["skipped"].values())

    with eval_mode(model):
        for b in eval_batches(model, urls, ("info",), batch_size=batch_size, reading=reading, max_samples=max_samples,
                              on_meta=count, decoder_class=_SizedDecoder):
            sizes_all = [tuple(s) for s in b["size"].tolist()]
            rows, expressions, targets = [], [], []
            for i, (info, (w, h)) in enumerate(zip(b["infos"], sizes_all)):
                regions, problems = parse_regions(info, w, h)
                bad += len(problems)
                for r in regions:
                    rows.append(i)
                    expressions.append(r.caption)
                    targets.append(r.box)
            if not rows:
                continue
            images = b["images"][torch.tensor(rows)]
            sizes = [sizes_all[i] for i in rows]
            found = locate(model, tok, images, expressions, batch_size=batch_size, device=device, sizes=sizes)
            ious += [iou(f.box, t) for f, t in zip(found, targets)]
    if not ious:
        raise ValueError(f"{what}: no valid region to score ({bad} bad regions, {skipped[0]} samples skipped)")
    return {"referring_acc": sum(v > threshold for v in ious) / len(ious), "referring_miou": sum(ious) / len(ious),
            "regions": len(ious), "bad_regions": bad, "skipped": skipped[0]}
