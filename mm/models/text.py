"""Text tower: token + position embedding -> Transformer (causal or bidirectional) -> norm -> pool -> project."""
from __future__ import annotations

import torch
from torch import nn

from ..layers import (
    BlockCache,
    RotaryEmbedding,
    Transformer,
    TransformerConfig,
    pool_text,
    text_valid_mask,
)
from .config import TextConfig
from .vision import TowerOutput


class _TextParts(nn.Module):
    """What every text tower has around a Transformer stack: ``embed`` (token + position embeddings) and
    ``head`` (final norm, pooling, projection); ``stack`` gives the widths."""

    def _init_embed(self, cfg: TextConfig, stack: TransformerConfig) -> None:
        self.cfg = cfg
        w = stack.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        # CoCa appends a class token after the text; it needs one more position
        n_pos = cfg.context_length + int(cfg.embed_cls)
        self.cls_token = nn.Parameter(torch.randn(w) * 0.01) if cfg.embed_cls else None
        self.pos_embed, self.rope = None, None
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(n_pos, w) * 0.01)
        else:
            self.rope = RotaryEmbedding(stack.head_dim, n_pos)

    def _init_head(self, cfg: TextConfig, embed_dim: int, stack: TransformerConfig) -> None:
        w = stack.width
        self.norm = nn.LayerNorm(w, eps=stack.norm_eps)
        if cfg.proj == "linear":
            self.proj = nn.Linear(w, embed_dim, bias=cfg.proj_bias)
            nn.init.normal_(self.proj.weight, std=w**-0.5)
            if cfg.proj_bias:
                nn.init.zeros_(self.proj.bias)
        else:  # the pooled features are the embedding (their width is embed_dim)
            self.proj = nn.Identity()

    def _check_length(self, t: int) -> None:
        if t > self.cfg.context_length:
            raise ValueError(f"text has {t} tokens, more than context_length {self.cfg.context_length}")

    def embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> the stack's input (B, T, width), token + learned position embeddings (RoPE
        positions enter in attention instead), and the real-token mask (B, T)."""
        self._check_length(tokens.shape[1])
        x = self.token_embedding(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed[: tokens.shape[1]].to(x.dtype)
        return x, text_valid_mask(tokens, eot_id=self.cfg.eot_id, pad_id=self.cfg.pad_id)

    def head(self, x: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stack's output (B, T, width) -> projected pooled embedding (B, embed_dim) and normed tokens."""
        x = self.norm(x)
        pooled = pool_text(x, tokens, self.cfg.pool, eot_id=self.cfg.eot_id, valid=valid)
        return self.proj(pooled), x


class TextEmbedHead(_TextParts):
    """A text tower without a stack of its own (``transformer`` is None): a one-tower model (LIMoE,
    mm/models/limoe.py) runs its one shared stack, ``stack``, between ``embed`` and ``head``."""

    transformer = None

    def __init__(self, cfg: TextConfig, embed_dim: int, stack: TransformerConfig):
        super().__init__()
        self._init_embed(cfg, stack)
        self._init_head(cfg, embed_dim, stack)


class TextTower(_TextParts):
    """The text tower of a two-tower model: ``embed`` -> its own ``Transformer`` (causal or bidirectional)
    -> ``head``; CoCa's appended class token and the decoder's incremental token features."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        # registered in this order (embedding, stack, head): parameters, and so the optimizer state of
        # training checkpoints, are listed in it
        self._init_embed(cfg, cfg.transformer)
        self.transformer = Transformer(cfg.transformer)
        self._init_head(cfg, embed_dim, cfg.transformer)

    def forward(self, tokens: torch.Tensor) -> TowerOutput:
        """tokens: (B, T) ids, T <= context_length.

        ``tokens`` of the output are the per-position features a captioning decoder continues from:
        after the final norm, except with ``embed_cls`` where (as in open_clip's CoCa) the norm is
        applied to the pooled class token only.
        """
        if self.cls_token is not None:
            return self._forward_cls(tokens)
        x, valid = self.embed(tokens)
        rope = self.rope(tokens.shape[1]) if self.rope is not None else None
        if self.cfg.causal:
            # No padding mask needed: padding follows the end token, and causal attention never lets an
            # earlier position see it. Keeping the mask out lets SDPA use its causal kernels.
            x, stats = self.transformer(x, causal=True, rope=rope, valid=valid)
        else:  # bidirectional: padding hidden from attention unless the weights were trained seeing it
            x, stats = self.transformer(x, key_padding_mask=valid if self.cfg.pad_mask else None, rope=rope,
                                        valid=valid)
        emb, x = self.head(x, tokens, valid)
        return TowerOutput(emb, x, stats)

    def _forward_cls(self, tokens: torch.Tensor) -> TowerOutput:
        """CoCa: the class token goes last, so causally it sees the whole text while no text position
        sees it; it alone needs the padding mask."""
        b, t = tokens.shape
        self._check_length(t)
        valid = text_valid_mask(tokens, eot_id=self.cfg.eot_id, pad_id=self.cfg.pad_id)
        x = self.token_embedding(tokens)
        x = torch.cat([x, self.cls_token.to(x.dtype).expand(b, 1, -1)], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed[: t + 1].to(x.dtype)
        rope = self.rope(t + 1) if self.rope is not None else None
        ones = valid.new_ones(b, 1)
        if self.cfg.cls_mask == "open_clip":
            # open_clip's default CoCa mask: padding by id, shifted right by one position (its
            # pretrained CoCa weights were trained with it)
            keys = torch.cat([ones, tokens != self.cfg.pad_id], dim=1)
        else:
            keys = torch.cat([valid, ones], dim=1)
        x, stats = self.transformer(x, causal=True, key_padding_mask=keys, rope=rope,
                                    valid=torch.cat([valid, ones], dim=1))
        pooled = self.norm(x[:, -1])
        return TowerOutput(self.proj(pooled), x[:, :-1], stats)

    def token_features(self, tokens: torch.Tensor, cache: list[BlockCache] | None = None) -> torch.Tensor:
        """Causal features of ``tokens`` (B, T) for the captioning decoder, without the class token and
        without padding masks (every position is a real token while generating). With a ``cache``
        (from ``self.transformer.new_cache``) ``tokens`` are the positions after those cached."""
        offset = Transformer.cached_length(cache)
        t = tokens.shape[1]
        if offset + t > self.cfg.context_length:
            raise ValueError(f"text has {offset + t} tokens, more than context_length {self.cfg.context_length}")
        x = self.token_embedding(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed[offset : offset + t].to(x.dtype)
        rope = self.rope(t, offset) if self.rope is not None else None
        x, _ = self.transformer(x, causal=True, rope=rope, cache=cache)
        return x if self.cls_token is not None else self.norm(x)
