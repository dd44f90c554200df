"""open_clip's model configs as mm ModelConfigs: every model of its registry (``open_clip.get_model_config``) or a
user's config dict in its format, translated field by field, so that mm builds the same network.

open_clip's own ViT and text transformer (and CoCa's decoder) are read from the config dict with open_clip's
defaults (the values of its ``CLIPVisionCfg`` / ``CLIPTextCfg`` / ``MultimodalCfg`` dataclasses, copied below
and compared with them by a test). The registry is read from the JSON files open_clip ships, without importing
open_clip (which takes 3-6 s). An image tower open_clip builds with timm (SigLIP, the Perception Encoder, timm's CLIP ViTs) is built by
timm on the meta device (no memory, no weights) and read module by module: its structure, not a list of names,
decides what mm builds; a structure mm's blocks do not express raises :class:`NotNative` naming it. Models that
are not native (ConvNeXt, ViTamin, FastViT, ResNet and Hugging Face text towers) still run in mm through
open_clip itself (``mm.hub``'s wrapper).

This is interop code (it builds timm modules), so it lives in ``mm.hub``, above ``mm.models``: importing it
registers open_clip's registry as a preset source of ``mm.models.presets`` (:data:`SOURCE`), which is how
``get_preset`` / ``resolve_config`` / ``list_models`` know open_clip's names without ``mm.models`` importing it.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, validate
from ..layers import TransformerConfig
from ..models.config import (
    AxialRopeConfig,
    DecoderConfig,
    ModelConfig,
    OpenClipSource,
    TextConfig,
    VisionConfig,
)
from ..models.presets import NotNative, register_source

CLIP_VOCAB, CLIP_EOT, CLIP_SOT = 49408, 49407, 49406
_CUSTOM_BLOCK_KEYS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


# open_clip 3.3's defaults for what a model config leaves out (its dataclasses; tests/test_open_clip_zoo.py
# checks these against them, so a new open_clip release that changes one shows up)
VISION_DEFAULTS: dict[str, Any] = dict(
    layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224, ls_init_value=None,
    patch_dropout=0.0, attentional_pool=False, attn_pooler_queries=256, attn_pooler_heads=8, no_ln_pre=False,
    pos_embed_type="learnable", final_ln_after_pool=False, pool_type="tok", output_tokens=False, act_kwargs=None,
    norm_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False, scale_heads=False,
    scale_attn_inner=False, scale_attn=False, scale_fc=False, timm_model_name=None, timm_model_pretrained=False,
    timm_pool="avg", timm_proj="linear", timm_proj_bias=False, timm_drop=0.0, timm_drop_path=None)
TEXT_DEFAULTS: dict[str, Any] = dict(
    context_length=77, vocab_size=49408, hf_tokenizer_name=None, tokenizer_mode=None, tokenizer_kwargs=None,
    width=512, heads=8, layers=12, mlp_ratio=4.0, ls_init_value=None, embed_cls=False, pad_id=0, eos_id=2,
    no_causal_mask=False, final_ln_after_pool=False, pool_type="argmax", proj_bias=False, proj_type="linear",
    output_tokens=False, act_kwargs=None, norm_kwargs=None, block_type=None, qk_norm=False,
    scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False, scale_attn=False, scale_fc=False,
    hf_model_name=None, hf_model_pretrained=True, hf_proj_type="mlp", hf_pooler_type="mean_pooler")
MULTIMODAL_DEFAULTS: dict[str, Any] = dict(TEXT_DEFAULTS, mlp_ratio=4, dim_head=64, heads=8, n_queries=256,
                                           attn_pooler_heads=8)


def _with_defaults(d: dict[str, Any], defaults: dict[str, Any], where: str) -> SimpleNamespace:
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: not a key of open_clip's config")
    return SimpleNamespace(**{**defaults, **d})


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, Path]:
    """open_clip's model config files by model name (what ``open_clip.list_models()`` lists), found without
    importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    return {f.stem: f for f in sorted(folder.glob("*.json"))}


def open_clip_model_names() -> list[str]:
    return list(_registry())


def registry_config(name: str) -> dict[str, Any]:
    """open_clip's config dict of model ``name``; ConfigError if open_clip has no such model."""
    path = _registry().get(name)
    if path is None:
        raise ConfigError(f"open_clip has no model {name!r}")
    return json.loads(path.read_text())


# -- activations and norms -------------------------------------------------------------------------------
def _act(quick_gelu: bool, act_kwargs: dict | None, where: str) -> str:
    kw = dict(act_kwargs or {})
    approximate = kw.pop("approximate", "none")
    if kw or approximate not in ("none", "tanh") or (quick_gelu and approximate != "none"):
        raise NotNative(f"{where}: activation {'QuickGELU' if quick_gelu else 'GELU'}({act_kwargs}) is not one of mm's")
    if quick_gelu:
        return "quick_gelu"
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _eps(norm_kwargs: dict | None, where: str) -> float:
    kw = dict(norm_kwargs or {})
    eps = kw.pop("eps", 1e-5)
    if kw:
        raise NotNative(f"{where}: LayerNorm({norm_kwargs}) is not one of mm's")
    return float(eps)


def _no_custom_blocks(cfg: Any, where: str) -> None:
    if getattr(cfg, "block_type", None) not in (None, "default") or any(getattr(cfg, k, False) for k in _CUSTOM_BLOCK_KEYS):
        raise NotNative(f"{where}: open_clip's custom attention blocks (qk-norm / scaled cosine / scale_* layers)")


def _square(size: Any, where: str) -> int:
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise NotNative(f"{where}: non-square images {tuple(size)}")
        size = size[0]
    return int(size)


def _ratio(width: int, hidden: int) -> float:
    """An mlp_ratio with ``int(width * ratio) == hidden`` (mm's and open_clip's rounding)."""
    ratio = hidden / width
    if int(width * ratio) != hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


# -- open_clip's own towers ------------------------------------------------------------------------------
def _vision(v: dict, embed_dim: int, quick_gelu: bool) -> VisionConfig:
    where = "vision_cfg"
    c = _with_defaults(v, VISION_DEFAULTS, where)
    if isinstance(c.layers, (tuple, list)):
        raise NotNative(f"{where}: a ResNet image tower (open_clip's ModifiedResNet)")
    _no_custom_blocks(c, where)
    if c.pos_embed_type != "learnable":
        raise NotNative(f"{where}: pos_embed_type {c.pos_embed_type!r}")
    if c.attentional_pool:
        pool = "attn"
    elif c.pool_type in ("tok", "avg"):
        pool = "cls" if c.pool_type == "tok" else "mean"
    else:
        raise NotNative(f"{where}: pool_type {c.pool_type!r}")
    stack = TransformerConfig(c.width, c.layers, c.width // c.head_width, mlp_ratio=c.mlp_ratio,
                              act=_act(quick_gelu, c.act_kwargs, where), norm_eps=_eps(c.norm_kwargs, where),
                              layer_scale=c.ls_init_value)
    return VisionConfig(image_size=_square(c.image_size, where), patch_size=c.patch_size, transformer=stack,
                        pool=pool, attn_pool_queries=c.attn_pooler_queries, attn_pool_heads=c.attn_pooler_heads,
                        norm_pre=not c.no_ln_pre, patch_dropout=c.patch_dropout,
                        final_ln_after_pool=c.final_ln_after_pool and pool != "attn")


_TEXT_POOLS = {"first": "first", "last": "end", "eos": "eos", "argmax": "argmax"}


def _text(t: dict, quick_gelu: bool) -> TextConfig:
    where = "text_cfg"
    c = _with_defaults(t, TEXT_DEFAULTS, where)
    if c.hf_model_name:
        raise NotNative(f"{where}: a Hugging Face text tower ({c.hf_model_name})")
    if c.tokenizer_mode:
        raise NotNative(f"{where}: tokenizer_mode {c.tokenizer_mode!r}")
    _no_custom_blocks(c, where)
    if c.pool_type not in _TEXT_POOLS:
        raise NotNative(f"{where}: pool_type {c.pool_type!r}")
    clip_bpe = not c.hf_tokenizer_name
    pool = _TEXT_POOLS[c.pool_type]
    if pool == "argmax" and clip_bpe and c.vocab_size == CLIP_VOCAB:
        pool = "eot"  # the end token is CLIP's largest id: argmax finds the first one, as mm's eot pooling does
    eot = CLIP_EOT if clip_bpe else c.eos_id
    stack = TransformerConfig(c.width, c.layers, c.heads, mlp_ratio=c.mlp_ratio,
                              act=_act(quick_gelu, c.act_kwargs, where), norm_eps=_eps(c.norm_kwargs, where),
                              layer_scale=c.ls_init_value)
    return TextConfig(
        vocab_size=c.vocab_size, context_length=c.context_length, transformer=stack, causal=not c.no_causal_mask,
        pool=pool, proj="none" if c.proj_type == "none" else "linear", proj_bias=c.proj_bias,
        pad_mask=not c.no_causal_mask,  # open_clip's bidirectional text attends to padding (no key padding mask)
        pad_id=c.pad_id, sot_id=CLIP_SOT if clip_bpe else eot, eot_id=eot, embed_cls=c.embed_cls,
        cls_mask="open_clip" if c.embed_cls else "correct",  # open_clip's CoCa default: correct_cls_mask off
        tokenizer="clip" if clip_bpe else f"hf:{c.hf_tokenizer_name}", tokenizer_kwargs=dict(c.tokenizer_kwargs or {}))


def _decoder(m: dict, quick_gelu: bool) -> DecoderConfig:
    c = _with_defaults(m, MULTIMODAL_DEFAULTS, "multimodal_cfg")
    # open_clip's MultimodalTransformer is built from width / heads / layers / ls_init_value only (MLP ratio 4,
    # LayerNorm eps 1e-5, GELU or QuickGELU)
    stack = TransformerConfig(c.width, c.layers, c.heads, act="quick_gelu" if quick_gelu else "gelu",
                              layer_scale=c.ls_init_value)
    return DecoderConfig(stack, layout="separate")


# -- timm image towers -----------------------------------------------------------------------------------
def _timm_trunk(v: dict, embed_dim: int) -> nn.Module:
    """The timm model open_clip's ``TimmModel`` makes for ``v``, on the meta device."""
    import timm

    proj = v.get("timm_proj", VISION_DEFAULTS["timm_proj"])
    pool = v.get("timm_pool", VISION_DEFAULTS["timm_pool"])
    with torch.device("meta"):
        return timm.create_model(v["timm_model_name"], num_classes=0 if proj == "none" else embed_dim,
                                 global_pool=pool, pretrained=False)


def _module_act(act: nn.Module, where: str) -> str:
    name = type(act).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    if name == "GELUTanh":  # timm's tanh-approximated GELU (SigLIP 2)
        return "gelu_tanh"
    if name == "QuickGELU":
        return "quick_gelu"
    raise NotNative(f"{where}: activation {name}")


def _layer_norm_eps(module: nn.Module, where: str) -> float | None:
    """The eps of a LayerNorm with affine weights (None for an Identity)."""
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and module.bias is not None:
        return float(module.eps)
    raise NotNative(f"{where}: {type(module).__name__}")


def _timm_patch_embed(trunk: nn.Module, where: str) -> tuple[int, int, bool]:
    """(image size, patch size, patch bias) of a timm ViT's plain non-overlapping patch embedding."""
    from timm.layers import PatchEmbed

    pe = trunk.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.norm, nn.Identity) or getattr(pe, "dynamic_img_pad", False):
        raise NotNative(f"{where}: patch embedding {type(pe).__name__}")
    if getattr(trunk, "dynamic_img_size", False):
        raise NotNative(f"{where}: dynamic image size")
    conv = pe.proj
    if conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1]:
        raise NotNative(f"{where}: overlapping or non-square patches")
    return _square(pe.img_size, where), conv.kernel_size[0], conv.bias is not None


def _timm_head(trunk: nn.Module, width: int, act: str, embed_dim: int, where: str) -> dict[str, Any]:
    """VisionConfig fields of a timm ViT's head: final norm, pooling (class token, average, map), projection."""
    kw: dict[str, Any] = {}
    gp = trunk.global_pool
    if gp == "map":
        ap = trunk.attn_pool
        if ap.latent_len != 1 or ap.pos_embed is not None or not isinstance(ap.q_norm, nn.Identity) \
                or ap.pool != "token":
            raise NotNative(f"{where}: attention pool variant")
        kw.update(pool="map", attn_pool_heads=ap.num_heads,
                  attn_pool_mlp_ratio=_ratio(width, ap.mlp.fc1.out_features))
        if _module_act(ap.mlp.act, where) != act:
            raise NotNative(f"{where}: attention pool activation differs from the blocks'")
    elif gp == "token":
        kw.update(pool="cls")
    elif gp == "avg" and not isinstance(trunk.fc_norm, nn.Identity) and isinstance(trunk.norm, nn.Identity):
        kw.update(pool="mean", final_ln_after_pool=True)
    elif gp == "avg":
        kw.update(pool="mean")
    else:
        raise NotNative(f"{where}: global_pool {gp!r}")
    if isinstance(trunk.norm, nn.Identity) and not kw.get("final_ln_after_pool"):
        raise NotNative(f"{where}: no final norm")
    if not isinstance(trunk.norm, nn.Identity) and not isinstance(trunk.fc_norm, nn.Identity):
        raise NotNative(f"{where}: a final norm both before and after pooling")
    head = trunk.head
    if isinstance(head, nn.Identity):
        kw.update(proj="none")
    elif isinstance(head, nn.Linear) and head.out_features == embed_dim:
        kw.update(proj="linear", proj_bias=head.bias is not None)
    else:
        raise NotNative(f"{where}: head {type(head).__name__}")
    return kw


def _one_eps(modules: list[nn.Module], where: str) -> float:
    """The one LayerNorm eps of a tower's norms (mm's stack has one)."""
    eps = {e for e in (_layer_norm_eps(m, where) for m in modules) if e is not None}
    if len(eps) != 1:
        raise NotNative(f"{where}: LayerNorms with different eps {sorted(eps)}")
    return eps.pop()


def timm_vit_config(trunk: nn.Module, embed_dim: int) -> VisionConfig:
    """A timm ``VisionTransformer`` (SigLIP's, timm's CLIP ViTs) as an mm VisionConfig; NotNative for the parts
    mm's blocks do not express (register tokens, hybrid stems, qk-norm, dynamic sizes, other pools)."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock

    where = f"timm {type(trunk).__name__}"
    size, patch, patch_bias = _timm_patch_embed(trunk, where)
    if trunk.num_reg_tokens or trunk.pos_embed is None or (trunk.no_embed_class and trunk.cls_token is not None):
        raise NotNative(f"{where}: register tokens or unusual position embedding")
    blocks = list(trunk.blocks)
    width, depth = trunk.embed_dim, len(blocks)
    for i, b in enumerate(blocks):
        a = b.attn
        if type(b) is not TimmBlock or type(a) is not TimmAttention or not isinstance(a.q_norm, nn.Identity) \
                or not isinstance(a.norm, nn.Identity) or type(b.mlp) is not Mlp or not isinstance(b.mlp.norm, nn.Identity):
            raise NotNative(f"{where}: block {i} is not a plain pre-norm ViT block")
    b0 = blocks[0]
    norms = [m for b in blocks for m in (b.norm1, b.norm2)] + [trunk.norm_pre, trunk.norm, trunk.fc_norm]
    stack = TransformerConfig(width, depth, b0.attn.num_heads, mlp_ratio=_ratio(width, b0.mlp.fc1.out_features),
                              act=_module_act(b0.mlp.act, where), qkv_bias=b0.attn.qkv.bias is not None,
                              norm_eps=_one_eps(norms, where), layer_scale=1e-5 if hasattr(b0.ls1, "gamma") else None)
    kw = _timm_head(trunk, width, stack.act, embed_dim, where)
    return VisionConfig(image_size=size, patch_size=patch, transformer=stack, class_token=trunk.cls_token is not None,
                        norm_pre=not isinstance(trunk.norm_pre, nn.Identity), patch_bias=patch_bias,
                        patch_remainder=size % patch != 0, **kw)


def _timm_rope(trunk: nn.Module, grid: int, where: str) -> AxialRopeConfig | None:
    """The AxialRopeConfig of a timm Eva's ``RotaryEmbeddingCat`` (index grid, interleaved pairs)."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    rope = trunk.rope
    if rope is None:
        return None
    if type(rope) is not RotaryEmbeddingCat or rope.in_pixels or rope.grid_type != "index" or rope.rotate_half \
            or rope.aug_active or list(rope.feat_shape or ()) != [grid, grid]:
        raise NotNative(f"{where}: rotary embedding {type(rope).__name__} variant")
    ref = rope.ref_feat_shape
    if ref is not None and len(set(ref)) != 1:
        raise NotNative(f"{where}: non-square RoPE reference grid {tuple(ref)}")
    return AxialRopeConfig(temperature=float(rope.temperature), ref_grid=None if ref is None else int(ref[0]),
                           offset=float(rope.grid_offset), order=rope.grid_indexing)


def _eva_attention(a: nn.Module, i: int, where: str) -> str:
    """The tensor layout of a timm Eva block's attention: timm_pe (RoPE attention, packed qkv with q, k and v
    biases), timm_eva (EVA's, packed qkv with q and v biases) or timm_eva02 (EVA's, separate q / k / v)."""
    from timm.layers.attention import AttentionRope
    from timm.models.eva import EvaAttention

    if a.gate is not None or not isinstance(a.q_norm, nn.Identity) or a.proj.bias is None:
        raise NotNative(f"{where}: block {i} attention with gating or qk-norm")
    if type(a) is AttentionRope and a.qkv is not None and a.num_kv_groups == 1 and a.qkv.bias is not None:
        return "timm_pe"
    if type(a) is EvaAttention and a.qkv is not None and a.q_bias is not None:
        return "timm_eva"
    if type(a) is EvaAttention and a.qkv is None and a.q_proj.bias is not None and a.v_proj.bias is not None:
        return "timm_eva02"
    raise NotNative(f"{where}: block {i} attention {type(a).__name__} variant")


def _eva_ffn(mlp: nn.Module, i: int, where: str) -> tuple[str, float, bool]:
    """(ffn kind, hidden width, sub-LN) of a timm Eva block's MLP: timm's Mlp, or its SwiGLU (EVA02)."""
    from timm.layers import Mlp, SwiGLU

    if type(mlp) is Mlp:
        hidden, sub = mlp.fc1.out_features, mlp.norm
    elif type(mlp) is SwiGLU and type(mlp.act) is nn.SiLU:
        hidden, sub = mlp.fc1_g.out_features, mlp.norm
    else:
        raise NotNative(f"{where}: block {i} MLP {type(mlp).__name__} (packed GLU without sub-LN)")
    return ("mlp" if type(mlp) is Mlp else "swiglu"), hidden, not isinstance(sub, nn.Identity)


def timm_eva_config(trunk: nn.Module, embed_dim: int) -> tuple[VisionConfig, str]:
    """A timm ``Eva`` (the Perception Encoder, EVA01, EVA02) as an mm VisionConfig and its tensor layout (see
    :func:`_eva_attention`). Post-norm blocks (EVA02-E), register tokens, mixed RoPE are NotNative."""
    from timm.models.eva import EvaBlock

    where = f"timm {type(trunk).__name__}"
    size, patch, patch_bias = _timm_patch_embed(trunk, where)
    if trunk.reg_token is not None or trunk.pos_embed is None or (trunk.no_embed_class and trunk.cls_token is not None):
        raise NotNative(f"{where}: register tokens or unusual position embedding")
    if getattr(trunk, "rope_mixed", False):
        raise NotNative(f"{where}: mixed (learned) RoPE")
    blocks = list(trunk.blocks)
    width, depth = trunk.embed_dim, len(blocks)
    kinds, ffns = set(), set()
    for i, b in enumerate(blocks):
        if type(b) is not EvaBlock:
            raise NotNative(f"{where}: block {i} is {type(b).__name__} (post-norm blocks: EVA02-E)")
        a = b.attn
        kinds.add(_eva_attention(a, i, where))
        ffn, hidden, mlp_sub = _eva_ffn(b.mlp, i, where)
        attn_sub = not isinstance(a.norm, nn.Identity)
        if attn_sub != mlp_sub:
            raise NotNative(f"{where}: block {i} has a sub-LN in only one of attention and MLP")
        ffns.add((ffn, hidden, attn_sub))
        if a.num_prefix_tokens != trunk.num_prefix_tokens or (b.gamma_1 is None) != (b.gamma_2 is None):
            raise NotNative(f"{where}: block {i} prefix tokens or layer scale")
    if len(kinds) != 1 or len(ffns) != 1:
        raise NotNative(f"{where}: blocks of different kinds")
    layout, (ffn, hidden, sub) = kinds.pop(), ffns.pop()
    b0 = blocks[0]
    norms = [m for b in blocks for m in (b.norm1, b.norm2, b.attn.norm, b.mlp.norm)] + \
        [trunk.norm_pre, trunk.norm, trunk.fc_norm]
    act = "silu" if ffn == "swiglu" else _module_act(b0.mlp.act, where)
    stack = TransformerConfig(width, depth, b0.attn.num_heads, mlp_ratio=_ratio(width, hidden), ffn=ffn, act=act,
                              norm_eps=_one_eps(norms, where), k_bias=layout == "timm_pe", sub_norm=sub,
                              layer_scale=1e-5 if b0.gamma_1 is not None else None)
    kw = _timm_head(trunk, width, act, embed_dim, where)
    rope = _timm_rope(trunk, size // patch, where)
    return VisionConfig(image_size=size, patch_size=patch, transformer=stack, class_token=trunk.cls_token is not None,
                        norm_pre=not isinstance(trunk.norm_pre, nn.Identity), patch_bias=patch_bias,
                        patch_remainder=size % patch != 0, rope=rope, **kw), layout


def _timm_vision(v: dict, embed_dim: int, trunk: nn.Module | None) -> tuple[VisionConfig, str]:
    """The image tower of a timm-based open_clip model and its tensor layout (timm_vit, timm_pe, timm_eva)."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    proj = v.get("timm_proj", VISION_DEFAULTS["timm_proj"])
    pool = v.get("timm_pool", VISION_DEFAULTS["timm_pool"])
    if proj in ("linear", "mlp") or pool in ("abs_attn", "rot_attn"):
        raise NotNative(f"vision_cfg: timm tower {v['timm_model_name']} with an open_clip head "
                        f"(timm_proj {proj!r}, timm_pool {pool!r})")
    trunk = trunk if trunk is not None else _timm_trunk(v, embed_dim)
    if type(trunk) is VisionTransformer:
        return timm_vit_config(trunk, embed_dim), "timm_vit"
    if type(trunk) is Eva:
        return timm_eva_config(trunk, embed_dim)
    raise NotNative(f"vision_cfg: timm {type(trunk).__name__} ({v['timm_model_name']})")


# -- the whole model -------------------------------------------------------------------------------------
def is_open_clip_config(d: Any) -> bool:
    """Whether a dict is a model config in open_clip's format (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    return isinstance(d, dict) and "vision_cfg" in d and "text_cfg" in d and "embed_dim" in d


def from_open_clip_config(cfg: dict[str, Any], name: str | None = None, *, trunk: nn.Module | None = None
                          ) -> ModelConfig:
    """An open_clip model config dict (its registry's, or a user's JSON) as a validated mm ModelConfig.
    ``trunk``: the timm image tower of an open_clip model already built (read instead of building one on the
    meta device). Raises NotNative naming what mm does not build, ConfigError for a malformed config."""
    label = name or "the open_clip config"
    try:
        quick_gelu = bool(cfg.get("quick_gelu", False))
        embed_dim = int(cfg["embed_dim"])
        v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
        if v.get("timm_model_name"):
            vision, layout = _timm_vision(v, embed_dim, trunk)
        else:
            vision, layout = _vision(v, embed_dim, quick_gelu), "vit"
        text = _text(t, quick_gelu)
        decoder = _decoder(dict(cfg["multimodal_cfg"]), quick_gelu) if cfg.get("multimodal_cfg") else None
    except NotNative as e:
        raise NotNative(f"{label}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{label}: not an open_clip model config ({type(e).__name__}: {e})") from None
    coca = decoder is not None
    out = ModelConfig(
        embed_dim=embed_dim, vision=vision, text=text, decoder=decoder,
        init_logit_scale=float(cfg.get("init_logit_scale", math.log(1 / 0.07))),
        init_logit_bias=cfg.get("init_logit_bias"),
        open_clip=OpenClipSource(name=name, vision=layout, custom_text=bool(cfg.get("custom_text")) or coca))
    try:
        return validate(out)
    except ConfigError as e:
        raise NotNative(f"{label}: translated, but {e}") from None


@functools.lru_cache(maxsize=None)
def _registry_translation(name: str) -> ModelConfig:
    return from_open_clip_config(registry_config(name), name)


def open_clip_preset(name: str) -> ModelConfig:
    """The mm config of open_clip's registry model ``name`` (a fresh copy); NotNative / ConfigError."""
    import copy

    return copy.deepcopy(_registry_translation(name))


def interface_config(cfg: dict[str, Any]) -> tuple[int, VisionConfig, TextConfig]:
    """What mm needs to know of an open_clip model it runs through open_clip (its towers are open_clip's): the
    embedding width, the image input (size; preprocessing defaults) and the text input (context length,
    tokenizer, special ids). The towers' own configs stay null."""
    v = _with_defaults(dict(cfg["vision_cfg"]), VISION_DEFAULTS, "vision_cfg")
    t = _with_defaults(dict(cfg["text_cfg"]), TEXT_DEFAULTS, "text_cfg")
    size = _square(v.image_size, "vision_cfg")
    patch = v.patch_size if not v.timm_model_name and not isinstance(v.layers, (list, tuple)) else 1
    vision = VisionConfig(image_size=size, patch_size=min(patch, size), transformer=None)
    hf = t.hf_tokenizer_name
    eot = t.eos_id if hf else CLIP_EOT
    vocab = t.vocab_size if not t.hf_model_name else max(t.vocab_size, eot + 1, t.pad_id + 1)
    text = TextConfig(vocab_size=vocab, context_length=t.context_length, transformer=None, pad_id=t.pad_id,
                      sot_id=eot if hf else CLIP_SOT, eot_id=eot, tokenizer=f"hf:{hf}" if hf else "clip",
                      tokenizer_kwargs=dict(t.tokenizer_kwargs or {}))
    return int(cfg["embed_dim"]), vision, text


class OpenClipRegistry:
    """open_clip's registry and config format as a preset source of ``mm.models.presets``
    (:class:`~mm.models.presets.PresetSource`)."""

    def names(self) -> list[str]:
        return open_clip_model_names()

    def config(self, name: str) -> ModelConfig:
        return open_clip_preset(name)

    def translate(self, data: Any) -> ModelConfig | None:
        return from_open_clip_config(data) if is_open_clip_config(data) else None


SOURCE = OpenClipRegistry()
register_source("open_clip", SOURCE)
