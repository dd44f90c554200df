"""Text tower: token + position embedding -> Transformer (causal or bidirectional) -> norm -> pool -> project."""
from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from ..layers import RotaryEmbedding, Transformer, pool_text, text_valid_mask
from .vision import TowerOutput


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        w = cfg.transformer.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.pos_embed, self.rope = None, None
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, w) * 0.01)
        else:
            self.rope = RotaryEmbedding(cfg.transformer.head_dim, cfg.context_length)
        self.transformer = Transformer(cfg.transformer)
        self.norm = nn.LayerNorm(w, eps=cfg.transformer.norm_eps)
        self.proj = nn.Linear(w, embed_dim, bias=cfg.proj_bias)
        nn.init.normal_(self.proj.weight, std=w**-0.5)
        if cfg.proj_bias:
            nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor) -> TowerOutput:
        """tokens: (B, T) ids, T <= context_length."""
        t = tokens.shape[1]
        if t > self.cfg.context_length:
            raise ValueError(f"text has {t} tokens, more than context_length {self.cfg.context_length}")
        x = self.token_embedding(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:t].to(x.dtype)
        valid = text_valid_mask(tokens, eot_id=self.cfg.eot_id, pad_id=self.cfg.pad_id)
        rope = self.rope(t) if self.rope is not None else None
        if self.cfg.causal:
            # No padding mask needed: padding follows the end token, and causal attention never lets an
            # earlier position see it. Keeping the mask out lets SDPA use its causal kernels.
            x, stats = self.transformer(x, causal=True, rope=rope, valid=valid)
        else:
            x, stats = self.transformer(x, key_padding_mask=valid, rope=rope)
        x = self.norm(x)
        pooled = pool_text(x, tokens, self.cfg.pool, eot_id=self.cfg.eot_id, valid=valid)
        return TowerOutput(self.proj(pooled), x, stats)
