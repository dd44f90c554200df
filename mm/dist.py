"""Small helpers over plain ``torch.distributed``.

Kept free of Accelerate (and of the rest of ``mm``) so the losses can gather
features under any launcher (torchrun, Accelerate, a test's own process group)
and so that every helper is an identity when no process group is initialised:
the same code then runs unchanged on one device.

All gathers assume every rank contributes a tensor of the same shape (equal
local batch sizes, e.g. ``drop_last=True``); ``torch.distributed.all_gather``
requires it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "average_gradients",
    "is_dist",
    "rank",
    "world_size",
    "all_gather_with_grad",
    "all_gather_no_grad",
]


def is_dist() -> bool:
    """True when a default process group exists (a distributed run is live)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_dist() else 1


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over the processes, in place: for parameters that train outside
    DDP / FSDP (distillation's projection, FSDP's replicated scalars), which would otherwise drift apart."""
    n = world_size()
    if n == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= n


def _gather_list(x: torch.Tensor) -> list[torch.Tensor]:
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward routes each rank's share of the gradient home.

    Every rank uses the gathered tensor in its own loss, so the gradient of the
    *sum of all ranks' losses* w.r.t. rank r's slice is the sum, over ranks, of
    the gradient each rank computed for that slice. Backward therefore
    all-reduces (SUM) the incoming gradient and keeps this rank's slice. This
    is what ``torch.distributed.nn.functional.all_gather`` does (it uses
    reduce-scatter / all-to-all); an all-reduce works on every backend.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        ctx.n = x.shape[0]
        return torch.cat(_gather_list(x), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # all_reduce is in place; never mutate autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.n
        return grad[start : start + ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably.

    Why: a contrastive loss needs every rank's features as negatives, and the
    features that other ranks use must send their gradients back to the rank
    that produced them. Backward sums the gradients all ranks computed for the
    gathered tensor and returns this rank's slice, i.e. the local features get
    d(sum over ranks of loss_r)/dx. Identity when not distributed.
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0; only the local slice has grad.

    Why: cheaper than :func:`all_gather_with_grad` (no collective in backward).
    Other ranks' slices are constants here, but this rank's slice is replaced
    by ``x`` itself (open_clip's ``gather_with_grad=False`` trick), so the local
    features still receive the gradient of *this rank's* loss through every
    place they appear. Gradients from other ranks' losses are lost, so the
    result is not W times the single-process gradient (see ``mm.losses``).
    Identity when not distributed.
    """
    if world_size() == 1:
        return x
    with torch.no_grad():
        parts = _gather_list(x.detach())
    parts[rank()] = x
    return torch.cat(parts, dim=0)
