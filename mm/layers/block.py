"""Pre-norm residual Block and the Transformer stack shared by every tower; ``make_ffn`` picks the FFN."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, KVCache, make_attn_mask
from .config import TransformerConfig
from .mlp import Mlp, SwiGLU
from .moe import MoE, RouterStats
from .sparse import SparsePattern


def is_moe_layer(cfg: TransformerConfig, layer_idx: int) -> bool:
    return cfg.moe is not None and (layer_idx + 1) % cfg.moe.every == 0


def make_ffn(cfg: TransformerConfig, layer_idx: int) -> nn.Module:
    """The one place that chooses a block's feed-forward layer: MoE (every ``moe.every`` blocks; or, as its
    dense twin, one FFN of top_k x the width there), SwiGLU or the plain MLP."""
    if is_moe_layer(cfg, layer_idx) and cfg.moe.dense_twin:
        hidden = cfg.moe.top_k * cfg.mlp_hidden
        return SwiGLU(cfg.width, hidden) if cfg.ffn == "swiglu" else Mlp(cfg.width, hidden, cfg.act)
    if is_moe_layer(cfg, layer_idx):
        return MoE(cfg.width, cfg.mlp_hidden, cfg.moe, act=cfg.act, swiglu=cfg.ffn == "swiglu")
    eps = cfg.norm_eps if cfg.sub_norm else None
    if cfg.ffn == "swiglu":
        return SwiGLU(cfg.width, cfg.mlp_hidden, norm_eps=eps)
    return Mlp(cfg.width, cfg.mlp_hidden, cfg.act, norm_eps=eps)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample in training, rescale the survivors."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


@dataclass
class BlockCache:
    """One block's decoding state: its self-attention keys/values and its cross-attention context."""

    self_kv: KVCache | None = None
    cross_kv: KVCache | None = None

    def reorder(self, index: torch.Tensor) -> None:
        if self.self_kv is not None:
            self.self_kv.reorder(index)


def _scale(cfg: TransformerConfig) -> nn.Module:
    return LayerScale(cfg.width, cfg.layer_scale) if cfg.layer_scale is not None else nn.Identity()


class Block(nn.Module):
    """x + attn(norm(x)) [+ cross_attn(norm(x), norm(context))] + ffn(norm(x)), each branch with optional
    LayerScale and drop-path. ``self_attn=False`` with ``cross_dim`` gives a cross-attention-only block."""

    def __init__(
        self,
        cfg: TransformerConfig,
        layer_idx: int = 0,
        *,
        self_attn: bool = True,
        cross_dim: int | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        w, eps = cfg.width, cfg.norm_eps
        attn_kw = dict(qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, sub_norm=cfg.sub_norm, norm_eps=eps)
        self_kw = dict(attn_kw, k_bias=cfg.k_bias)
        if self_attn:
            self.norm1 = nn.LayerNorm(w, eps=eps)
            self.attn = Attention(w, cfg.heads, **self_kw)
            self.ls1 = _scale(cfg)
        if cross_dim is not None:
            self.norm_cross = nn.LayerNorm(w, eps=eps)
            self.norm_context = nn.LayerNorm(cross_dim, eps=eps)
            self.cross_attn = Attention(w, cfg.heads, cross=True, kv_dim=cross_dim, **attn_kw)
            self.ls_cross = _scale(cfg)
        self.norm2 = nn.LayerNorm(w, eps=eps)
        self.ffn = make_ffn(cfg, layer_idx)
        self.ls2 = _scale(cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_idx = layer_idx  # picks this layer's block-sparse mask (random blocks differ by layer)
        self.has_self_attn = self_attn
        self.has_cross_attn = cross_dim is not None
        self.is_moe = isinstance(self.ffn, MoE)

    def forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: BlockCache | None = None,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        if self.has_self_attn:
            kv = cache.self_kv if cache is not None else None
            h = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, rope=rope, cache=kv)
            x = x + self.drop_path(self.ls1(h))
        if self.has_cross_attn:
            kv = cache.cross_kv if cache is not None else None
            # with a filled cache the context was normed and projected on the first step already
            ctx = self.norm_context(context) if kv is None or kv.k is None else None
            h = self.cross_attn(self.norm_cross(x), ctx, attn_mask=context_mask, cache=kv)
            x = x + self.drop_path(self.ls_cross(h))
        stats = None
        if self.is_moe:
            h, stats = self.ffn(self.norm2(x), valid)
        else:
            h = self.ffn(self.norm2(x))
        return x + self.drop_path(self.ls2(h)), stats


class Transformer(nn.Module):
    """A stack of ``cfg.depth`` layers of Blocks, optionally cross-attending to a context of width
    ``cross_dim``: with ``cross_layout="fused"`` every Block has self-attention, cross-attention and an
    FFN; with ``"separate"`` each layer is a self-attention Block followed by a cross-attention-only
    Block, each with its own FFN (open_clip's CoCa decoder)."""

    def __init__(self, cfg: TransformerConfig, *, cross_dim: int | None = None, cross_layout: str = "fused"):
        super().__init__()
        self.cfg = cfg
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        if cross_dim is not None and cross_layout == "separate":
            blocks = []
            for i in range(cfg.depth):
                blocks.append(Block(cfg, i, drop_path=rates[i]))
                blocks.append(Block(cfg, i, self_attn=False, cross_dim=cross_dim, drop_path=rates[i]))
        elif cross_layout in ("fused", "separate"):
            blocks = [Block(cfg, i, cross_dim=cross_dim, drop_path=rates[i]) for i in range(cfg.depth)]
        else:
            raise ValueError(f"cross_layout must be fused or separate, got {cross_layout!r}")
        self.blocks = nn.ModuleList(blocks)
        self.sparse = SparsePattern(cfg.sparse_attention, cfg.depth) if cfg.sparse_attention is not None else None
        self.grad_checkpointing = False  # a training setting (train.grad_checkpointing): set_grad_checkpointing()
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP's initialisation (Radford et al. 2021, as in open_clip's text tower), for every tower:
        residual-branch outputs scaled down with depth so the stream's variance stays bounded."""
        w, depth = self.cfg.width, self.cfg.depth
        attn_std, proj_std, fc_std = w**-0.5, w**-0.5 * (2 * depth) ** -0.5, (2 * w) ** -0.5
        for blk in self.blocks:
            for a in (getattr(blk, "attn", None), getattr(blk, "cross_attn", None)):
                if a is None:
                    continue
                for lin in (getattr(a, "qkv", None), getattr(a, "q", None), getattr(a, "kv", None)):
                    if lin is not None:
                        nn.init.normal_(lin.weight, std=attn_std)
                        if lin.bias is not None:
                            nn.init.zeros_(lin.bias)
                for bias in (getattr(a, "q_bias", None), getattr(a, "v_bias", None)):
                    if bias is not None:
                        nn.init.zeros_(bias)
                nn.init.normal_(a.proj.weight, std=proj_std)
                nn.init.zeros_(a.proj.bias)
            if not blk.is_moe:
                nn.init.normal_(blk.ffn.fc1.weight, std=fc_std)
                nn.init.normal_(blk.ffn.fc2.weight, std=proj_std)
                nn.init.zeros_(blk.ffn.fc1.bias)
                nn.init.zeros_(blk.ffn.fc2.bias)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        context: torch.Tensor | None = None,
        context_padding_mask: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: list[BlockCache] | None = None,
    ) -> tuple[torch.Tensor, list[RouterStats]]:
        """x: (B, T, width). Masks are built once here and shared by all blocks. ``valid`` (B, T) marks
        real tokens for MoE routing (defaults to ``key_padding_mask``). With a ``cache`` (from
        :meth:`new_cache`), x holds the positions after those already cached; ``key_padding_mask`` then
        covers all keys (cached + new). With ``cfg.sparse_attention`` each layer's self-attention gets the
        block-sparse pattern ANDed with ``causal`` and ``key_padding_mask`` (cross-attention stays dense).
        Returns the output and the router statistics of every MoE block in order."""
        past = self.cached_length(cache)
        q_len, k_len = x.shape[1], past + x.shape[1]
        layer_masks = None
        if self.sparse is not None:
            layer_masks = self.sparse.masks(q_len, k_len, causal=causal, key_padding_mask=key_padding_mask,
                                            device=x.device)
            attn_mask, is_causal = None, False  # each block gets its layer's mask below
        else:
            attn_mask, is_causal = make_attn_mask(
                q_len, k_len, causal=causal, key_padding_mask=key_padding_mask, device=x.device
            )
        context_mask = None
        if context_padding_mask is not None:
            context_mask, _ = make_attn_mask(
                x.shape[1], context.shape[1], key_padding_mask=context_padding_mask, device=x.device
            )
        if valid is None:
            valid = key_padding_mask
        kw = dict(attn_mask=attn_mask, is_causal=is_causal, rope=rope, context=context,
                  context_mask=context_mask, valid=valid)
        stats: list[RouterStats] = []
        for i, blk in enumerate(self.blocks):
            if layer_masks is not None:
                kw["attn_mask"] = layer_masks[blk.layer_idx]
            if cache is not None:
                x, s = blk(x, cache=cache[i], **kw)
            elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, s = checkpoint(blk, x, use_reentrant=False, **kw)
            else:
                x, s = blk(x, **kw)
            if s is not None:
                stats.append(s)
        return x, stats

    def new_cache(self, max_len: int) -> list[BlockCache]:
        """Empty decoding state for sequences of up to ``max_len`` positions (see :meth:`forward`)."""
        return [
            BlockCache(KVCache(max_len) if blk.has_self_attn else None, KVCache() if blk.has_cross_attn else None)
            for blk in self.blocks
        ]

    @staticmethod
    def cached_length(cache: list[BlockCache] | None) -> int:
        """Positions already held by ``cache`` (0 without one)."""
        for c in cache or ():
            if c.self_kv is not None:
                return c.self_kv.length
        return 0
