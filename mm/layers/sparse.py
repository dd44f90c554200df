"""Block-sparse attention patterns (BigBird, Zaheer et al. 2020) and the masks the two backends consume.

A pattern lives on blocks of ``block_size`` consecutive tokens: each query block sees its own block and
``window`` blocks on each side, plus ``random_blocks`` further key blocks drawn per layer; the first
``global_tokens`` tokens see every token and are seen by every token. Causal and key-padding masks are
ANDed with the pattern. One ``mask_mod(b, h, q_idx, kv_idx)`` states the whole rule and feeds both
backends, so they cannot disagree about it:

- ``dense``: the mask_mod evaluated on broadcast index grids gives a boolean (B or 1, 1, Tq, Tk) mask for
  SDPA, the reference;
- ``flex``: ``create_block_mask`` turns it into a ``BlockMask``; flex_attention never computes a block the
  mask leaves empty, and evaluates the mask_mod only inside partially filled blocks.

Sequence lengths need not be multiples of ``block_size`` (a ViT's 197 tokens): the last block is short
and both backends handle it. The attention call itself (SDPA or flex_attention) lives in ``attention.py``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import SparseAttentionConfig

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

_P = 2**31 - 1  # prime modulus: a residue (< 2**31) times a multiplier (< 2**17) fits in int64, no overflow

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _mix(x: Tensor, v: int | Tensor) -> Tensor:
    """Fold ``v`` (integers in [0, 2**31)) into the hash state ``x``: xor, then two multiply / xorshift
    rounds, so neighbouring inputs give unrelated outputs."""
    x = ((x ^ v) + 0x9E3779B1) % _P
    x = (x * 48271) % _P
    x = x ^ (x >> 15)
    x = (x * 69621) % _P
    return x ^ (x >> 13)


def random_scores(n_q: int, n_k: int, seed: int, layer_idx: int) -> Tensor:
    """(n_q, n_k) pseudo-random scores in [0, 1) for (query block, key block) pairs.

    A pure function of (seed, layer, i, j) computed with integer arithmetic on the CPU: no generator state,
    so every rank and every step draws the same blocks, and a pair's score does not depend on the number
    of blocks (a causal pattern is the same whether a sequence is processed whole or by a KV cache).
    """
    x = _mix(torch.zeros((), dtype=torch.long), seed % _P)
    x = _mix(x, layer_idx % _P)
    x = _mix(x, torch.arange(n_q)[:, None])
    x = _mix(x, torch.arange(n_k)[None, :])
    return x.double() / _P


def block_layout(cfg: SparseAttentionConfig, n_blocks: int, layer_idx: int, causal: bool) -> Tensor:
    """(n_blocks, n_blocks) bool on the CPU: the key blocks each query block attends to, before global
    tokens, causality and padding are applied token by token."""
    i, j = torch.arange(n_blocks)[:, None], torch.arange(n_blocks)[None, :]
    layout = (i - j).abs() <= cfg.window
    if cfg.random_blocks:
        # as in BigBird, random blocks come from outside the band and the global prefix (those keys are
        # seen anyway); causally only from the past, the only blocks a causal query can use
        candidate = ~layout & (j >= cfg.global_tokens // cfg.block_size)
        if causal:
            candidate &= j < i
        scores = random_scores(n_blocks, n_blocks, cfg.seed, layer_idx).masked_fill(~candidate, -1.0)
        top = scores.topk(min(cfg.random_blocks, n_blocks), dim=1)
        layout |= torch.zeros_like(layout).scatter(1, top.indices, top.values >= 0)
    return layout


def make_mask_mod(
    cfg: SparseAttentionConfig,
    layout: Tensor,
    *,
    causal: bool,
    q_offset: int = 0,
    key_valid: Tensor | None = None,
) -> MaskMod:
    """The token-level rule: ``mask_mod(b, h, q_idx, kv_idx)`` is True where query ``q_idx`` may attend
    to key ``kv_idx``. Works on scalars (flex_attention's vmap) and on broadcast index tensors (the dense
    mask). ``q_offset``: queries are the last positions of the keys (a KV cache); ``key_valid``: (B, Tk)
    bool, True for real tokens; ``layout`` on the device of the indices."""
    bs, g = cfg.block_size, cfg.global_tokens

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q = q_idx + q_offset
        allowed = layout[q // bs, kv_idx // bs] | (q < g) | (kv_idx < g)
        if causal:
            allowed = allowed & (kv_idx <= q)
        if key_valid is not None:
            allowed = allowed & key_valid[b, kv_idx]
        # A query always sees itself: with padding its row could otherwise be empty, SDPA would return NaN
        # for it, and the next layer would spread that NaN through the values (0 * NaN = NaN).
        return allowed | (kv_idx == q)

    return mask_mod


def dense_mask(mask_mod: MaskMod, q_len: int, k_len: int, batch: int | None, device: torch.device) -> Tensor:
    """The mask_mod evaluated everywhere: (batch or 1, 1, q_len, k_len) bool, SDPA's convention."""
    zero = torch.zeros((), dtype=torch.long, device=device)
    b = torch.arange(batch, device=device)[:, None, None] if batch is not None else zero
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    mask = mask_mod(b, zero, q, k)  # (B or 1, Tq, Tk) or (Tq, Tk)
    return mask.expand(batch or 1, q_len, k_len)[:, None]


def flex_block_mask(mask_mod: MaskMod, q_len: int, k_len: int, batch: int | None, block_size: int,
                    device: torch.device) -> BlockMask:
    """The mask_mod as flex_attention's BlockMask (broadcast over heads, and over the batch unless the
    rule reads a padding mask)."""
    # imported on use: the module pulls in sympy (~0.8 s per process), which dense models never need
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, batch, None, q_len, k_len, device=device, BLOCK_SIZE=block_size)


def computed_fraction(block_mask: BlockMask) -> float:
    """Fraction of (query block, key block) tiles flex_attention computes (partial or full)."""
    return 1.0 - block_mask.sparsity() / 100.0


class SparsePattern:
    """The block-sparse pattern of one Transformer stack of ``depth`` layers (random blocks differ by
    layer). :meth:`masks` is called once per forward and gives every layer its mask."""

    def __init__(self, cfg: SparseAttentionConfig, depth: int):
        self.cfg = cfg
        self.depth = depth

    def use_flex(self, q_len: int, k_len: int, device: torch.device) -> bool:
        """Whether :meth:`masks` gives BlockMasks for flex_attention rather than boolean SDPA masks.

        flex only on CUDA, where attention.py compiles it and empty blocks are skipped. Elsewhere the same
        mask goes through SDPA: torch 2.14's eager flex_attention computes every score anyway, has no
        CPU backward (NotImplementedError) and is 8-12x slower than SDPA with the mask (4k tokens, CPU:
        ``benchmarks/bench_sparse.py``). Also dense with a KV cache (a few new queries: nothing to skip).
        """
        return self.cfg.backend == "flex" and device.type == "cuda" and q_len == k_len

    def masks(
        self,
        q_len: int,
        k_len: int,
        *,
        causal: bool,
        key_padding_mask: Tensor | None,
        device: torch.device,
    ) -> list[Tensor | BlockMask]:
        """One mask per layer for ``q_len`` queries that are the last positions of ``k_len`` keys, of the
        kind :meth:`use_flex` picks; the same object for every layer when the pattern has no random blocks.
        ``key_padding_mask``: (B, k_len) bool, True for real tokens."""
        flex = self.use_flex(q_len, k_len, device)
        out = [self.build(layer, q_len, k_len, causal=causal, key_padding_mask=key_padding_mask, device=device,
                          flex=flex)
               for layer in range(self.depth if self.cfg.random_blocks else 1)]
        return out if self.cfg.random_blocks else out * self.depth

    def build(
        self,
        layer_idx: int,
        q_len: int,
        k_len: int,
        *,
        causal: bool,
        key_padding_mask: Tensor | None,
        device: torch.device,
        flex: bool,
    ) -> Tensor | BlockMask:
        """Layer ``layer_idx``'s mask: a BlockMask (``flex``, needs ``q_len == k_len``) or a boolean
        (B or 1, 1, q_len, k_len) SDPA mask."""
        cfg = self.cfg
        key_valid = key_padding_mask.to(device=device, dtype=torch.bool) if key_padding_mask is not None else None
        batch = key_valid.shape[0] if key_valid is not None else None
        layout = block_layout(cfg, math.ceil(k_len / cfg.block_size), layer_idx, causal).to(device)
        mod = make_mask_mod(cfg, layout, causal=causal, q_offset=k_len - q_len, key_valid=key_valid)
        if flex:
            return flex_block_mask(mod, q_len, k_len, batch, cfg.block_size, device)
        return dense_mask(mod, q_len, k_len, batch, device)
