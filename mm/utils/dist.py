"""Processes: the one place mm reads its rank and world size from, and the collectives it needs.

Everything reads the default ``torch.distributed`` process group, whichever launcher formed it (``accelerate
launch``, torchrun, a test's own group): every helper is an identity when no group exists, so the same code
runs unchanged in one process. :func:`start` forms the group the launcher asks for (through accelerate's
``PartialState``, which reads ``accelerate launch``'s environment) and is what a command calls first; the
trainer's ``Accelerator`` forms it the same way.

All gathers assume every rank contributes a tensor of the same shape (equal
local batch sizes, e.g. ``drop_last=True``); ``torch.distributed.all_gather``
requires it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_no_grad",
    "all_gather_with_grad",
    "any_process",
    "average_gradients",
    "barrier",
    "gather_object",
    "is_dist",
    "is_main",
    "rank",
    "start",
    "shutdown",
    "use_cpu",
    "world_size",
]


def use_cpu() -> bool:
    """Whether processes run on the CPU. Passing it as accelerate's ``cpu=True`` is what makes ``accelerate
    launch --multi_gpu`` on a GPU-less machine form gloo ranks (without it, one process starts)."""
    return not torch.cuda.is_available()


def start() -> torch.device:
    """Join the process group ``accelerate launch`` (or torchrun) set up, if any, and return this process's
    device (its GPU, else the CPU). One process when not launched."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu()).device


def is_dist() -> bool:
    """True when a default process group exists (a distributed run is live)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on rank 0 (and when not distributed): the process that writes shared files and logs."""
    return rank() == 0


def shutdown() -> None:
    """Destroy the default process group, if any: its communication threads are joined now rather than torn down
    with the interpreter (which can abort a finished process: "terminate called without an active exception")."""
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in one process)."""
    if is_dist():
        dist.barrier()


def gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (picklable objects); ``[obj]`` in one."""
    if not is_dist():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_process(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every process if ``flag`` is true on any (e.g. a stop signal that reached only some ranks)."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


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
