"""Referring evaluation of a LocCa model: ground each region's caption (its referring expression) in its image and
score the box against the region's own (:func:`mm.inference.ground.locate`, :func:`mm.data.regions.iou`).

Regions come from each sample's json (``{"regions": [{"box": [x0, y0, x1, y1], "caption": ...}]}``, boxes in pixels
of the stored image, :func:`mm.data.regions.parse_regions`); a region that breaks a rule is counted in
``bad_regions`` and left out, a sample without regions contributes none. The shards are read as
:func:`mm.eval.runner.eval_batches` reads them (the same decoder, stream and eval preprocessing), with one thing
added: each image's stored size, which a region's box is in and which the model's box is mapped back to.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..data.decode import SampleDecoder
from ..data.regions import iou, parse_regions
from ..data.transforms import image_transform
from ..data.wds import Collate, ShardStream, check_urls, make_loader
from ..inference.ground import box_tokens, locate
from ..utils.nn import eval_mode
from .config import ShardReading


class _Sized:
    """The eval transform, keeping the decoded image's (width, height) beside the tensor (picklable: workers)."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, img: Any, rng: Any = None) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.transform(img, rng), img.size


class _SizedCollate(Collate):
    """:class:`~mm.data.wds.Collate` of :class:`_Sized` items, plus ``sizes``."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        sizes = [it["image"][1] for it in items]
        out = super().__call__([{**it, "image": it["image"][0]} for it in items])
        out["sizes"] = sizes
        return out


def region_batches(model: Any, urls: list[str], *, batch_size: int, reading: ShardReading = ShardReading(),
                   max_samples: int | None = None) -> Iterator[dict[str, Any]]:
    """Batches of ``images`` (eval preprocessing), ``infos`` (each sample's json), ``sizes`` (stored width, height)
    and ``keys``, in shard order, with ``meta`` (samples skipped) as the eval reader reports it."""
    decoder = SampleDecoder(_Sized(image_transform(model, train=False)), image_keys=list(reading.image_keys),
                            text_key=reading.text_key, need=("info",), max_pixels=reading.max_pixels)
    stream = ShardStream(urls, decoder, _SizedCollate(), batch_size, train=False, max_samples=max_samples)
    yield from make_loader(stream, reading.workers, reading.prefetch_factor)


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
    bad = skipped = 0
    with eval_mode(model):
        for b in region_batches(model, urls, batch_size=batch_size, reading=reading, max_samples=max_samples):
            skipped += sum(b["meta"]["skipped"].values())
            if "images" not in b:
                continue
            rows, expressions, targets = [], [], []
            for i, (info, (w, h)) in enumerate(zip(b["infos"], b["sizes"])):
                regions, problems = parse_regions(info, w, h)
                bad += len(problems)
                for r in regions:
                    rows.append(i)
                    expressions.append(r.caption)
                    targets.append(r.box)
            if not rows:
                continue
            images = b["images"][torch.tensor(rows)]
            sizes = [b["sizes"][i] for i in rows]
            found = locate(model, tok, images, expressions, batch_size=batch_size, device=device, sizes=sizes)
            ious += [iou(f.box, t) for f, t in zip(found, targets)]
    if not ious:
        raise ValueError(f"{what}: no valid region to score ({bad} bad regions, {skipped} samples skipped)")
    return {"referring_acc": sum(v > threshold for v in ious) / len(ious), "referring_miou": sum(ious) / len(ious),
            "regions": len(ious), "bad_regions": bad, "skipped": skipped}
