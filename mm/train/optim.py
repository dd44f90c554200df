"""Parameter groups, AdamW and the warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases, embeddings (token / position / class), learned queries and the logit
    scale / bias are not decayed: shrinking them toward zero has no regularising meaning (CLIP, open_clip)."""
    if param.ndim < 2:  # biases, norm gains, logit scale/bias, class token
        return True
    leaf = name.rsplit(".", 1)[-1]
    # embeddings are lookup tables (token, position); the patch "embedding" is a linear map and decays
    return leaf in ("pos_embed", "query", "cls_token") or name.endswith("token_embedding.weight")


def param_groups(model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None,
                 lr: float | None = None) -> list[dict]:
    """Trainable parameters (frozen ones, ``requires_grad=False``, are left out) in a decayed and an undecayed
    group. With ``lr_scales`` (name -> multiplier, mm.train.adapt) one pair per distinct multiplier, each
    group with ``lr = lr * lr_scale`` and its ``lr_scale``; the groups of multiplier 1 come first, so that
    group 0 carries the base rate where there is one."""
    scales = lr_scales or {}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, False): [], (1.0, True): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((scales.get(name, 1.0), no_decay(name, p)), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, -k[0], k[1]))
    out = []
    for scale, keep in order:
        g = {"params": groups[scale, keep], "weight_decay": 0.0 if keep else weight_decay, "lr_scale": scale}
        if lr_scales is not None and lr is not None:
            g["lr"] = lr * scale
        out.append(g)
    return out


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                   device: torch.device, lr_scales: dict[str, float] | None = None) -> torch.optim.Optimizer:
    # fused AdamW on CUDA and on the CPU (one kernel for all parameters). On the CPU torch's default is a
    # Python loop over parameters (0.3-0.6 s per tiny-clip step on 2 cores); foreach batches it (25.8 ms for
    # tiny-coca's 17M parameters), the fused kernel takes 7.3 ms (benchmarks/bench_kernels.py)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, weight_decay, lr_scales, lr), lr=lr, betas=betas, eps=eps,
                             fused=fused, foreach=not fused)


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients, without clipping (no extra pass that rescales them)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most ``max_norm``; returns the norm before.
    Sharded (DTensor) gradients and whole ones may be mixed (FSDP2 with replicated scalars): each group's norm
    is taken on its own, then combined, as accelerate's ``clip_grad_norm_`` does (mm's numbers before it
    clipped here were accelerate's, and stay bit-identical)."""
    if not torch.distributed.is_available():  # no DTensors either (some macOS / Windows builds)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    groups: dict[object, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = [get_total_norm([p.grad for p in group], 2.0) for group in groups.values()]
    norms = torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]) if norms else torch.zeros(1)
    total = torch.linalg.vector_norm(norms, 2.0)
    for group in groups.values():
        clip_grads_with_norm_(group, max_norm, total)
    return total


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup`` steps, then cosine decay to ``min_ratio * lr``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(opt: torch.optim.Optimizer, warmup: int, total: int, lr: float, min_lr: float):
    ratio = min_lr / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, ratio))
