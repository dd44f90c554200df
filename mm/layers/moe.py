"""Mixture-of-Experts feed-forward layer: fp32 top-k router, expert capacity, batched experts.

Routing (Switch Transformer / GShard):
- the router is a bias-free linear layer evaluated in fp32 even under autocast or with bf16 weights
  (softmax over experts is sensitive to rounding; Fedus et al. 2021 §2.4);
- each token picks its top-k experts; all first choices are placed before any second choice, and an
  expert accepts at most ``capacity = ceil(capacity_factor * k * tokens / experts)`` assignments; the rest
  are dropped: the layer outputs 0 for them, so the token passes through the block's residual unchanged.
  Within a choice, tokens claim slots in batch order, or with ``batch_priority`` in order of their top
  router probability (Batch Priority Routing, Riquelme et al. 2021);
- experts run without a Python loop over tokens or experts: the kept assignments are sorted by expert and
  each FFN matmul is one grouped GEMM over exactly those rows (``dispatch: grouped``), or tokens are
  scattered into an (experts, capacity, dim) buffer for batched matmuls (``padded``: capacity slack and
  empty slots are computed too);
- tokens may come in groups (the modalities of a one-tower model, LIMoE): all groups are routed together
  (one capacity, one load-balancing loss over the call), statistics and entropy losses are per group.

Auxiliary losses, each weighted by :class:`MoEConfig` and summed into ``RouterStats.aux_loss``:
- load balancing (Switch): ``E * sum_e f_e * P_e`` over all routed tokens (f: fraction of assignments,
  P: mean router probability), 1 when uniform;
- z-loss (ST-MoE): mean squared log-sum-exp of the router logits;
- per group (LIMoE, Mustafa et al. 2022 §3.2; a call without groups is one group), with ``p_i`` token i's
  router distribution and ``p_bar`` its mean over the group's tokens:
  local entropy ``mean_i H(p_i)``, minimised: each token chooses its experts confidently;
  global entropy ``max(0, tau - H(p_bar))`` (``-H(p_bar)`` when ``tau`` is null), minimised, i.e. H(p_bar)
  maximised: the group spreads over the experts, until its entropy reaches ``tau`` (LIMoE's threshold:
  ``tau = log S`` asks for about S experts' worth of spread and no more, so modality-specific experts
  can emerge).

The layer returns its statistics; the model averages ``aux_loss`` over layers and the trainer weights it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .mlp import make_act


@dataclass
class RouterStats:
    """What one MoE layer's router did in a forward pass (all tensors; none synchronise the device).
    The losses carry gradient, the statistics are detached."""

    aux_loss: torch.Tensor  # weighted load balancing + z-loss + entropy losses: what the model adds up
    lb_loss: torch.Tensor  # Switch load-balancing loss (1.0 = perfectly uniform)
    z_loss: torch.Tensor  # mean squared log-sum-exp of router logits
    load: torch.Tensor  # (E,) fraction of routed assignments per expert, before capacity
    dropped_fraction: torch.Tensor  # fraction of assignments over capacity
    entropy: torch.Tensor  # mean per-token router entropy (nats): the local entropy
    global_entropy: torch.Tensor  # entropy of the mean router distribution (nats)
    entropy_loss: torch.Tensor  # weighted local + global entropy losses, summed over groups (in aux_loss)
    # With groups: per group, the same quantities over that group's tokens alone (its aux_loss is the loss
    # the group would have had if routed alone; the layer's aux_loss above is the one trained).
    groups: list[RouterStats] | None = None


def expert_capacity(tokens: int, num_experts: int, top_k: int, factor: float | None) -> int:
    """Slots per expert. ``factor=None`` means unlimited: every assignment fits."""
    if factor is None:
        return max(tokens, 1)
    return max(1, math.ceil(factor * top_k * tokens / num_experts))


# public since torch 2.10; torch._grouped_mm before that (2.8+); None: only the padded dispatch exists
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's when it is on (grouped_mm is not on autocast's
    lists, so the cast is explicit), else the input's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _GradContiguous(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward rejects
    the stride-0 gradient of e.g. ``y.sum()`` (torch 2.14, "Invalid strides/sizes")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous()


def _grad_contiguous(x: torch.Tensor) -> torch.Tensor:
    return _GradContiguous.apply(x) if x.requires_grad else x


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
        self.dim, self.hidden, self.h1 = dim, hidden, h1
        self.router = nn.Linear(dim, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, dim, h1))
        self.b1 = nn.Parameter(torch.zeros(e, h1))
        self.w2 = nn.Parameter(torch.empty(e, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(e, dim))
        self.act = None if swiglu else make_act(act)
        nn.init.normal_(self.router.weight, std=dim**-0.5)
        nn.init.normal_(self.w1, std=dim**-0.5)
        nn.init.normal_(self.w2, std=hidden**-0.5)

    def _grouped(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether to use the grouped GEMM (see ``MoEConfig.dispatch``). torch's kernel wants 16-byte
        aligned rows; it is used for fp32 on CPU and bf16 on CUDA sm80+ (its fast kernels); anything else takes
        the padded path."""
        mode = self.cfg.dispatch
        if mode == "grouped" and _GROUPED_MM is None:
            raise RuntimeError(f"moe.dispatch: grouped needs torch >= 2.8 (grouped_mm), this is {torch.__version__}")
        if mode != "auto":
            return mode == "grouped"
        if _GROUPED_MM is None:
            return False
        size = dtype.itemsize
        aligned = all(d * size % 16 == 0 for d in (self.dim, self.h1, self.hidden))
        if device.type == "cpu":
            # fp32 only: torch's CPU grouped GEMM has no fast bf16 path, while bmm uses AMX / oneDNN
            # (bf16: grouped 45 ms vs bmm 11 ms on 8 x (1040 x 192 @ 192 x 768), 2 cores)
            # (and only with the public F.grouped_mm: the private op of older releases may lack a CPU kernel)
            return aligned and dtype == torch.float32 and hasattr(F, "grouped_mm")
        if device.type == "cuda":
            return aligned and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
        return False

    def _experts_grouped(self, xs: torch.Tensor, expert: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """(m, dim) rows sorted by ``expert`` (m,), expert e owning rows offs[e-1]:offs[e] -> (m, dim):
        each row through its expert's FFN, as two grouped GEMMs (exactly m rows of work, no padding)."""
        if xs.shape[0] == 0:
            return xs.new_zeros(0, self.dim)
        dt = xs.dtype
        h = _grad_contiguous(_GROUPED_MM(xs, self.w1.to(dt), offs=offs))
        h = h + self.b1.to(dt).index_select(0, expert)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.act(h)
        y = _grad_contiguous(_GROUPED_MM(h.contiguous(), self.w2.to(dt), offs=offs))
        return y + self.b2.to(dt).index_select(0, expert)

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
        """x: (..., dim). ``valid``: optional bool mask, either of x.shape[:-1] (True = real token) or of
        x.shape[:-1] + (G,), each token's membership in G groups (the modalities of a one-tower model; a
        token in no group is padding). Padding is neither routed nor counted and gets output 0. With
        groups, ``RouterStats.groups`` reports each group and the entropy losses are taken per group."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        member = None
        if valid is not None and valid.dim() == x.dim():
            member = valid.reshape(flat.shape[0], valid.shape[-1])
            valid = member.any(-1)
        idx = valid.reshape(-1).nonzero().squeeze(1) if valid is not None else None
        xs = flat.index_select(0, idx) if idx is not None else flat
        n, e, k = xs.shape[0], self.cfg.num_experts, self.cfg.top_k

        # Router in fp32, outside autocast (and on fp32 copies of bf16 weights).
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
        if self.cfg.batch_priority:
            # the same token order for every choice: most confident first (stable: ties keep batch order)
            rank = probs.amax(-1).argsort(descending=True, stable=True)  # (n,)
            order = (rank + torch.arange(k, device=x.device).unsqueeze(1) * n).reshape(-1)  # (k*n,)
            ranked = onehot.index_select(0, order)
            pos = torch.empty_like(flat_e).index_copy_(0, order, (ranked.cumsum(0) * ranked).sum(-1) - 1)
        else:
            pos = (onehot.cumsum(0) * onehot).sum(-1) - 1
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        dtype = _compute_dtype(xs)
        grouped = self._grouped(dtype, x.device)
        cap = expert_capacity(n, e, k, factor)
        if factor is None and not grouped and n > 0:
            # unlimited capacity on the padded path: buffers as deep as the busiest expert's load, not as the
            # token count (experts x tokens rows); one host sync, which this path's boolean indexing has anyway
            cap = int(onehot.sum(0).max())
        keep = pos < cap
        tok = torch.arange(n, device=x.device).repeat(k)[keep]
        w = gate.t().reshape(-1)[keep]
        if grouped:
            kept_e = flat_e[keep]
            order = kept_e.argsort(stable=True)  # expert-major; the rows of one expert are contiguous
            tok, kept_e, w = tok[order], kept_e[order], w[order]
            offs = torch.bincount(kept_e, minlength=e).cumsum(0).to(torch.int32)  # end row of each expert
            y = self._experts_grouped(xs.index_select(0, tok).to(dtype), kept_e, offs)
            out_s = y.new_zeros(n, y.shape[-1]).index_add_(0, tok, y * w.unsqueeze(1).to(y.dtype))
        else:
            slot = (flat_e * cap + pos)[keep]
            buf = xs.new_zeros(e * cap, xs.shape[-1]).index_copy_(0, slot, xs.index_select(0, tok))
            y = self._experts(buf.view(e, cap, -1)).reshape(e * cap, -1)
            out_s = y.new_zeros(n, y.shape[-1]).index_add_(0, tok, y.index_select(0, slot) * w.unsqueeze(1).to(y.dtype))
        if idx is not None:
            out = out_s.new_zeros(flat.shape[0], out_s.shape[-1]).index_copy_(0, idx, out_s)
        else:
            out = out_s
        member = member.index_select(0, idx) if member is not None else None
        return out.reshape(shape), self._stats(logits, probs, onehot, keep, member)

    def _stats(self, logits: torch.Tensor, probs: torch.Tensor, onehot: torch.Tensor, keep: torch.Tensor,
               member: torch.Tensor | None) -> RouterStats:
        """Statistics and auxiliary losses in fp32. ``onehot`` (k*n, E) / ``keep`` (k*n,): each assignment's
        expert and whether it fit, choice-major; ``member`` (n, G): the routed tokens' groups, or None.

        Everything is computed for C columns at once: column 0 = all routed tokens, then one per group.
        Sums over tokens are elementwise products summed, not matmuls: a matmul may run in TF32 on GPUs."""
        cfg, (n, e), k = self.cfg, probs.shape, self.cfg.top_k
        with torch.autocast(device_type=probs.device.type, enabled=False):
            cols = probs.new_ones(n, 1)
            if member is not None:
                cols = torch.cat([cols, member.to(probs.dtype)], dim=1)  # (n, C)

            def total(v: torch.Tensor) -> torch.Tensor:  # (n,) or (n, E) summed per column -> (C,) or (C, E)
                return (cols.view(n, -1, *([1] * (v.dim() - 1))) * v.unsqueeze(1)).sum(0)

            present = cols.sum(0)  # (C,) tokens per column
            count = present.clamp_min(1)
            per_token = onehot.view(k, n, e).sum(0).to(probs.dtype)  # (n, E) assignments of each token
            dropped_tok = (~keep).view(k, n).sum(0).to(probs.dtype)  # (n,)
            load = total(per_token) / (k * count[:, None])  # (C, E)
            importance = total(probs) / count[:, None]  # (C, E) mean router distribution
            lb = e * (load * importance).sum(-1)
            z = total(torch.logsumexp(logits, dim=-1).pow(2)) / count
            local = total(-(probs * probs.clamp_min(1e-9).log()).sum(-1)) / count
            glob = -(importance * importance.clamp_min(1e-9).log()).sum(-1)
            tau = cfg.global_entropy_threshold
            glob_loss = (tau - glob).clamp_min(0) if tau is not None else -glob
            # an empty group (no routed token) contributes nothing
            ent_loss = (cfg.local_entropy_weight * local + cfg.global_entropy_weight * glob_loss) * (present > 0)
            dropped = total(dropped_tok) / (k * count)

            def column(c: int, entropy_loss: torch.Tensor) -> RouterStats:
                return RouterStats(
                    aux_loss=cfg.aux_loss_weight * lb[c] + cfg.z_loss_weight * z[c] + entropy_loss,
                    lb_loss=lb[c], z_loss=z[c], load=load[c].detach(), dropped_fraction=dropped[c].detach(),
                    entropy=local[c].detach(), global_entropy=glob[c].detach(), entropy_loss=entropy_loss,
                )

            if member is None:
                return column(0, ent_loss[0])
            stats = column(0, ent_loss[1:].sum())
            stats.groups = [column(c, ent_loss[c]) for c in range(1, cols.shape[1])]
            return stats
