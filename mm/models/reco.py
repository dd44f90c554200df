"""RECO's fusion (Iscen et al., "Retrieval-Enhanced Contrastive Vision-Text Models", ICLR 2024): an embedding is
refined by the embeddings of the other modality that its nearest neighbours in a datastore of image-text pairs
carry. An image's k nearest datastore images bring their captions' text embeddings; a text's k nearest datastore
texts bring their images' embeddings (cross-modal fusion, the paper's best). One small transformer per side,
built from the shared blocks, reads ``[query, neighbour_1 .. neighbour_k]`` and its output at the query's position
is added to the query, through a projection initialised to zero: an untrained fusion is the identity, so
retrieval-augmented zero-shot starts from plain zero-shot exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.block import Transformer
from ..layers.config import TransformerConfig


@dataclass
class RecoConfig:
    dim: int = 512  # the embeddings' width (the model's embed_dim)
    k: int = 8  # neighbours fused per embedding
    depth: int = 1  # transformer blocks per side (RECO: one)
    heads: int = 8  # attention heads (dim must divide by them)


class Fuser(nn.Module):
    """One side's fusion: ``normalize(query + proj(transformer([query, neighbours])[0]))``."""

    def __init__(self, cfg: RecoConfig):
        super().__init__()
        heads = cfg.heads if cfg.dim % cfg.heads == 0 else 1
        self.transformer = Transformer(TransformerConfig(width=cfg.dim, depth=cfg.depth, heads=heads))
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, query: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """query (B, d) unit embeddings, neighbours (B, k, d) -> (B, d) unit embeddings."""
        x, _ = self.transformer(torch.cat([query[:, None], neighbours], 1))
        return F.normalize(query + self.proj(self.norm(x[:, 0])), dim=-1)


class RecoFusion(nn.Module):
    """The two sides: ``image(query, neighbour texts)`` and ``text(query, neighbour images)``."""

    def __init__(self, cfg: RecoConfig):
        super().__init__()
        self.cfg = cfg
        self.image, self.text = Fuser(cfg), Fuser(cfg)
