"""clip_benchmark's ``linear_probe`` task (LAION clip_benchmark 1.6.2, ``metrics/linear_probe.py``) on image
features the caller has already computed, step for step, so that its numbers equal clip_benchmark's.

Replicated: the few-shot selection (a ``torch.randperm`` of the training set, the first ``k`` of each class in
that order; with ``fewshot_k < 0`` the whole set, in that order); ``train()``: ``torch.manual_seed(seed)``, a
``Linear`` initialised on the CPU, ``AdamW(lr, weight_decay)``, cross-entropy, the cosine learning rate without
warmup over ``epochs * batches`` steps set before each step, and per epoch the order in which
``DataLoader(shuffle=True, batch_size)`` visits the set (its iterator draws a base seed from the global RNG, then
``RandomSampler`` draws a seed for a generator of its own and takes its ``randperm``; batches of ``batch_size``,
the last one partial); each evaluation also in a shuffled loader's batches (clip_benchmark shuffles its val and
test loaders too), so every logit is computed in the batch it is computed in there; the weight-decay search on
the val split (``logspace(-6, 2, 97)``, first its 7 points of ``logspace(-6, 2, 7)``, then the peak and its
neighbours at distances 8, 4, 2, 1, a point winning only on strictly higher val top-1); without a val split weight
decay 0; the final probe on train + val when ``fewshot_k < 0`` (few-shot: the few-shot train set alone); its metrics
(top-1, top-5 as NaN when the largest test label is below 5, sklearn's ``balanced_accuracy_score`` of the argmax).
A weight decay is trained once and its val accuracy remembered: each training reseeds the RNG, so clip_benchmark's
retraining of the peak gives the same model again.

The one deliberate difference: clip_benchmark seeds the global RNG once at startup and its ``randperm`` runs
after loading the model and featurizing the data have consumed an unknowable number of draws; here the RNG is
seeded with ``seed`` right before the ``randperm``. (clip_benchmark run with ``torch.manual_seed(seed)`` called
just before ``linear_probe.evaluate`` on cached features gives the same numbers as this function.) The caller's
global RNG state is left as it was.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.precision import autocast

__all__ = ["linear_probe", "mean_per_class_recall", "WEIGHT_DECAYS"]

WEIGHT_DECAYS: list[float] = np.logspace(-6, 2, num=97).tolist()  # clip_benchmark's grid, computed as it does
_INITIAL = np.logspace(-6, 2, num=7).tolist()


def linear_probe(train_x: Any, train_y: Any, test_x: Any, test_y: Any, val_x: Any = None, val_y: Any = None, *,
                 fewshot_k: int = -1, lr: float = 0.1, epochs: int = 10, batch_size: int = 64, seed: int = 0,
                 device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                 normalized: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """clip_benchmark's linear-probe metrics of features ``(N, D)`` and labels ``(N,)`` (tensors or arrays):
    ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``, ``weight_decay``, ``epochs``, ``seed``, ``fewshot_k``,
    ``normalized`` (reported as given: the caller says whether its features are L2-normalised). The classes are
    ``0 .. max(train_y)``. ``autocast_dtype`` (e.g. ``torch.float16``, clip_benchmark's ``--amp`` on CUDA): the
    forward passes under autocast; None: float32. ``log`` receives a line per weight decay tried:
    ``linear probe: val top-1 ACC at weight decay WD``."""
    train_x, train_y, test_x, test_y, val_x, val_y = _checked(train_x, train_y, test_x, test_y, val_x, val_y)
    _check_settings(fewshot_k, lr, epochs, batch_size)
    num_classes = int(train_y.max()) + 1
    fit = dict(num_classes=num_classes, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
               autocast_dtype=autocast_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        idxs = _fewshot_indices(train_y, fewshot_k)
        train_x, train_y = train_x[idxs], train_y[idxs]
        weight_decay: float = 0  # an int 0 without a val split, as clip_benchmark writes it
        if val_x is not None:
            weight_decay = _search_weight_decay(train_x, train_y, val_x, val_y, fit, log)
            if fewshot_k < 0:
                train_x, train_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
        model = _train(train_x, train_y, weight_decay, **fit)
        logits, target = _infer(model, test_x, test_y, batch_size, device, autocast_dtype)
    if int(target.max()) >= 5:
        acc1, acc5 = _accuracy(logits.float(), target, (1, 5))
    else:
        (acc1,), acc5 = _accuracy(logits.float(), target, (1,)), float("nan")
    return {"lp_acc1": acc1, "lp_acc5": acc5,
            "lp_mean_per_class_recall": mean_per_class_recall(target, logits.argmax(dim=1)),
            "weight_decay": weight_decay, "epochs": epochs, "seed": seed, "fewshot_k": fewshot_k,
            "normalized": normalized}


def mean_per_class_recall(target: Any, pred: Any) -> float:
    """Balanced accuracy: the mean, over the classes present in ``target``, of each class's recall (sklearn's
    ``balanced_accuracy_score``, summed in the same order: classes ascending, numpy's mean)."""
    t, p = np.asarray(target), np.asarray(pred)
    recalls = np.array([np.count_nonzero(p[t == c] == c) / np.count_nonzero(t == c) for c in np.unique(t)])
    return float(np.mean(recalls))


# -- clip_benchmark's procedure ------------------------------------------------------------------
def _fewshot_indices(train_y: torch.Tensor, fewshot_k: int) -> torch.Tensor:
    """The training indices kept: a ``randperm`` of the set, of which the first ``fewshot_k`` of each class."""
    perm = torch.randperm(len(train_y))
    if fewshot_k < 0:
        return perm
    counts: dict[int, int] = {}
    idxs = []
    for p, c in zip(perm.tolist(), train_y[perm].tolist()):
        if counts.get(c, 0) < fewshot_k:
            counts[c] = counts.get(c, 0) + 1
            idxs.append(p)
    short = {c: n for c, n in sorted(counts.items()) if n < fewshot_k}
    if short:
        c, n = next(iter(short.items()))
        raise ValueError(f"fewshot_k={fewshot_k} is more than the {n} training sample(s) of class {c}"
                         + (f" ({len(short)} classes have fewer than {fewshot_k})" if len(short) > 1 else ""))
    return torch.tensor(idxs, dtype=torch.long)


def _loader_batches(n: int, batch_size: int, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """The index batches of one pass of ``DataLoader(shuffle=True, batch_size=batch_size)`` over ``n`` items, with
    the global RNG draws it makes: the iterator's base seed (``_BaseDataLoaderIter``), then ``RandomSampler``'s
    seed of its own generator (its first ``next``; the same order with loader workers)."""
    torch.empty((), dtype=torch.int64).random_()
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device).split(batch_size)


def _cosine_lr(base_lr: float, step: int, steps: int) -> float:
    """clip_benchmark's ``cosine_lr`` with warmup 0, the same arithmetic (numpy's cosine)."""
    e, es = step - 0.0, steps - 0.0
    return 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr


@torch.enable_grad()  # callers may hold no_grad (mm benchmark runs tasks under eval_mode)
def _train(x: torch.Tensor, y: torch.Tensor, weight_decay: float, *, num_classes: int, lr: float, epochs: int,
           batch_size: int, seed: int, device: str | torch.device, autocast_dtype: torch.dtype | None,
           ) -> torch.nn.Linear:
    torch.default_generator.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], num_classes).to(device)  # initialised on the CPU, as clip_benchmark does
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    x, y = x.to(device), y.to(device)
    per_epoch = math.ceil(len(x) / batch_size)
    for epoch in range(epochs):
        for i, idx in enumerate(_loader_batches(len(x), batch_size, x.device)):
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(lr, i + epoch * per_epoch, epochs * per_epoch)
            optimizer.zero_grad()
            with autocast(device, autocast_dtype):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
    return model


@torch.no_grad()
def _infer(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str | torch.device,
           autocast_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels (CPU) in the order of a shuffled loader over ``x``, each batch as that loader makes it."""
    batches = _loader_batches(len(x), batch_size)
    logits = []
    for idx in batches:
        with autocast(device, autocast_dtype):
            logits.append(model(x[idx].to(device)).cpu())
    return torch.cat(logits), y[torch.cat(batches)]


def _accuracy(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...]) -> list[float]:
    """clip_benchmark's top-k accuracy (``topk`` of the logits: its tie-breaking)."""
    pred = logits.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def _search_weight_decay(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                         fit: dict[str, Any], log: Callable[[str], None] | None) -> float:
    """clip_benchmark's search: the best of the 7 initial points, then of [peak - s, peak, peak + s] for s = 8, 4,
    2, 1 (clipped to the grid); a point replaces the peak only with strictly higher val top-1."""
    val_acc: dict[int, float] = {}

    def find_peak(idxs: list[int]) -> int:
        best, max_acc = 0, 0.0
        for i in idxs:
            if i not in val_acc:
                model = _train(train_x, train_y, WEIGHT_DECAYS[i], **fit)
                logits, target = _infer(model, val_x, val_y, fit["batch_size"], fit["device"], fit["autocast_dtype"])
                val_acc[i] = _accuracy(logits.float(), target, (1,))[0]
                if log is not None:
                    log(f"linear probe: val top-1 {val_acc[i]} at weight decay {WEIGHT_DECAYS[i]}")
            if max_acc < val_acc[i]:
                best, max_acc = i, val_acc[i]
        return best

    peak = find_peak([i for i, wd in enumerate(WEIGHT_DECAYS) if wd in _INITIAL])
    for span in (8, 4, 2, 1):
        peak = find_peak([max(peak - span, 0), peak, min(peak + span, len(WEIGHT_DECAYS) - 1)])
    return WEIGHT_DECAYS[peak]


# -- inputs --------------------------------------------------------------------------------------
def _checked(train_x: Any, train_y: Any, test_x: Any, test_y: Any, val_x: Any, val_y: Any) -> tuple:
    """Features as float32 ``(N, D)`` and labels as int64 ``(N,)`` CPU tensors; ValueError naming what is wrong."""
    if (val_x is None) != (val_y is None):
        raise ValueError("linear probe: give both val_x and val_y, or neither")
    out: list[torch.Tensor | None] = []
    dim = None
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y), ("val", val_x, val_y)):
        if x is None:
            out += [None, None]
            continue
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.ndim != 2 or not x.is_floating_point():
            raise ValueError(f"linear probe: {name} features must be a 2-D float array (N, D), got "
                             f"shape {tuple(x.shape)} {x.dtype}")
        if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"linear probe: {name} labels must be a 1-D integer array, got shape {tuple(y.shape)} "
                             f"{y.dtype}")
        if len(x) != len(y):
            raise ValueError(f"linear probe: {len(x)} {name} features but {len(y)} {name} labels")
        if len(x) == 0:
            raise ValueError(f"linear probe: the {name} split is empty")
        if dim is not None and x.shape[1] != dim:
            raise ValueError(f"linear probe: {name} features have dimension {x.shape[1]}, train features {dim}")
        dim = x.shape[1]
        if int(y.min()) < 0:
            raise ValueError(f"linear probe: {name} label {int(y.min())} is negative")
        if out and int(y.max()) > int(out[1].max()):
            raise ValueError(f"linear probe: {name} label {int(y.max())} is out of range: the train labels "
                             f"(which define the classes) go up to {int(out[1].max())}")
        out += [x.detach().cpu().float(), y.detach().cpu().long()]
    return tuple(out)


def _check_settings(fewshot_k: int, lr: float, epochs: int, batch_size: int) -> None:
    if fewshot_k == 0:
        raise ValueError("linear probe: fewshot_k must be a positive number of samples per class, or -1 (all)")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"linear probe: epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    if not lr > 0:
        raise ValueError(f"linear probe: lr must be positive, got {lr}")
