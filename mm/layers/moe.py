"""Mixture-of-Experts feed-forward layer: fp32 top-k router, expert capacity, batched experts.

Routing (Switch Transformer / GShard):
- the router is a bias-free linear layer evaluated in fp32 even under autocast (softmax over experts is
  sensitive to rounding; Fedus et al. 2021 §2.4);
- each token picks its top-k experts; all first choices are placed before any second choice, and an
  expert accepts at most ``capacity = ceil(capacity_factor * k * tokens / experts)`` assignments; the rest
  are dropped: the layer outputs 0 for them, so the token passes through the block's residual unchanged;
- experts run as one batched matmul over a (experts, capacity, dim) buffer: tokens are scattered to their
  expert's slots, never looped over in Python.

The layer returns its statistics; the model sums ``aux_loss`` and the trainer owns its weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .mlp import make_act


@dataclass
class RouterStats:
    """What one MoE layer's router did in a forward pass (all tensors; none synchronise the device)."""

    aux_loss: torch.Tensor  # weighted load-balancing + z-loss, carries gradient
    lb_loss: torch.Tensor  # Switch load-balancing loss (1.0 = perfectly uniform)
    z_loss: torch.Tensor  # mean squared log-sum-exp of router logits
    load: torch.Tensor  # (E,) fraction of routed assignments per expert, before capacity
    dropped_fraction: torch.Tensor  # fraction of assignments over capacity
    entropy: torch.Tensor  # mean per-token router entropy (nats)


def expert_capacity(tokens: int, num_experts: int, top_k: int, factor: float | None) -> int:
    """Slots per expert. ``factor=None`` means unlimited: every assignment fits."""
    if factor is None:
        return max(tokens, 1)
    return max(1, math.ceil(factor * top_k * tokens / num_experts))


class MoE(nn.Module):
    """Drop-in replacement for :class:`Mlp` / :class:`SwiGLU` with ``num_experts`` copies of it.

    Expert weights are stacked: ``w1`` (E, dim, h1), ``w2`` (E, hidden, dim) where h1 = hidden (mlp)
    or 2 * hidden (swiglu, packed [gate | up] like :class:`SwiGLU`).
    """

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, *, act: str = "gelu", swiglu: bool = False):
        super().__init__()
        self.cfg = cfg
        e = cfg.num_experts
        self.swiglu = swiglu
        h1 = 2 * hidden if swiglu else hidden
        self.router = nn.Linear(dim, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, dim, h1))
        self.b1 = nn.Parameter(torch.zeros(e, h1))
        self.w2 = nn.Parameter(torch.empty(e, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(e, dim))
        self.act = None if swiglu else make_act(act)
        nn.init.normal_(self.router.weight, std=dim**-0.5)
        nn.init.normal_(self.w1, std=dim**-0.5)
        nn.init.normal_(self.w2, std=hidden**-0.5)

    def _experts(self, buf: torch.Tensor) -> torch.Tensor:
        """(E, C, dim) -> (E, C, dim): every expert's FFN on its slots, as two batched matmuls."""
        h = torch.baddbmm(self.b1.unsqueeze(1).to(buf.dtype), buf, self.w1.to(buf.dtype))
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.act(h)
        return torch.baddbmm(self.b2.unsqueeze(1).to(h.dtype), h, self.w2.to(h.dtype))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats]:
        """x: (..., dim). ``valid``: optional bool mask of x.shape[:-1]; invalid tokens (padding) are
        neither routed nor counted, and get output 0."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx = valid.reshape(-1).nonzero().squeeze(1) if valid is not None else None
        xs = flat.index_select(0, idx) if idx is not None else flat
        n, e, k = xs.shape[0], self.cfg.num_experts, self.cfg.top_k

        # Router in fp32, outside autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            r_in = xs.float()
            if self.training and self.cfg.router_jitter > 0:
                eps = self.cfg.router_jitter
                r_in = r_in * torch.empty_like(r_in).uniform_(1 - eps, 1 + eps)
            logits = F.linear(r_in, self.router.weight.float())  # (n, E)
            probs = logits.softmax(dim=-1)
            gate, expert = probs.topk(k, dim=-1)  # (n, k)
            if k > 1 and self.cfg.normalize_gates:
                gate = gate / gate.sum(dim=-1, keepdim=True)

        # Slot of each assignment inside its expert, first choices before second choices.
        flat_e = expert.t().reshape(-1)  # (k*n,)
        onehot = F.one_hot(flat_e, e)  # (k*n, E)
        pos = (onehot.cumsum(0) * onehot).sum(-1) - 1
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        cap = expert_capacity(n, e, k, factor)
        keep = pos < cap
        tok = torch.arange(n, device=x.device).repeat(k)[keep]
        slot = (flat_e * cap + pos)[keep]
        w = gate.t().reshape(-1)[keep]

        buf = xs.new_zeros(e * cap, xs.shape[-1]).index_copy_(0, slot, xs.index_select(0, tok))
        y = self._experts(buf.view(e, cap, -1)).reshape(e * cap, -1)
        out_s = y.new_zeros(n, y.shape[-1]).index_add_(0, tok, y.index_select(0, slot) * w.unsqueeze(1).to(y.dtype))
        if idx is not None:
            out = out_s.new_zeros(flat.shape[0], out_s.shape[-1]).index_copy_(0, idx, out_s)
        else:
            out = out_s

        # Statistics and auxiliary losses (fp32).
        total = max(k * n, 1)
        counts = onehot.sum(0).float()
        load = counts / total
        importance = probs.mean(0) if n else probs.new_zeros(e)
        lb = e * (load * importance).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean() if n else logits.new_zeros(())
        ent = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean() if n else logits.new_zeros(())
        stats = RouterStats(
            aux_loss=self.cfg.aux_loss_weight * lb + self.cfg.z_loss_weight * z,
            lb_loss=lb,
            z_loss=z,
            load=load.detach(),
            dropped_fraction=((~keep).sum() / total).detach(),
            entropy=ent.detach(),
        )
        return out.reshape(shape), stats
