"""Linear probes (``mm probe``): multinomial logistic regression on a frozen model's L2-normalised image
embeddings, the CLIP paper's recipe.

The regularisation strength is chosen on a validation split carved from the training set (a seeded random
``val_fraction`` of it): a grid of weight decays, each fitted on the rest, the best validation top-1 wins
(ties: the stronger regularisation), then the probe is refitted with it on the whole training set and
scored on the test set. Fitting is full-batch L-BFGS (strong-Wolfe line search) in float64 on the CPU,
each grid point warm-started from the previous (stronger) one. Objective, per grid point ``wd``::

    mean_i CE(x_i W + b, y_i) + wd / 2 * ||W||^2        (the bias is not regularised)

which is scikit-learn's ``LogisticRegression(C=1 / (wd * n))``: no scikit-learn dependency for one convex
problem that torch solves in a few lines.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..utils.nn import eval_mode
from ..utils.precision import autocast
from .config import ShardReading
from .runner import eval_batches, shard_info
from .zeroshot import load_names

DEFAULT_WEIGHT_DECAYS = tuple(10.0 ** -k for k in range(8, -1, -1))  # 1e-8 ... 1


# -- data ----------------------------------------------------------------------------------------
def labelled_batches(model: Any, urls: list[str], *, label_key: str = "cls", batch_size: int = 64, workers: int = 0,
                     max_samples: int | None = None, skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Eval-preprocessed ``{"images", "labels", "keys"}`` batches of labelled shards, in shard order (the first
    ``max_samples`` of them); unreadable samples are appended to ``skipped`` as ``shard:key: reason``."""
    notes = skipped if skipped is not None else []
    yield from eval_batches(model, urls, ("label",), batch_size=batch_size, reading=ShardReading(workers=workers),
                            label_key=label_key, max_samples=max_samples,
                            on_meta=lambda m: notes.extend(m["bad"] + m["warnings"]))


def shard_classes(urls: list[str], classnames: Sequence[str] | None = None) -> list[str] | None:
    """``classnames``, else the ``classes`` of the info.json beside the shards, else None."""
    if classnames is not None:
        return list(classnames)
    classes = shard_info(urls).get("classes")
    return load_names(classes, "classnames") if classes else None


def image_features(model: Any, batches: Iterable[dict[str, Any]], *, device: str | torch.device | None = None,
                   autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image embeddings (float32, CPU, ``(N, D)``) and labels ``(N,)`` of ``batches``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    feats, labels = [], []
    with eval_mode(model):
        for b in batches:
            with autocast(device, autocast_dtype):
                emb = model.encode_image(b["images"].to(device), normalize=True)
            feats.append(F.normalize(emb.float(), dim=-1).cpu())  # renormalised in fp32 after autocast
            labels.append(b["labels"].view(-1).long())
    if not feats:
        raise ValueError("no labelled images to encode")
    return torch.cat(feats), torch.cat(labels)


# -- logistic regression -------------------------------------------------------------------------
def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, *, max_iter: int = 1000,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``mean CE(x W + b, y) + weight_decay / 2 * ||W||^2`` by full-batch L-BFGS; returns float64
    ``W (D, C)`` and ``b (C,)``. ``init`` warm-starts from another solution."""
    x = x.double().cpu()
    y = y.long().cpu()
    W = (init[0].clone() if init else torch.zeros(x.shape[1], n_classes, dtype=torch.float64)).requires_grad_()
    b = (init[1].clone() if init else torch.zeros(n_classes, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + 0.5 * weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def accuracy(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-``min(5, C)`` accuracy of the probe ``(W, b)`` on features ``x``."""
    logits = x.double().cpu() @ W + b
    top = logits.topk(min(5, W.shape[1]), dim=1).indices
    y = y.long().cpu()
    return {"top1": (top[:, 0] == y).double().mean().item(), "top5": (top == y[:, None]).any(1).double().mean().item()}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 n_classes: int | None = None, *, weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
                 val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000) -> dict[str, Any]:
    """Choose the weight decay on a validation split of the training set, refit on all of it, score on the
    test set. Returns ``probe_top1``, ``probe_top5``, ``weight_decay`` (chosen), ``C`` (scikit-learn's
    equivalent, ``1 / (wd * n_train)``), ``val`` (top-1 per grid point), ``n_train``, ``n_val``, ``n_test``,
    and ``W`` / ``b`` (the refitted probe)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not weight_decays or any(w < 0 for w in weight_decays):
        raise ValueError(f"weight_decays must be a non-empty list of values >= 0, got {list(weight_decays)}")
    n_classes = n_classes or int(max(train_y.max(), test_y.max())) + 1
    for name, y in (("train", train_y), ("test", test_y)):
        if y.min() < 0 or y.max() >= n_classes:
            raise ValueError(f"{name} labels must lie in [0, {n_classes}), got [{int(y.min())}, {int(y.max())}]")
    n = len(train_y)
    n_val = round(n * val_fraction)
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"{n} training samples cannot be split {1 - val_fraction:.2f} / {val_fraction:.2f}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit_idx, val_idx = perm[n_val:], perm[:n_val]
    val, best, init = [], None, None
    for wd in sorted(weight_decays, reverse=True):  # strongest first: each fit warm-starts the next, weaker one
        init = fit_logistic(train_x[fit_idx], train_y[fit_idx], n_classes, wd, max_iter=max_iter, init=init)
        top1 = accuracy(train_x[val_idx], train_y[val_idx], *init)["top1"]
        val.append({"weight_decay": wd, "top1": top1})
        if best is None or top1 > best[1]:
            best = (wd, top1, init)
    wd, _, init = best
    W, b = fit_logistic(train_x, train_y, n_classes, wd, max_iter=max_iter, init=init)
    test = accuracy(test_x, test_y, W, b)
    return {"probe_top1": test["top1"], "probe_top5": test["top5"], "weight_decay": wd,
            "C": 1.0 / (wd * n) if wd else None, "val": val, "n_train": n, "n_val": n_val, "n_test": len(test_y), "W": W, "b": b}
