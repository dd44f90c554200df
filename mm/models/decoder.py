"""CoCa's multimodal captioning decoder: the shared Transformer with cross-attention to image tokens,
then a norm and an LM head over the text vocabulary.

It has no token embedding of its own: like CoCa (Yu et al. 2022) and open_clip, it continues from the
text tower's causal token features, so the text tower is the decoder's unimodal half and the two share
the embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import BlockCache, RouterStats, Transformer
from .config import DecoderConfig


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, context_dim: int, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        w = cfg.transformer.width
        self.transformer = Transformer(cfg.transformer, cross_dim=context_dim, cross_layout=cfg.layout)
        self.norm = nn.LayerNorm(w, eps=cfg.transformer.norm_eps)
        self.head = nn.Linear(w, vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=w**-0.5)

    def forward(
        self,
        x: torch.Tensor,
        image_tokens: torch.Tensor | None,
        *,
        valid: torch.Tensor | None = None,
        cache: list[BlockCache] | None = None,
        select: torch.Tensor | None = None,
        context_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[RouterStats]]:
        """x: (B, T, width) text features; image_tokens: (B, S, context_dim) (may be None once a cache
        holds their keys/values). Returns next-token logits (B, T, vocab), or with ``select`` ((B, T)
        bool) only those positions' logits, packed as (N, vocab); and MoE router statistics. ``context_valid``
        (B, S) bool: the image tokens to attend to (NaFlex padding left out; None: all)."""
        x, stats = self.transformer(x, causal=True, context=image_tokens, context_padding_mask=context_valid,
                                    valid=valid, cache=cache)
        if select is not None:
            # The LM head is the widest matmul of a small CoCa (vocab 49,408) and its logits the largest
            # activation; positions that predict padding would only be thrown away by the loss.
            x = x[select]
        return self.head(self.norm(x)), stats
