"""The one attention implementation of mm: self or cross, causal or bidirectional, through SDPA.

Every tower (vision, text, captioning decoder, attentional pooling) uses :class:`Attention`.
Masks follow SDPA's boolean convention: ``True`` = may attend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .position import apply_rope


def make_attn_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Build the mask once per stack: returns ``(attn_mask, is_causal)`` for SDPA.

    ``key_padding_mask`` is (B, k_len) bool, True for real tokens. A purely causal square mask is
    passed as ``is_causal=True`` so SDPA can pick its flash / memory-efficient kernels; anything else
    becomes an explicit boolean mask of shape (B or 1, 1, q_len, k_len).
    """
    if key_padding_mask is None:
        if causal and q_len == k_len:
            return None, True
        if not causal:
            return None, False
    mask = None
    if causal:
        # queries are the last q_len positions of a k_len sequence (k_len > q_len with a KV cache)
        i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        mask = (torch.arange(k_len, device=device)[None, :] <= i)[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Tk)
        mask = kpm if mask is None else (mask & kpm)
    return mask, False


class Attention(nn.Module):
    """Multi-head attention. Self-attention packs Q, K, V into one projection (``qkv``); cross-attention
    projects queries from ``x`` (``q``) and packed keys/values from ``context`` (``kv``, which may have a
    different width ``kv_dim``)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        cross: bool = False,
        kv_dim: int | None = None,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # qk-norm (Dehghani et al. 2023) keeps attention logits bounded at scale
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, T, dim); context: (B, S, kv_dim) for cross-attention. Returns (B, T, dim).

        ``attn_mask`` / ``is_causal`` as built by :func:`make_attn_mask`; ``rope`` = (cos, sin) tables
        of shape (T, head_dim) applied to queries and keys (self-attention only).
        """
        b, t, d = x.shape
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            q = self._heads(self.q(x))
            k, v = self._heads_kv(self.kv(context))
        else:
            q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if q.dtype != v.dtype:  # qk-norm / rope may run in fp32 under autocast
            q, k = q.to(v.dtype), k.to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def _heads_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = kv.shape
        k, v = kv.view(b, s, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v
