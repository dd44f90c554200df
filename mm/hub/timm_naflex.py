"""timm's ``NaFlexVit`` (``timm.models.naflexvit``) as an mm image tower (:class:`~mm.models.VisionTower`), exactly.

NaFlexVit takes NaFlex batches (patches at each image's own aspect ratio, padded: ``patches`` (B, N, p*p*3),
``patch_coord`` (B, N, 2) (row, col), ``patch_valid`` (B, N)); mm's tower takes the same batch as
:class:`~mm.models.patches.Patches` (``pixels``, ``coords``, ``valid``). The converter reads a NaFlexVit's structure
(a built module, or one built from its ``NaFlexVitCfg`` on the meta device), so what timm builds decides, not a list
of names, and converts its state dict with the rule engine (:mod:`mm.hub.rules`; the blocks are timm's ViT ``Block``,
the table of :mod:`mm.hub.open_clip`'s timm towers). What maps:

* ``embeds.proj``: a Linear over patches flattened (row, col, channel) (``patchify_channels_last``, the default), or
  (channel, row, col), or a Conv2d -> mm's patch Conv2d (W, channel, row, col); a bias when there is no pre-norm.
* ``embeds.pos_embed`` (1, H, W, C) -> mm's table (prefix + H*W, C). timm adds no position to the class token; mm adds
  row 0 of its table to it, which the conversion sets to zeros. timm resizes the table to each image's grid with
  ``F.interpolate`` (``pos_embed_interp_mode``, antialiased, corners not aligned), the identity at the table's own
  grid: mm's ``vision.pos_interpolation``, the same call.
* blocks (pre-norm ``Block``: LayerNorm, fused qkv, qk-norm, LayerScale, Mlp) -> mm's blocks; ``norm_pre``.
* pooling: ``map`` (``AttentionPoolLatent``, one latent) -> ``pool: map`` after the final norm; ``avg`` -> ``mean``
  over each image's valid patches; ``token`` -> ``cls``. timm's final norm sits before pooling (``norm``) or after
  it (``fc_norm``; by default for ``avg``): mm's ``final_ln_after_pool``. The classifier ``head`` -> mm's projection
  (``proj: linear`` with bias, ``embed_dim`` = classes); no head -> ``proj: none`` (the pooled features, SigLIP's
  tower). mm's pooled embedding is timm's ``forward_head(..., pre_logits=True)`` (with a head: its logits).

Refused with :class:`~mm.hub.rules.ConversionError` naming the NaFlexVitCfg field: register tokens, factorized or no
position table, RoPE, EVA blocks (SwiGLU, gated or grouped-query attention), scaled norms, bias-free
projections, a non-square table or patch, grid-sample / aspect-preserving / non-antialiased / corner-aligned table
resizing, patch norms, ``avgmax`` / ``max`` pooling, map pooling with ``fc_norm``, and prefix handling mm's pools do
not share (map pooling leaving out a class token, ``pool_include_prefix: false``; mean pooling including it).
Training-only settings (dropouts, drop path, patch dropout, init) are not carried. timm attends with a symmetric mask
(padding queries see nothing), mm with a key mask: the valid tokens are the same.

An image tower alone, with no text tower, is not what ``--model`` loads (image-text models), so this is a library
function: ``from_timm_naflex(model)`` or ``convert_timm_naflex(cfg, state_dict)``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

import torch
from torch import nn

from ..config import validate
from ..layers import TransformerConfig
from ..models import VisionConfig, VisionTower
from ..models.config import INTERPOLATIONS
from ..models.presets import NotNative
from .hf import LINEAR_PATCHES
from .open_clip import _timm_block
from .open_clip_configs import _module_act, _one_eps, _ratio
from .rules import COPY, SQUEEZE, ConversionError, Rule, Transform, params, plan, rule

_WHAT = "timm NaFlexVit"


class NaFlexTower(NamedTuple):
    """A converted NaFlexVit: the tower's config, its embedding width (``VisionTower(vision, embed_dim)``) and its
    state dict (new tensors)."""

    vision: VisionConfig
    embed_dim: int
    state_dict: dict[str, torch.Tensor]


def _refuse(field: str, why: str) -> NoReturn:
    raise ConversionError(f"{_WHAT} has no exact mm counterpart: {field}: {why}")


def _native(field: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` (open_clip_configs' readers of timm modules), its NotNative refused as ``field``."""
    try:
        return fn(*args)
    except NotNative as e:
        _refuse(field, str(e))


# ------------------------------------------------------------------------------------------------ structure

def _check_embeds(model: nn.Module) -> None:
    e = model.embeds
    table = e.pos_embed
    for bad, field, why in (
        (e.num_reg_tokens > 0, "reg_tokens", "mm's image towers have no register tokens"),
        (model.rope is not None, "rope_type", "timm's RoPE (and its EVA blocks) is not mm's 2-D RoPE"),
        (e.pos_embed_type != "learned", "pos_embed", f"mm resizes one learned 2-D table, not {e.pos_embed_type!r}"),
        (e.pos_embed_interp_mode not in INTERPOLATIONS, "pos_embed_interp_mode",
         f"mm resizes tables {' or '.join(INTERPOLATIONS)}, not {e.pos_embed_interp_mode!r}"),
        (e.pos_embed_ar_preserving, "pos_embed_ar_preserving", "mm resizes the table to each image's grid, not to a "
                                                               "square cropped to it"),
        (not e.pos_embed_antialias, "pos_embed_antialias", "mm's table resize is antialiased (another kernel)"),
        (e.pos_embed_align_corners, "pos_embed_align_corners", "mm's table resize does not align corners"),
        (e.pos_embed_use_grid_sample, "pos_embed_use_grid_sample", "mm resizes the table with F.interpolate"),
        (e.norm_input is not None, "input_norm_layer", "mm does not normalise patch pixels"),
        (not isinstance(e.norm, nn.Identity), "embed_norm_layer", "mm has no norm after the patch embedding"),
        (e.in_chans != 3, "in_chans", f"mm's image towers take 3 channels, not {e.in_chans}"),
        (e.patch_size[0] != e.patch_size[1], "patch_size", f"mm's patches are square, not {tuple(e.patch_size)}"),
        (table is not None and table.shape[1] != table.shape[2], "pos_embed_grid_size",
         f"mm's position table is square, not {tuple(table.shape[1:3]) if table is not None else ()}"),
    ):
        if bad:
            _refuse(field, why)


def _check_block(i: int, b: nn.Module) -> None:
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block

    a = b.attn
    if type(b) is not Block or type(a) is not Attention:
        _refuse(f"blocks.{i}", f"{type(b).__name__} with {type(a).__name__}: mm's blocks are timm's pre-norm Block "
                               "with its Attention (block_fn, attn_type, attn_layer, swiglu_mlp, num_kv_heads)")
    for bad, field, why in (
        (getattr(a, "gate", None) is not None, "attn_gated", "mm's attention has no output gate"),
        (not isinstance(a.norm, nn.Identity), "scale_attn_inner_norm", "mm's attention has no inner norm here"),
        (a.proj.bias is None, "proj_bias", "mm's attention and MLP projections have biases"),
        (type(b.mlp) is not Mlp or not isinstance(b.mlp.norm, nn.Identity), "scale_mlp_norm",
         f"mm's FFN is timm's plain Mlp (mlp_layer {type(b.mlp).__name__})"),
    ):
        if bad:
            _refuse(field, why)


def _stack(model: nn.Module) -> TransformerConfig:
    """The blocks as one mm stack (every block alike)."""
    blocks = list(model.blocks)
    kinds = set()
    for i, b in enumerate(blocks):
        _check_block(i, b)
        kinds.add((b.attn.num_heads, b.mlp.fc1.out_features, b.attn.qkv.bias is not None, hasattr(b.ls1, "gamma"),
                   hasattr(b.ls2, "gamma"), _native("act_layer", _module_act, b.mlp.act, _WHAT),
                   not isinstance(b.attn.q_norm, nn.Identity)))
    if len(kinds) != 1:
        _refuse("blocks", "mm's stack has one kind of block; these differ (heads, MLP width, biases, LayerScale, "
                          "qk-norm)")
    heads, hidden, qkv_bias, ls1, ls2, act, qk_norm = kinds.pop()
    if ls1 != ls2:
        _refuse("attn_only_layer_scale", "mm's LayerScale scales both branches")
    norms = [m for b in blocks for m in (b.norm1, b.norm2, b.attn.q_norm, b.attn.k_norm)] + \
        [model.norm_pre, model.norm, model.fc_norm]
    if model.attn_pool is not None:
        norms.append(model.attn_pool.norm)
    width = model.embed_dim
    eps = _native("norm_layer", _one_eps, norms, _WHAT)
    # layer_scale is an init value: the weights replace it
    return TransformerConfig(width, len(blocks), heads, mlp_ratio=_ratio(width, hidden), act=act, qkv_bias=qkv_bias,
                             qk_norm=qk_norm, norm_eps=eps, layer_scale=1e-5 if ls1 else None)


def _map_pool(model: nn.Module, width: int, act: str) -> dict[str, Any]:
    ap = model.attn_pool
    for bad, field, why in (
        (ap.latent_len != 1 or ap.pos_embed is not None or ap.pool != "token", "global_pool",
         "mm's map pool is one latent query without positions"),
        (not isinstance(ap.q_norm, nn.Identity) or not isinstance(ap.k_norm, nn.Identity), "qk_norm",
         "mm's map pool has no qk-norm"),
        (ap.q.bias is None or ap.kv.bias is None, "qkv_bias", "mm's map pool projections have biases"),
        (not isinstance(model.fc_norm, nn.Identity), "fc_norm",
         "mm's map pool reads the final norm's output; timm normalises after pooling (fc_norm)"),
        (model.has_class_token and not model.pool_include_prefix, "pool_include_prefix",
         "mm's map pool attends to the class token too (pool_include_prefix: true)"),
        (_native("act_layer", _module_act, ap.mlp.act, _WHAT) != act, "act_layer",
         "mm's map pool MLP has the blocks' activation"),
    ):
        if bad:
            _refuse(field, why)
    return {"pool": "map", "attn_pool_heads": ap.num_heads,
            "attn_pool_mlp_ratio": _ratio(width, ap.mlp.fc1.out_features)}


def _head(model: nn.Module, width: int, act: str) -> tuple[dict[str, Any], int]:
    """VisionConfig fields of pooling, final norm and head, and the embedding width."""
    after = not isinstance(model.fc_norm, nn.Identity)
    if isinstance(model.norm, nn.Identity) and not after:
        _refuse("final_norm", "mm's image towers end with a LayerNorm")
    gp = model.global_pool
    if gp == "map":
        kw = _map_pool(model, width, act)
    elif gp == "token":
        kw = {"pool": "cls", "final_ln_after_pool": after}
    elif gp == "avg":
        if model.has_class_token and model.pool_include_prefix:
            _refuse("pool_include_prefix", "mm's mean pooling leaves the class token out")
        kw = {"pool": "mean", "final_ln_after_pool": after}
    else:
        _refuse("global_pool", f"mm pools with map, avg (mean) or token (cls), not {gp!r}")
    head = model.head
    if isinstance(head, nn.Identity):
        return {**kw, "proj": "none"}, width
    if isinstance(head, nn.Linear):
        return {**kw, "proj": "linear", "proj_bias": head.bias is not None}, head.out_features
    _refuse("head", f"mm's projection is a Linear, not {type(head).__name__}")


def _preprocessing(model: nn.Module) -> dict[str, Any]:
    """Mean, std and resampling of a timm model's pretrained config (none for a model built from a config)."""
    pc = getattr(model, "pretrained_cfg", None) or {}
    out: dict[str, Any] = {}
    for key, field in (("mean", "image_mean"), ("std", "image_std")):
        if isinstance(pc.get(key), (tuple, list)) and len(pc[key]) == 3:
            out[field] = tuple(float(x) for x in pc[key])
    if pc.get("interpolation") in INTERPOLATIONS:
        out["interpolation"] = pc["interpolation"]
    return out


def naflex_vision_config(model: nn.Module) -> tuple[VisionConfig, int]:
    """The mm VisionConfig of a built NaFlexVit (real or on the meta device) and its embedding width (the head's
    classes, or the width without a head). ConversionError names what mm does not express."""
    from timm.models.naflexvit import NaFlexVit

    if not isinstance(model, NaFlexVit):
        raise ConversionError(f"not a {_WHAT}: {type(model).__name__}")
    _check_embeds(model)
    stack = _stack(model)
    kw, embed_dim = _head(model, stack.width, stack.act)
    e = model.embeds
    patch = e.patch_size[0]
    return validate(VisionConfig(
        image_size=e.pos_embed.shape[1] * patch, patch_size=patch, transformer=stack,
        class_token=model.has_class_token, norm_pre=not isinstance(model.norm_pre, nn.Identity),
        patch_bias=e.proj.bias is not None, pos_interpolation=e.pos_embed_interp_mode, **kw, **_preprocessing(model))
    ), embed_dim


# ------------------------------------------------------------------------------------------------ tensors

def _table_to_mm(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [ts[0].reshape(-1, ts[0].shape[-1])]  # (1, H, W, C) -> (H*W, C)


def _table_from_mm(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    g = math.isqrt(ts[0].shape[0])
    return [ts[0].reshape(1, g, g, -1)]


def _cls_table_to_mm(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    cls, table = ts  # (1, 1, C), (1, H, W, C) -> (C,), (1 + H*W, C) whose row 0 (the class token's) is zero
    c = cls.shape[-1]
    return [cls.reshape(c), torch.cat([table.new_zeros(1, c), table.reshape(-1, c)])]


def _cls_table_from_mm(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    cls, pos = ts  # timm has no class-token position: mm's row 0 joins the token (mm adds the two alike)
    g = math.isqrt(pos.shape[0] - 1)
    return [(cls + pos[0]).reshape(1, 1, -1), pos[1:].reshape(1, g, g, -1)]


TABLE = Transform(_table_to_mm, _table_from_mm)
CLASS_AND_TABLE = Transform(_cls_table_to_mm, _cls_table_from_mm)


def _channels_first_to_conv(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    w = ts[0]  # (W, 3 * p * p), patches flattened (channel, row, column): the Conv2d weight's own order
    p = math.isqrt(w.shape[1] // 3)
    return [w.reshape(w.shape[0], 3, p, p)]


CHANNELS_FIRST_PATCHES = Transform(_channels_first_to_conv, lambda ts: [ts[0].reshape(ts[0].shape[0], -1)])


def _patch_transform(model: nn.Module) -> Transform:
    e = model.embeds
    if not e.is_linear:
        return COPY
    return LINEAR_PATCHES if e.channels_last else CHANNELS_FIRST_PATCHES


def naflex_rules(patch: Transform = LINEAR_PATCHES) -> list[Rule]:
    """The rule table: NaFlexVit keys <-> mm VisionTower keys (``patch``: the patch embedding's transform)."""
    pool = "attn_pool"
    return [
        rule("embeds.proj.weight", "patch_embed.weight", patch),
        rule("embeds.proj.bias", "patch_embed.bias"),
        rule(("embeds.cls_token", "embeds.pos_embed"), ("cls_token", "pos_embed"), CLASS_AND_TABLE,
             when=lambda v: v.class_token),
        rule("embeds.pos_embed", "pos_embed", TABLE, when=lambda v: not v.class_token),
        *params("norm_pre", "norm_pre"),
        *_timm_block("blocks.{i}", "transformer.blocks.{i}"),
        *[r for n in ("q_norm", "k_norm")  # qk-norm: a LayerNorm over each head's channels in both
          for r in params(f"blocks.{{i}}.attn.{n}", f"transformer.blocks.{{i}}.attn.{n}", layers="vision")],
        *params("norm", "norm", when=lambda v: not v.final_ln_after_pool),
        *params("fc_norm", "norm", when=lambda v: v.final_ln_after_pool),
        rule(f"{pool}.latent", f"{pool}.latent", SQUEEZE),
        *[r for n in ("q", "kv", "proj") for r in params(f"{pool}.{n}", f"{pool}.attn.{n}")],
        *params(f"{pool}.norm", f"{pool}.norm"),
        *params(f"{pool}.mlp.fc1", f"{pool}.mlp.fc1"),
        *params(f"{pool}.mlp.fc2", f"{pool}.mlp.fc2"),
        *params("head", "proj"),
    ]


def convert_naflex_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> NaFlexTower:
    """A NaFlexVit state dict -> the mm tower's config, width and state dict; ``model`` is the NaFlexVit whose
    structure ``sd`` has (its weights are not read: a meta-device build will do)."""
    vision, embed_dim = naflex_vision_config(model)
    with torch.device("meta"):
        ref = VisionTower(vision, embed_dim).state_dict()
    steps = plan(naflex_rules(_patch_transform(model)), vision, ref, {"vision": vision.transformer.depth},
                 unmatched=f"mm tensor {{key!r}} has no counterpart in the {_WHAT}")
    out = steps.to_mm(sd, f"{_WHAT} state dict does not fit its structure")
    return NaFlexTower(vision, embed_dim, {k: x.detach().clone() for k, x in out.items()})


def convert_timm_naflex(cfg: Any, state_dict: dict[str, torch.Tensor], *, img_size: Any = None) -> NaFlexTower:
    """A NaFlexVit given by its ``NaFlexVitCfg`` and state dict -> the mm tower's config, width and state dict. The
    NaFlexVit is built on the meta device (classes: ``head.weight``'s rows, none without it; ``img_size`` only where
    ``cfg.pos_embed_grid_size`` is None) and its structure read."""
    from timm.models.naflexvit import NaFlexVit

    head = state_dict.get("head.weight")
    with torch.device("meta"):
        model = NaFlexVit(cfg=cfg, num_classes=0 if head is None else head.shape[0], img_size=img_size)
    return convert_naflex_state_dict(state_dict, model)


def from_timm_naflex(model: nn.Module) -> VisionTower:
    """An mm VisionTower with the exact weights of a timm NaFlexVit module (new tensors, the source's dtype and
    device), in eval mode: ``tower(patches).emb`` is ``model.forward_head(..., pre_logits=True)`` (or the logits with
    a classifier head)."""
    vision, embed_dim, sd = convert_naflex_state_dict(model.state_dict(), model)
    with torch.device("meta"):
        tower = VisionTower(vision, embed_dim)
    tower.load_state_dict(sd, strict=True, assign=True)
    return tower.eval()
