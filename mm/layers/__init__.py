"""Shared building blocks: every tower of every mm model is made of these."""
from .attention import Attention, KVCache, make_attn_mask
from .block import Block, BlockCache, DropPath, LayerScale, Transformer, make_ffn
from .config import LoraConfig, MoEConfig, SparseAttentionConfig, TransformerConfig
from .mlp import Mlp, QuickGELU, SwiGLU
from .moe import MoE, RouterStats
from .pool import AttentionalPool, LatentAttentionPool, pool_text, text_valid_mask
from .position import RotaryEmbedding, RotaryEmbedding2D, apply_rope, sincos_1d, sincos_2d

__all__ = [
    "LoraConfig", "MoEConfig", "SparseAttentionConfig", "TransformerConfig",
    "Attention", "KVCache", "make_attn_mask", "Block", "BlockCache", "DropPath", "LayerScale", "Transformer", "make_ffn",
    "Mlp", "QuickGELU", "SwiGLU", "MoE", "RouterStats", "AttentionalPool", "LatentAttentionPool", "pool_text", "text_valid_mask",
    "RotaryEmbedding", "RotaryEmbedding2D", "apply_rope", "sincos_1d", "sincos_2d",
]
