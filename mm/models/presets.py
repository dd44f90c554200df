"""Named model presets. Names follow open_clip where an open_clip model exists (same shapes, same
parameter count); ``tiny-*`` presets are for tests, the demo and CPU benchmarks."""
from __future__ import annotations

import math
from typing import Callable

from ..config import validate
from ..layers.config import MoEConfig, TransformerConfig
from .config import DecoderConfig, ModelConfig, TextConfig, VisionConfig

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def preset(name: str):
    def register(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        _PRESETS[name] = fn
        return fn
    return register


def list_models() -> list[str]:
    """All preset names, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh, validated config for preset ``name``."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(list_models())}")
    return validate(_PRESETS[name]())


def openai_vit(
    embed_dim: int,
    *,
    image_size: int,
    patch_size: int,
    v_width: int,
    v_depth: int,
    t_width: int,
    t_depth: int,
    t_heads: int,
    v_head_width: int = 64,
    quick_gelu: bool = False,
    context_length: int = 77,
) -> ModelConfig:
    """The CLIP ViT family as open_clip builds it (``vision_cfg`` / ``text_cfg`` with default extras)."""
    act = "quick_gelu" if quick_gelu else "gelu"
    return ModelConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            transformer=TransformerConfig(v_width, v_depth, v_width // v_head_width, act=act),
        ),
        text=TextConfig(context_length=context_length, transformer=TransformerConfig(t_width, t_depth, t_heads, act=act)),
    )


def _b(patch: int, image: int = 224, quick: bool = False) -> ModelConfig:
    return openai_vit(512, image_size=image, patch_size=patch, v_width=768, v_depth=12,
                      t_width=512, t_depth=12, t_heads=8, quick_gelu=quick)


def _l(image: int = 224, quick: bool = False) -> ModelConfig:
    return openai_vit(768, image_size=image, patch_size=14, v_width=1024, v_depth=24,
                      t_width=768, t_depth=12, t_heads=12, quick_gelu=quick)


preset("ViT-B-32")(lambda: _b(32))
preset("ViT-B-32-quickgelu")(lambda: _b(32, quick=True))
preset("ViT-B-32-256")(lambda: _b(32, image=256))
preset("ViT-B-16")(lambda: _b(16))
preset("ViT-B-16-quickgelu")(lambda: _b(16, quick=True))
preset("ViT-L-14")(lambda: _l())
preset("ViT-L-14-quickgelu")(lambda: _l(quick=True))
preset("ViT-L-14-336")(lambda: _l(image=336))
preset("ViT-H-14")(lambda: openai_vit(1024, image_size=224, patch_size=14, v_width=1280, v_depth=32, v_head_width=80,
                                      t_width=1024, t_depth=24, t_heads=16))


@preset("tiny-clip")
def tiny_clip() -> ModelConfig:
    """ViT 6x192 (patch 4, 32 px) + text 4x128, context 32: trains on CPU in minutes."""
    return ModelConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=32, patch_size=4, transformer=TransformerConfig(192, 6, 3)),
        text=TextConfig(context_length=32, transformer=TransformerConfig(128, 4, 2)),
    )


@preset("micro-clip")
def micro_clip() -> ModelConfig:
    """ViT 4x128 (patch 4, 32 px) + text 2x64, embed 64: a distillation student for tiny-clip (3.6x fewer FLOPs)."""
    return ModelConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=4, transformer=TransformerConfig(128, 4, 2)),
        text=TextConfig(context_length=32, transformer=TransformerConfig(64, 2, 1)),
    )


@preset("tiny-siglip")
def tiny_siglip() -> ModelConfig:
    """tiny-clip with SigLIP's logit scale / bias init (Zhai et al. 2023: t' = log 10, b = -10)."""
    cfg = tiny_clip()
    cfg.init_logit_scale, cfg.init_logit_bias = math.log(10.0), -10.0
    return cfg


@preset("tiny-moe")
def tiny_moe() -> ModelConfig:
    """tiny-clip with an 8-expert top-2 MoE FFN in every second block of both towers."""
    cfg = tiny_clip()
    cfg.vision.transformer.moe = MoEConfig(num_experts=8, top_k=2, every=2)
    cfg.text.transformer.moe = MoEConfig(num_experts=8, top_k=2, every=2)
    return cfg


@preset("tiny-moe-dense")
def tiny_moe_dense() -> ModelConfig:
    """tiny-moe's dense equal-active-parameter twin: where tiny-moe has 8 experts (top-2) of width 768,
    one dense FFN of width 1536, so each token meets the same weights and FLOPs, without routing."""
    cfg = tiny_moe()
    for t in (cfg.vision.transformer, cfg.text.transformer):
        t.moe.dense_twin = True
    return cfg


@preset("ViT-B-16-moe")
def vit_b_16_moe() -> ModelConfig:
    """ViT-B-16 with an 8-expert top-2 MoE FFN in every second block of both towers."""
    cfg = _b(16)
    cfg.vision.transformer.moe = MoEConfig(num_experts=8, top_k=2, every=2)
    cfg.text.transformer.moe = MoEConfig(num_experts=8, top_k=2, every=2)
    return cfg


@preset("tiny-limoe")
def tiny_limoe() -> ModelConfig:
    """One-tower LIMoE at tiny-clip's sizes: one 6x192 stack for 32 px images (patch 4) and 32-token texts,
    an 8-expert top-1 MoE FFN in every second block, with LIMoE's entropy losses. As in LIMoE the text is
    encoded bidirectionally, so both modalities share every router call (see mm/models/limoe.py)."""
    cfg = tiny_clip()
    # eval_capacity_factor=None: at evaluation every token reaches its experts, so an embedding does not
    # depend on what else shares the router call (encode_text routes texts alone, training with images).
    # batch_priority: over capacity, the least confident tokens are dropped, not the texts (last in the call).
    moe = MoEConfig(num_experts=8, top_k=1, every=2, eval_capacity_factor=None, batch_priority=True,
                    local_entropy_weight=0.01, global_entropy_weight=0.01, global_entropy_threshold=math.log(4))
    cfg.one_tower = TransformerConfig(192, 6, 3, moe=moe)
    cfg.vision.transformer = cfg.text.transformer = None
    cfg.text.causal = False
    return cfg


def _coca(cfg: ModelConfig, decoder: TransformerConfig) -> ModelConfig:
    """open_clip's CoCa on a ViT CLIP: 256-query attentional pooling (8 heads), a text tower with an appended
    class token (context 76 + 1, open_clip's class-token mask) and a multimodal decoder in its layout."""
    cfg.vision.pool = "attn"
    cfg.vision.attn_pool_queries, cfg.vision.attn_pool_heads = 256, 8
    cfg.text.context_length = 76
    cfg.text.embed_cls, cfg.text.cls_mask = True, "open_clip"
    cfg.decoder = DecoderConfig(decoder, layout="separate")
    return cfg


preset("coca_ViT-B-32")(lambda: _coca(_b(32), TransformerConfig(512, 12, 8)))
preset("coca_ViT-L-14")(lambda: _coca(_l(), TransformerConfig(768, 12, 12)))


@preset("tiny-coca")
def tiny_coca() -> ModelConfig:
    """tiny-clip made CoCa: 64-query attentional pooling (1 contrastive + 63 decoder tokens), a class
    token on the text tower and a 2-layer decoder in open_clip's layout."""
    cfg = tiny_clip()
    cfg.vision.pool = "attn"
    cfg.vision.attn_pool_queries, cfg.vision.attn_pool_heads = 64, 4
    cfg.text.embed_cls = True
    cfg.decoder = DecoderConfig(TransformerConfig(128, 2, 2), layout="separate")
    return cfg
