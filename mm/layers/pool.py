"""Pooling a token sequence into one vector (class token, mean, end-of-text) or into N tokens
(attentional pooling, CoCa)."""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .mlp import Mlp


def text_valid_mask(tokens: torch.Tensor, *, eot_id: int, pad_id: int) -> torch.Tensor:
    """(B, T) bool, True for real tokens: everything up to and including the first end-of-text token.

    Position, not id, decides: CLIP pads with id 0, which is also the id of "!", so ``tokens != pad``
    would call a real "!" padding. Sequences without an end token fall back to ``tokens != pad_id``.
    """
    is_eot = tokens == eot_id
    before_first_eot = (is_eot.long().cumsum(1) - is_eot.long()) == 0
    has_eot = is_eot.any(1, keepdim=True)
    # where(has_eot, a, b) written with logical ops: ONNX Runtime has no boolean Where (mm export)
    return (has_eot & before_first_eot) | (~has_eot & (tokens != pad_id))


def pool_text(x: torch.Tensor, tokens: torch.Tensor, kind: str, *, eot_id: int, valid: torch.Tensor) -> torch.Tensor:
    """x: (B, T, W) encoder output for token ids (B, T) -> (B, W); ``valid`` from :func:`text_valid_mask`.

    ``eot``: the first end-of-text token (CLIP; if a sequence has none, its last real token),
    ``first``, ``last`` (last real token), ``mean`` (over real tokens); as open_clip pools: ``argmax`` (the
    position of the largest token id), ``eos`` (the first ``eot_id``, else position 0), ``end`` (the last
    position, padding or not).
    """
    b = torch.arange(x.shape[0], device=x.device)
    real = valid
    last = real.long().cumsum(1).argmax(1)  # first position reaching the final count = last real token
    if kind == "first":
        return x[:, 0]
    if kind == "end":
        return x[:, -1]
    if kind == "argmax":
        return x[b, tokens.argmax(dim=-1)]
    if kind == "eos":
        return x[b, (tokens == eot_id).int().argmax(dim=-1)]
    if kind == "last":
        return x[b, last]
    if kind == "mean":
        m = real.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)
    if kind == "eot":
        is_eot = tokens == eot_id
        idx = torch.where(is_eot.any(1), is_eot.long().argmax(1), last)
        return x[b, idx]
    raise ValueError(f"unknown text pooling {kind!r}")


class AttentionalPool(nn.Module):
    """``n_queries`` learned queries cross-attend to the tokens (CoCa's attentional pooler, Yu et al.
    2022): (B, T, context_dim) -> (B, n_queries, dim)."""

    def __init__(self, dim: int, context_dim: int, heads: int, n_queries: int, norm_eps: float = 1e-5):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim) * dim**-0.5)
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_k = nn.LayerNorm(context_dim, eps=norm_eps)
        self.attn = Attention(dim, heads, cross=True, kv_dim=context_dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid`` (B, T) bool: the tokens the queries may attend to (None: all)."""
        q = self.norm_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, self.norm_k(x), attn_mask=_key_mask(valid))


class LatentAttentionPool(nn.Module):
    """Multihead attention pooling with one learned query (timm's ``AttentionPoolLatent``, SigLIP's and the
    Perception Encoder's "MAP" head): the latent query cross-attends to the tokens, then a pre-norm residual
    MLP; (B, T, dim) -> (B, dim)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, act: str = "gelu", norm_eps: float = 1e-6):
        super().__init__()
        self.latent = nn.Parameter(torch.randn(1, dim) * dim**-0.5)
        self.attn = Attention(dim, heads, cross=True)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden, act)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid`` (B, T) bool: the tokens the query may attend to (None: all)."""
        latent = self.latent.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        y = self.attn(latent, x, attn_mask=_key_mask(valid))  # (B, 1, dim)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


def _key_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool -> SDPA's boolean (B, 1, 1, T) mask (True = attend)."""
    return None if valid is None else valid[:, None, None, :]
