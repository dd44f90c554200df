"""A dense linear probe: how much of an image's layout the frozen patch features hold. A linear layer (multinomial
logistic regression, :func:`mm.eval.probe.fit_logistic`) on each patch's feature predicts the class of what covers the
patch, trained on one split's patches and scored on another's by mean intersection over union over the classes
(semantic segmentation's mIoU, at patch resolution) and patch accuracy.

Labels come from a per-pixel class map stored with each sample (``KEY.seg.png``, an 8-bit image: 0 = background,
``k`` = class ``k``; ``mm shards builtin --scenes`` writes one, ``seg_classes`` in its info.json names them). The map
goes through the same geometry as the image (the eval preprocessing, nearest-neighbour), and a patch's label is the
class most of its pixels have. Features are the image tower's patch tokens (``TowerOutput.tokens``, after the final
norm), so the model's pooling must keep patches (cls, mean, map; not CoCa's attentional pooler).
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.decode import BadSample, SampleDecoder
from ..data.transforms import _center_crop_or_pad
from ..data.wds import check_urls
from ..utils.nn import eval_mode, model_device
from ..utils.precision import autocast
from .config import ShardReading
from .probe import fit_logistic
from .runner import eval_batches

SEG_KEY = "seg.png"


class _WithSeg(SampleDecoder):
    """The eval decoder, plus each sample's class map through the same preprocessing (nearest) as ``seg``."""

    def __init__(self, transform: Any, **kwargs: Any):
        super().__init__(transform, **kwargs)
        self.seg_transform = _SegTransform(transform)

    def __call__(self, sample: dict[str, Any], rng: Any = None) -> dict[str, Any]:
        out = super().__call__(sample, rng)
        raw = sample.get(SEG_KEY)
        if raw is None:
            raise BadSample("no class map", f"missing {SEG_KEY!r}")
        seg = Image.open(io.BytesIO(raw))
        out["seg"] = torch.from_numpy(np.asarray(self.seg_transform(seg), dtype=np.int64).copy())
        return out


class _SegTransform:
    """The eval preprocessing's geometry for a class map: resize with nearest neighbour, centre crop / pad (pad =
    background), no normalisation."""

    def __init__(self, eval_transform: Any):
        self.t = eval_transform

    def __call__(self, seg: Image.Image) -> Image.Image:
        seg = seg.convert("L")
        size = self.t.resized_size(seg.width, seg.height)
        if size != seg.size:
            seg = seg.resize(size, Image.Resampling.NEAREST)
        return seg if self.t.resize_mode == "squash" else _center_crop_or_pad(seg, self.t.size)


def patch_labels(seg: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, H, W) class maps -> (B, (H / patch) * (W / patch)) the majority class of each patch, row-major (ties: the
    smaller class id)."""
    b, h, w = seg.shape
    gh, gw = h // patch, w // patch
    blocks = seg[:, : gh * patch, : gw * patch].reshape(b, gh, patch, gw, patch).permute(0, 1, 3, 2, 4)
    blocks = blocks.reshape(b, gh * gw, patch * patch)
    counts = torch.nn.functional.one_hot(blocks, int(seg.max()) + 1).sum(2)  # (B, P, classes)
    return counts.argmax(-1)


def seg_batches(model: Any, urls: list[str], *, batch_size: int = 64, reading: ShardReading = ShardReading(),
                max_samples: int | None = None) -> Iterator[dict[str, Any]]:
    """Batches of ``images`` (eval preprocessing) and ``seg`` (class maps, the same geometry): the eval reader's
    (:func:`mm.eval.runner.eval_batches`), in its order (several workers interleave a shard's samples)."""
    return eval_batches(model, urls, (), batch_size=batch_size, reading=reading, max_samples=max_samples,
                        decoder_class=_WithSeg)


@torch.no_grad()
def patch_features(model: Any, shards: str | list[str], *, max_samples: int | None = None, batch_size: int = 64,
                   precision: str = "fp32", reading: ShardReading = ShardReading(), what: str = "shards"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (n_images, P, D) float32, labels (n_images, P))``: the frozen image tower's patch tokens and each
    patch's majority class."""
    vision = getattr(model, "vision", None)
    if vision is None or getattr(vision.cfg, "pool", None) == "attn":
        raise ValueError("a dense probe reads the image tower's patch tokens: the model has none (an attentional "
                         "pooler hands on pooled queries instead)")
    device = model_device(model)
    urls = check_urls(shards, what)
    feats, labels = [], []
    with eval_mode(model):
        for b in seg_batches(model, urls, batch_size=batch_size, reading=reading, max_samples=max_samples):
            with autocast(device, precision):
                tokens = vision(b["images"].to(device)).tokens
            feats.append(tokens.float().cpu())
            labels.append(patch_labels(b["seg"], vision.cfg.patch_size))
    if not feats:
        raise ValueError(f"{what}: no sample with an image and a class map")
    x, y = torch.cat(feats), torch.cat(labels)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"the tower gives {x.shape[1]} patch tokens but the class maps {y.shape[1]} patches")
    return x, y


def miou(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> tuple[float, list[float | None]]:
    """Mean IoU over the classes present in ``target`` or ``pred`` (None for a class in neither), and the per-class
    list."""
    per: list[float | None] = []
    for c in range(n_classes):
        p, t = pred == c, target == c
        union = int((p | t).sum())
        per.append(int((p & t).sum()) / union if union else None)
    present = [v for v in per if v is not None]
    return (sum(present) / len(present) if present else 0.0), per


def dense_probe(model: Any, train: str | list[str], test: str | list[str], *, n_classes: int | None = None,
                max_train: int | None = 1000, max_test: int | None = 500, weight_decay: float = 1e-4,
                max_iter: int = 300, batch_size: int = 64, precision: str = "fp32",
                reading: ShardReading = ShardReading()) -> dict[str, Any]:
    """Fit the probe on ``train``'s patches (the first ``max_train`` images), score ``test``'s: ``dense_miou``,
    ``dense_acc`` (patch accuracy), ``dense_iou`` (per class), ``n_train`` / ``n_test`` (patches); ``W`` / ``b`` the
    probe (apply with :func:`predict`)."""
    xtr, ytr = patch_features(model, train, max_samples=max_train, batch_size=batch_size, precision=precision,
                              reading=reading, what="train")
    xte, yte = patch_features(model, test, max_samples=max_test, batch_size=batch_size, precision=precision,
                              reading=reading, what="test")
    n_classes = n_classes or int(max(ytr.max(), yte.max())) + 1
    W, b = fit_logistic(xtr.flatten(0, 1), ytr.flatten(), n_classes, weight_decay, max_iter=max_iter)
    pred = predict(xte, W, b)
    m, per = miou(pred.flatten(), yte.flatten(), n_classes)
    return {"dense_miou": m, "dense_acc": (pred == yte).double().mean().item(), "dense_iou": per,
            "n_train": int(ytr.numel()), "n_test": int(yte.numel()), "W": W, "b": b}


def predict(features: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The probe's class per patch: (..., D) -> (...)."""
    return (features.double() @ W + b).argmax(-1)
