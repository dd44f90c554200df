"""The one attention implementation of mm: self or cross, causal or bidirectional, dense or block-sparse.

Every tower (vision, text, captioning decoder, attentional pooling) uses :class:`Attention`.
Masks follow SDPA's boolean convention: ``True`` = may attend. A ``BlockMask`` (block-sparse patterns,
built in ``sparse.py``) runs through flex_attention instead of SDPA.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .position import apply_rope

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

_compiled_flex: Callable[..., torch.Tensor] | None = None


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """flex_attention(q, k, v) under ``block_mask``, run as it should be on q's device.

    CUDA: compiled once per process, at first use (not at import: compiling costs seconds and most
    processes never use sparse attention). Only the compiled kernel skips empty blocks; eager
    flex_attention computes the full score matrix and masks it. Masks made by the same mask_mod code
    with different captured tensors (one per layer) reuse the compiled kernel. Other devices: eager,
    which in torch 2.14 is unfused and, on the CPU, forward-only (it warns once that it is not compiled);
    ``sparse.SparsePattern`` hands those devices boolean masks for SDPA instead, so this runs there only
    when a caller passes a BlockMask itself. The module is imported here, not at the top: it pulls in
    sympy (~0.8 s per process and DataLoader worker), which only sparse models need.
    """
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    fn = flex_attention
    # inside a compiled model (train.compile) the outer torch.compile already fuses flex_attention
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask)


# Keys up to this long: SDPA's math backend beats the CPU flash kernel for bf16 / fp16 training (below)
CPU_MATH_MAX_KEYS = 128


def _cpu_math_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether this call should run SDPA's math backend: on the CPU, in bf16 / fp16, with a backward to come,
    over at most ``CPU_MATH_MAX_KEYS`` keys. There the flash kernel's backward is 2-3x slower than in fp32 and
    than the math backend (torch 2.14, 2 AVX-512-BF16 cores, forward + backward: 17 keys 11.0 vs 3.3 ms,
    65 keys 43.7 vs 20.1 ms, 129 keys 44.1 vs 28.1 ms; even at 197, 55 vs 59 ms; benchmarks/bench_kernels.py,
    docs/benchmarks.md); fp32, inference and longer sequences keep the flash kernel, which wins there."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-2] <= CPU_MATH_MAX_KEYS
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and not torch.compiler.is_compiling())


class KVCache:
    """Keys and values of one attention layer, kept across incremental decoding steps.

    Self-attention: :meth:`append` writes the new positions into buffers allocated once for ``max_len``
    positions (no re-allocation or concatenation per step) and returns the keys/values so far.
    Cross-attention: the context's keys/values are projected on the first step and reused after
    (``static``), so an image's tokens are projected once per layer, not once per generated token.
    """

    def __init__(self, max_len: int | None = None):
        self.max_len = max_len
        self.k: torch.Tensor | None = None  # (B, H, max_len or S, Dh)
        self.v: torch.Tensor | None = None
        self.length = 0

    @property
    def static(self) -> bool:
        return self.max_len is None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append {t} after {self.length}")
        self.k[:, :, self.length : self.length + t] = k
        self.v[:, :, self.length : self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (beam search: each new beam continues an old one)."""
        if self.k is not None and not self.static:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)

    def repeat_interleave(self, n: int) -> None:
        """Each batch row becomes ``n`` consecutive rows (one image's cache shared by its beams)."""
        if self.k is not None and n > 1:
            self.k, self.v = self.k.repeat_interleave(n, 0), self.v.repeat_interleave(n, 0)


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
        if causal and q_len == 1:  # one new query after a KV cache: it may see every key
            return None, False
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
        k_bias: bool = True,
        qk_norm: bool = False,
        sub_norm: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.cross = cross
        self.q_bias = self.v_bias = None
        if cross:
            if not k_bias:
                raise ValueError("k_bias: false is for self-attention (EVA's); cross-attention packs [k; v]")
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=qkv_bias)
        elif qkv_bias and not k_bias:
            # EVA's attention: query and value biases, no key bias (it would shift every score of a query by
            # the same amount, which softmax ignores)
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        # qk-norm (Dehghani et al. 2023) keeps attention logits bounded at scale
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        # sub-LN (EVA02's scale_attn_inner): the attention output is normed before its projection
        self.norm_out = nn.LayerNorm(dim, eps=norm_eps) if sub_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | BlockMask | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, dim); context: (B, S, kv_dim) for cross-attention. Returns (B, T, dim).

        ``attn_mask`` / ``is_causal`` as built by :func:`make_attn_mask`, or a flex_attention ``BlockMask``
        (block-sparse attention, from ``sparse.SparsePattern``); ``rope`` = (cos, sin) tables
        of shape (T, head_dim) for x's positions, applied to queries and keys (self-attention only).
        With a ``cache``, x holds only the new positions: self-attention appends their keys/values and
        attends over everything cached; cross-attention projects ``context`` once and reuses it.
        """
        b, t, d = x.shape
        if self.cross:
            q = self.q_norm(self._heads(self.q(x)))
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v
            else:
                if context is None:
                    raise ValueError("cross-attention needs a context tensor")
                k, v = self._heads_kv(self.kv(context))
                k = self.k_norm(k)
                if cache is not None:
                    cache.k, cache.v = k, v
        else:
            qkv = self.qkv(x)
            if self.q_bias is not None:
                qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]).to(qkv.dtype)
            q, k, v = qkv.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None:
                k, v = cache.append(k, v)
        if q.dtype != v.dtype:  # qk-norm / rope may run in fp32 under autocast
            q, k = q.to(v.dtype), k.to(v.dtype)
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # a BlockMask
            out = _flex_attention(q, k, v, attn_mask)
        elif _cpu_math_is_faster(q, k):
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(self.norm_out(out.transpose(1, 2).reshape(b, t, d)))

    def _heads_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _ = kv.shape
        k, v = kv.view(b, s, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v
