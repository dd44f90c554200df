"""Named model configs: mm's own presets (``tiny-*`` for tests, the demo and CPU benchmarks; MoE and LIMoE
models), and the names of registered preset sources: every model of open_clip's registry by its open_clip name
(``ViT-B-32``, ``coca_ViT-L-14``, ``ViT-SO400M-14-SigLIP``...), translated from open_clip's own config by the
interop layer (``mm.hub.open_clip_configs``, which registers itself here when ``mm.hub`` is imported: this layer
imports nothing of open_clip or timm). No open_clip architecture is written out here."""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol

from ..config import ConfigError, validate
from ..layers.config import MoEConfig, TransformerConfig
from .config import DecoderConfig, ModelConfig, TextConfig, VisionConfig

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


class NotNative(ConfigError):
    """A model (of open_clip's, or another preset source's) whose architecture mm does not build with its own
    blocks; the message says which part (an open_clip model still runs through open_clip: ``--model
    open_clip:NAME``)."""


class PresetSource(Protocol):
    """Model names and config dicts in another library's format, translated into ModelConfigs by a higher layer
    (``mm.hub`` registers open_clip's registry): what :func:`get_preset` and ``resolve_config`` fall back to."""

    def names(self) -> list[str]:
        """The model names the source knows."""

    def config(self, name: str) -> ModelConfig:
        """A fresh, validated config of model ``name`` (one of :meth:`names`); NotNative for what mm does not
        build."""

    def translate(self, data: Any) -> ModelConfig | None:
        """The validated config of ``data`` when it is a config dict in the source's format, else None."""


_SOURCES: dict[str, PresetSource] = {}


def register_source(name: str, source: PresetSource) -> None:
    """Make ``source``'s model names and config format known to :func:`get_preset` and ``resolve_config``, after
    mm's own presets and the sources registered before it (registering a name again replaces that source)."""
    _SOURCES[name] = source


def source_names() -> list[str]:
    """Every registered source's model names, in registration order (mm's own presets not included)."""
    return [n for source in _SOURCES.values() for n in source.names()]


def translate_config(data: Any) -> ModelConfig | None:
    """``data`` translated by the first registered source whose config format it is, else None."""
    for source in _SOURCES.values():
        cfg = source.translate(data)
        if cfg is not None:
            return cfg
    return None


def preset(name: str):
    def register(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        _PRESETS[name] = fn
        return fn
    return register


def list_models() -> list[str]:
    """mm's own preset names, sorted (open_clip's registry names: ``mm.models.build.list_models``)."""
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh, validated config: mm's preset ``name``, else a registered source's model ``name`` translated
    (open_clip's registry; ``NotNative`` names what mm does not build of it). KeyError for a name none knows."""
    if name in _PRESETS:
        return validate(_PRESETS[name]())
    for source in _SOURCES.values():
        if name in source.names():
            return source.config(name)
    hint = "" if _SOURCES else " (open_clip's names are known once mm.hub is imported: `import mm.hub`)"
    raise KeyError(f"unknown model preset {name!r}: not one of mm's ({', '.join(list_models())}) nor of open_clip's "
                   f"registry (mm.list_models() lists both){hint}")


def _open_clip_based(name: str) -> ModelConfig:
    """open_clip's ``name`` (through its registered source) as the starting point of an mm preset (no longer
    open_clip's: its source is cleared)."""
    cfg = get_preset(name)
    cfg.open_clip = None
    return cfg


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
    cfg = _open_clip_based("ViT-B-16")
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


@preset("demo-coca")
def demo_coca() -> ModelConfig:
    """The built-in demo's model (`make run`, data/builtin.yaml): tiny-clip with a convolutional stem
    (3x3 convs down to patch 8: 16 tokens of 32 px), a 2-layer captioning decoder reading the ViT's tokens
    (class-token pooling; no attentional pooler) and context 20 (the built-in captions' longest is 17 tokens).
    Why each choice: docs/concepts.md, "What the demo model needed"."""
    cfg = tiny_clip()
    cfg.vision.stem, cfg.vision.patch_size = "conv", 8
    cfg.text.context_length = 20
    cfg.decoder = DecoderConfig(TransformerConfig(128, 2, 2), layout="separate")
    return cfg


@preset("tiny-siglip2")
def tiny_siglip2() -> ModelConfig:
    """The SigLIP 2 recipe at tiny size (`mm shards builtin --scenes`, 64 px scenes): tiny-clip's widths with a
    convolutional stem to patch 8 (64 tokens), no class token and SigLIP's MAP head, SigLIP's logit scale / bias
    init, and a 2-layer LocCa decoder reading the patch tokens with 32 box-coordinate bins (2 px each), whose box
    tokens are the last 32 ids of the text vocabulary (CLIP BPE + 32)."""
    cfg = tiny_clip()
    v = cfg.vision
    v.image_size, v.stem, v.patch_size, v.class_token, v.pool, v.attn_pool_heads = 64, "conv", 8, False, "map", 4
    cfg.init_logit_scale, cfg.init_logit_bias = math.log(10.0), -10.0
    cfg.text.vocab_size = 49408 + 32
    cfg.decoder = DecoderConfig(TransformerConfig(128, 2, 2), layout="separate", loc_bins=32)
    return cfg
