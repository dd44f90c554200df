"""Exact weight conversion between open_clip and mm models (CLIP ViTs and CoCa).

One table per layout, :func:`rules`, says where every open_clip tensor goes: each rule names open_clip key
patterns, mm key patterns and a :class:`~mm.hub.rules.Transform` with both directions, and rules inside a
Transformer stack are expanded over its layers (the engine shared with Hugging Face conversion,
:mod:`mm.hub.rules`). Both directions read the same table, so ``to_open_clip(from_open_clip(sd, name))`` gives
back every tensor of ``sd`` bit for bit.

Layout differences the transforms bridge:

* open_clip's attention is ``nn.MultiheadAttention``: ``in_proj_weight`` packs [q; k; v] (or, when
  keys come from a different width, ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``) and
  ``in_proj_bias`` packs the biases. mm self-attention packs the same [q; k; v] in ``qkv``;
  cross-attention has ``q`` and a packed [k; v] ``kv``.
* open_clip keeps ``visual.proj``, ``text_projection`` and the decoder's ``text_projection`` as
  (in, out) matrices applied as ``x @ P``; mm uses ``nn.Linear`` (weight = P.T).
* open_clip's plain CLIP keeps the text tower at the top level (``token_embedding``,
  ``transformer.resblocks``...); CoCa and CustomTextCLIP put it under ``text.``.

Settings that change what a model computes without changing its state dict (activation, heads,
CoCa's class-token mask) come from the mm config, i.e. the ``name``: open_clip's ``*-quickgelu``
models need the matching mm ``*-quickgelu`` preset. open_clip's CoCa uses its legacy class-token mask
unless ``model.text.correct_cls_mask`` is set (open_clip 3.3 has no config key for it); the mm preset
``coca_ViT-B-32`` uses that legacy mask (``text.cls_mask: open_clip``), ``tiny-coca`` the correct
one. When an open_clip module (not a bare state dict) is given, both settings are checked against
the config. :func:`open_clip_config` gives the open_clip constructor arguments for an mm config.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from ..config import validate
from ..layers import TransformerConfig
from ..models import CLIP, ModelConfig, OpenClipSource, model_class, resolve_config
from ..models.presets import list_models as mm_presets
from .open_clip_configs import (
    from_open_clip_config,
    open_clip_model_names,
    open_clip_preset,
    registry_config,
)
from .rules import (
    COPY,
    FLATTEN,
    PACKED_TO_Q_KV,
    SEPARATE_TO_Q_KV,
    SQUEEZE,
    TRANSPOSE,
    ConversionError,
    Plan,
    Rule,
    Transform,
    packed,
    plan,
)
from .rules import params as _params
from .rules import rule as _rule

# The tables below are read by the shared engine (mm.hub.rules): a rule's ``foreign`` keys are open_clip's.
# Patterns are ``str.format`` templates: ``{i}`` is the layer index when ``layers`` names a stack (``vision``,
# ``text`` or ``decoder``); ``{self_block}`` / ``{cross_block}`` are the indices (2i, 2i + 1) of layer i's two blocks
# in mm's "separate" decoder; ``{text}`` is the prefix of open_clip's text tower (``""`` for CLIP, ``"text."`` for
# CoCa / CustomTextCLIP).


def _ffn(oc: str, mm: str, layers: str) -> list[Rule]:
    """The second half of every block: ln_2, mlp, ls_2."""
    return [
        *_params(f"{oc}.ln_2", f"{mm}.norm2", layers=layers),
        *_params(f"{oc}.mlp.c_fc", f"{mm}.ffn.fc1", layers=layers),
        *_params(f"{oc}.mlp.c_proj", f"{mm}.ffn.fc2", layers=layers),
        _rule(f"{oc}.ls_2.gamma", f"{mm}.ls2.gamma", layers=layers),
    ]


def _self_block(oc: str, mm: str, layers: str) -> list[Rule]:
    """open_clip ResidualAttentionBlock <-> mm Block with self-attention."""
    return [
        *_params(f"{oc}.ln_1", f"{mm}.norm1", layers=layers),
        _rule(f"{oc}.attn.in_proj_weight", f"{mm}.attn.qkv.weight", layers=layers),
        _rule(f"{oc}.attn.in_proj_bias", f"{mm}.attn.qkv.bias", layers=layers),
        *_params(f"{oc}.attn.out_proj", f"{mm}.attn.proj", layers=layers),
        _rule(f"{oc}.ls_1.gamma", f"{mm}.ls1.gamma", layers=layers),
        *_ffn(oc, mm, layers),
    ]


def _cross_block(oc: str, mm: str, layers: str) -> list[Rule]:
    """open_clip cross-attention ResidualAttentionBlock (ln_1 on the queries, ln_1_kv on the context;
    kdim == embed_dim, so in_proj is packed) <-> mm cross-attention-only Block."""
    return [
        *_params(f"{oc}.ln_1", f"{mm}.norm_cross", layers=layers),
        *_params(f"{oc}.ln_1_kv", f"{mm}.norm_context", layers=layers),
        _rule(f"{oc}.attn.in_proj_weight", (f"{mm}.cross_attn.q.weight", f"{mm}.cross_attn.kv.weight"),
              PACKED_TO_Q_KV, layers=layers),
        _rule(f"{oc}.attn.in_proj_bias", (f"{mm}.cross_attn.q.bias", f"{mm}.cross_attn.kv.bias"),
              PACKED_TO_Q_KV, layers=layers),
        *_params(f"{oc}.attn.out_proj", f"{mm}.cross_attn.proj", layers=layers),
        _rule(f"{oc}.ls_1.gamma", f"{mm}.ls_cross.gamma", layers=layers),
        *_ffn(oc, mm, layers),
    ]


def _pool_packed(cfg: ModelConfig) -> bool:
    """Whether open_clip's attentional pooler packs in_proj_weight: its keys come from the ViT's width,
    its queries have embed_dim, and MultiheadAttention packs only when the two are equal."""
    return cfg.embed_dim == cfg.vision.transformer.width


_POOL_OC, _POOL_MM = "visual.attn_pool", "vision.attn_pool"

COMMON_RULES: list[Rule] = [_rule("logit_scale", "logit_scale"), _rule("logit_bias", "logit_bias")]

# open_clip's own VisionTransformer (open_clip.vision == "vit")
VIT_RULES: list[Rule] = [
    _rule("visual.conv1.weight", "vision.patch_embed.weight"),
    _rule("visual.class_embedding", "vision.cls_token"),
    _rule("visual.positional_embedding", "vision.pos_embed"),
    *_params("visual.ln_pre", "vision.norm_pre"),
    *_self_block("visual.transformer.resblocks.{i}", "vision.transformer.blocks.{i}", "vision"),
    _rule(f"{_POOL_OC}.query", f"{_POOL_MM}.query"),
    *_params(f"{_POOL_OC}.ln_q", f"{_POOL_MM}.norm_q"),
    *_params(f"{_POOL_OC}.ln_k", f"{_POOL_MM}.norm_k"),
    _rule(f"{_POOL_OC}.attn.in_proj_weight", (f"{_POOL_MM}.attn.q.weight", f"{_POOL_MM}.attn.kv.weight"),
          PACKED_TO_Q_KV, when=_pool_packed),
    _rule(tuple(f"{_POOL_OC}.attn.{p}_proj_weight" for p in "qkv"),
          (f"{_POOL_MM}.attn.q.weight", f"{_POOL_MM}.attn.kv.weight"),
          SEPARATE_TO_Q_KV, when=lambda cfg: not _pool_packed(cfg)),
    _rule(f"{_POOL_OC}.attn.in_proj_bias", (f"{_POOL_MM}.attn.q.bias", f"{_POOL_MM}.attn.kv.bias"), PACKED_TO_Q_KV),
    *_params(f"{_POOL_OC}.attn.out_proj", f"{_POOL_MM}.attn.proj"),
    *_params("visual.ln_post", "vision.norm"),
    _rule("visual.proj", "vision.proj.weight", TRANSPOSE),
]

_TRUNK = "visual.trunk"


def _timm_block(oc: str, mm: str) -> list[Rule]:
    """timm's ViT Block (norm1, fused qkv attention, ls1, norm2, mlp fc1 / fc2, ls2) <-> mm Block."""
    return [
        *_params(f"{oc}.norm1", f"{mm}.norm1", layers="vision"),
        *_params(f"{oc}.attn.qkv", f"{mm}.attn.qkv", layers="vision"),
        *_params(f"{oc}.attn.proj", f"{mm}.attn.proj", layers="vision"),
        _rule(f"{oc}.ls1.gamma", f"{mm}.ls1.gamma", layers="vision"),
        *_params(f"{oc}.norm2", f"{mm}.norm2", layers="vision"),
        *_params(f"{oc}.mlp.fc1", f"{mm}.ffn.fc1", layers="vision"),
        *_params(f"{oc}.mlp.fc2", f"{mm}.ffn.fc2", layers="vision"),
        _rule(f"{oc}.ls2.gamma", f"{mm}.ls2.gamma", layers="vision"),
    ]



TEXT_RULES: list[Rule] = [
    _rule("{text}token_embedding.weight", "text.token_embedding.weight"),
    _rule("{text}cls_emb", "text.cls_token"),
    _rule("{text}positional_embedding", "text.pos_embed"),
    *_self_block("{text}transformer.resblocks.{i}", "text.transformer.blocks.{i}", "text"),
    *_params("{text}ln_final", "text.norm"),
    # open_clip makes the projection an nn.Linear (already mm's layout) only when it has a bias
    _rule("{text}text_projection", "text.proj.weight", TRANSPOSE, when=lambda cfg: not cfg.text.proj_bias),
    *_params("{text}text_projection", "text.proj", when=lambda cfg: cfg.text.proj_bias),
]

# CoCa decoder: layer i is open_clip's resblocks[i] then cross_attn[i], mm's blocks 2i and 2i + 1
DECODER_RULES: list[Rule] = [
    *_self_block("text_decoder.resblocks.{i}", "decoder.transformer.blocks.{self_block}", "decoder"),
    *_cross_block("text_decoder.cross_attn.{i}", "decoder.transformer.blocks.{cross_block}", "decoder"),
    *_params("text_decoder.ln_final", "decoder.norm"),
    _rule("text_decoder.text_projection", "decoder.head.weight", TRANSPOSE),
]

def _rope_pairs(head_dim: int) -> torch.Tensor:
    """mm channel m of a head holds timm channel perm[m]: timm's interleaved RoPE pairs (2i, 2i+1) become mm's
    rotate_half pairs (i, i + head_dim/2) (``mm.layers.position.axial_rope_angles``)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(t: torch.Tensor, parts: int, rotated: int, heads: int, order: torch.Tensor) -> torch.Tensor:
    """``t`` ([q; k; v] packed, or one of them): ``parts`` blocks of ``heads`` heads, the first ``rotated`` blocks
    with each head's channels reordered by ``order``."""
    x = t.reshape(parts, heads, order.numel(), *t.shape[1:])
    return torch.cat([x[:rotated].index_select(2, order), x[rotated:]]).reshape(t.shape)


def _rope_qkv(cfg: ModelConfig, parts: int = 3, rotated: int = 2) -> Transform:
    """Query / key tensors (packed [q; k; v] by default) with every head's channels permuted for RoPE (a permutation
    of both queries and keys leaves each attention score unchanged); values copied. COPY without RoPE."""
    if cfg.vision.rope is None:
        return COPY
    stack = cfg.vision.transformer
    perm = _rope_pairs(stack.head_dim)
    inv = torch.argsort(perm)
    return Transform(lambda ts: [_permute_heads(ts[0], parts, rotated, stack.heads, perm)],
                     lambda ts: [_permute_heads(ts[0], parts, rotated, stack.heads, inv)])


def _rope_q(cfg: ModelConfig) -> Transform:
    return _rope_qkv(cfg, parts=1, rotated=1)


def _separate_qkv(cfg: ModelConfig) -> Transform:
    """EVA02's separate q / k / v projection weights <-> mm's packed qkv (RoPE channel order as _rope_qkv)."""
    rope = _rope_qkv(cfg)
    return Transform(lambda ts: rope.to_mm([torch.cat(ts)]),
                     lambda ts: [t.clone() for t in rope.from_mm(ts)[0].chunk(3)])


# timm's SwiGLU keeps the gate (fc1_g) and up (fc1_x) projections apart; mm packs [gate; up] in fc1
GATE_UP = packed(2)


def _swiglu(cfg: ModelConfig) -> bool:
    return cfg.vision.transformer.ffn == "swiglu"


def _eva_block(oc: str, mm: str, layout: str) -> list[Rule]:
    """timm's EvaBlock (norm1, attention, gamma_1, norm2, mlp, gamma_2) <-> mm Block. EVA's attention has query and
    value biases and no key bias (mm's k_bias: false)."""
    a, f = f"{oc}.attn", f"{oc}.mlp"
    if layout == "timm_pe":
        qkv = [_rule(f"{a}.qkv.{p}", f"{mm}.attn.qkv.{p}", _rope_qkv, layers="vision") for p in ("weight", "bias")]
    elif layout == "timm_eva":
        qkv = [_rule(f"{a}.qkv.weight", f"{mm}.attn.qkv.weight", _rope_qkv, layers="vision"),
               _rule(f"{a}.q_bias", f"{mm}.attn.q_bias", _rope_q, layers="vision"),
               _rule(f"{a}.v_bias", f"{mm}.attn.v_bias", layers="vision")]
    else:  # timm_eva02: separate projections
        qkv = [_rule(tuple(f"{a}.{x}_proj.weight" for x in "qkv"), f"{mm}.attn.qkv.weight", _separate_qkv,
                     layers="vision"),
               _rule(f"{a}.q_proj.bias", f"{mm}.attn.q_bias", _rope_q, layers="vision"),
               _rule(f"{a}.v_proj.bias", f"{mm}.attn.v_bias", layers="vision")]
    return [
        *_params(f"{oc}.norm1", f"{mm}.norm1", layers="vision"),
        *qkv,
        *_params(f"{a}.norm", f"{mm}.attn.norm_out", layers="vision"),
        *_params(f"{a}.proj", f"{mm}.attn.proj", layers="vision"),
        _rule(f"{oc}.gamma_1", f"{mm}.ls1.gamma", layers="vision"),
        *_params(f"{oc}.norm2", f"{mm}.norm2", layers="vision"),
        *_params(f"{f}.fc1", f"{mm}.ffn.fc1", layers="vision", when=lambda cfg: not _swiglu(cfg)),
        *[_rule((f"{f}.fc1_g.{p}", f"{f}.fc1_x.{p}"), f"{mm}.ffn.fc1.{p}", GATE_UP, layers="vision", when=_swiglu)
          for p in ("weight", "bias")],
        *_params(f"{f}.norm", f"{mm}.ffn.norm", layers="vision"),
        *_params(f"{f}.fc2", f"{mm}.ffn.fc2", layers="vision"),
        _rule(f"{oc}.gamma_2", f"{mm}.ls2.gamma", layers="vision"),
    ]


def _timm_trunk_rules(blocks: list[Rule]) -> list[Rule]:
    """A timm ViT-like trunk under open_clip's TimmModel: embedding, ``blocks``, final norm, pooling, head."""
    return [
        *_params(f"{_TRUNK}.patch_embed.proj", "vision.patch_embed"),
        _rule(f"{_TRUNK}.cls_token", "vision.cls_token", FLATTEN),
        _rule(f"{_TRUNK}.pos_embed", "vision.pos_embed", SQUEEZE),
        *_params(f"{_TRUNK}.norm_pre", "vision.norm_pre"),
        *blocks,
        *_params(f"{_TRUNK}.norm", "vision.norm", when=lambda cfg: not cfg.vision.final_ln_after_pool),
        *_params(f"{_TRUNK}.fc_norm", "vision.norm", when=lambda cfg: cfg.vision.final_ln_after_pool),
        _rule(f"{_TRUNK}.attn_pool.latent", "vision.attn_pool.latent", SQUEEZE),
        *_params(f"{_TRUNK}.attn_pool.q", "vision.attn_pool.attn.q"),
        *_params(f"{_TRUNK}.attn_pool.kv", "vision.attn_pool.attn.kv"),
        *_params(f"{_TRUNK}.attn_pool.proj", "vision.attn_pool.attn.proj"),
        *_params(f"{_TRUNK}.attn_pool.norm", "vision.attn_pool.norm"),
        *_params(f"{_TRUNK}.attn_pool.mlp.fc1", "vision.attn_pool.mlp.fc1"),
        *_params(f"{_TRUNK}.attn_pool.mlp.fc2", "vision.attn_pool.mlp.fc2"),
        *_params(f"{_TRUNK}.head", "vision.proj"),
    ]


# a timm VisionTransformer under open_clip's TimmModel (open_clip.vision == "timm_vit": SigLIP, timm CLIP ViTs)
TIMM_VIT_RULES: list[Rule] = _timm_trunk_rules(_timm_block(f"{_TRUNK}.blocks.{{i}}", "vision.transformer.blocks.{i}"))
# a timm Eva: with RoPE attention (timm_pe: the Perception Encoder), with EVA's attention (timm_eva: EVA01; timm_eva02:
# separate q / k / v projections, SwiGLU, sub-LN, RoPE)
TIMM_PE_RULES: list[Rule] = _timm_trunk_rules(_eva_block(f"{_TRUNK}.blocks.{{i}}", "vision.transformer.blocks.{i}",
                                                         "timm_pe"))
TIMM_EVA_RULES: list[Rule] = _timm_trunk_rules(_eva_block(f"{_TRUNK}.blocks.{{i}}", "vision.transformer.blocks.{i}",
                                                          "timm_eva"))
TIMM_EVA02_RULES: list[Rule] = _timm_trunk_rules(_eva_block(f"{_TRUNK}.blocks.{{i}}", "vision.transformer.blocks.{i}",
                                                            "timm_eva02"))

VISION_RULES = {"vit": VIT_RULES, "timm_vit": TIMM_VIT_RULES, "timm_pe": TIMM_PE_RULES, "timm_eva": TIMM_EVA_RULES,
                "timm_eva02": TIMM_EVA02_RULES}


def rules(cfg: ModelConfig) -> list[Rule]:
    """The rules of ``cfg``'s layout in open_clip: its image tower's (open_clip's ViT or a timm tower), the text
    tower's, the decoder's."""
    return [*COMMON_RULES, *VISION_RULES[_source(cfg).vision], *TEXT_RULES, *DECODER_RULES]


def _source(cfg: ModelConfig) -> OpenClipSource:
    """Where open_clip keeps the model's tensors; a config made in mm: open_clip's own ViT layout."""
    return cfg.open_clip or OpenClipSource(custom_text=cfg.decoder is not None)


def _stacks(cfg: ModelConfig) -> dict[str, TransformerConfig]:
    """The config's Transformer stacks by tower name (the names ``Rule.layers`` uses)."""
    stacks = {"vision": cfg.vision.transformer, "text": cfg.text.transformer}
    if cfg.decoder is not None:
        stacks["decoder"] = cfg.decoder.transformer
    return stacks


_OPEN_CLIP_TEXT_POOLS = ("eot", "argmax", "eos", "end", "first")


def _stack_problems(cfg: ModelConfig, layout: str) -> list[tuple[str, str]]:
    problems = []
    for tower, t in _stacks(cfg).items():
        key = f"{tower}.transformer"
        eva02 = tower == "vision" and layout == "timm_eva02"
        if t.ffn != "mlp" and not eva02:
            problems.append((f"{key}.ffn", f"open_clip has no {t.ffn!r} FFN"))
        if t.sub_norm and not (tower == "vision" and layout in ("timm_pe", "timm_eva", "timm_eva02")):
            problems.append((f"{key}.sub_norm", "only timm's Eva blocks have sub-LN"))
        if t.moe is not None:
            problems.append((f"{key}.moe", "open_clip has no MoE"))
        if t.sparse_attention is not None:
            problems.append((f"{key}.sparse_attention", "open_clip has no block-sparse attention"))
        if t.qk_norm:
            problems.append((f"{key}.qk_norm", "open_clip's qk-norm blocks have another layout"))
        if not t.qkv_bias and not (tower == "vision" and layout == "timm_vit"):
            problems.append((f"{key}.qkv_bias", "open_clip's attention always has biases"))
        if not t.k_bias and not (tower == "vision" and layout in ("timm_eva", "timm_eva02")):
            problems.append((f"{key}.k_bias", "only EVA's attention (open_clip.vision timm_eva) has no key bias"))
    # open_clip's quick_gelu flag is one for its own towers (timm towers keep their own activation); a tower
    # may take GELU's tanh form through act_kwargs, the CoCa decoder not
    own = {"text": cfg.text.transformer.act}
    if layout == "vit":
        own["vision"] = cfg.vision.transformer.act
    if cfg.decoder is not None:
        own["decoder"] = cfg.decoder.transformer.act
    quick = {t for t, a in own.items() if a == "quick_gelu"}
    if quick and quick != set(own):
        problems.append((f"{sorted(set(own) - quick)[0]}.transformer.act",
                         "open_clip's QuickGELU (quick_gelu) applies to all of its towers at once"))
    for tower, act in own.items():
        if act not in ("gelu", "gelu_tanh", "quick_gelu") or (tower == "decoder" and act == "gelu_tanh"):
            problems.append((f"{tower}.transformer.act", f"open_clip has no {act!r} here"))
    if cfg.decoder is not None and cfg.decoder.transformer.norm_eps != 1e-5:
        problems.append(("decoder.transformer.norm_eps", "open_clip's decoder LayerNorm eps is 1e-5"))
    return problems


def _vision_problems(cfg: ModelConfig, layout: str) -> list[tuple[str, str]]:
    v, problems = cfg.vision, []
    if v.stem != "patch":
        problems.append(("vision.stem", f"open_clip's image towers patchify; mm's {v.stem!r} stem has no counterpart"))
    if v.pos_embed != "learned":
        problems.append(("vision.pos_embed", f"must be learned, got {v.pos_embed!r}"))
    if layout == "vit":
        if not v.class_token:
            problems.append(("vision.class_token", "open_clip's ViT always has a class token"))
        if v.pool == "map":
            problems.append(("vision.pool", "open_clip's ViT has no map pooling (timm's ViT has: open_clip.vision "
                                            "timm_vit)"))
        if v.patch_bias or v.proj != "linear" or v.proj_bias:
            problems.append(("vision.proj", "open_clip's ViT has a bias-free patch embedding and projection"))
    else:  # timm towers
        if v.pool == "attn":
            problems.append(("vision.pool", "timm's ViT has no CoCa attentional pooling"))
        if v.proj == "linear" and not v.proj_bias:
            problems.append(("vision.proj_bias", "timm's ViT head has a bias"))
    eva = layout in ("timm_pe", "timm_eva", "timm_eva02")
    if v.rope is not None and not eva:
        problems.append(("vision.rope", "only timm's Eva towers (open_clip.vision timm_pe / timm_eva / timm_eva02) "
                                        "have axial RoPE"))
    if layout == "timm_pe" and v.rope is None:
        problems.append(("vision.rope", "the Perception Encoder's tower needs vision.rope"))
    if eva:
        stack = v.transformer
        if not stack.qkv_bias or stack.k_bias != (layout == "timm_pe"):
            problems.append(("vision.transformer.k_bias", "timm's Eva attention has q, k and v biases (timm_pe) or "
                                                         "q and v biases only (timm_eva, timm_eva02)"))
    return problems


def _text_problems(cfg: ModelConfig) -> list[tuple[str, str]]:
    t, problems = cfg.text, []
    if t.pos_embed != "learned":
        problems.append(("text.pos_embed", f"must be learned, got {t.pos_embed!r}"))
    if not t.embed_cls:  # a class token overrides pooling in both
        if t.pool not in _OPEN_CLIP_TEXT_POOLS:
            problems.append(("text.pool", f"open_clip pools text at {', '.join(_OPEN_CLIP_TEXT_POOLS)}, got "
                                          f"{t.pool!r}"))
        elif t.pool == "eot" and (t.tokenizer != "clip" or t.eot_id != t.vocab_size - 1):
            problems.append(("text.pool", "eot is open_clip's argmax only when the end token is the largest id "
                                          "(CLIP's BPE)"))
    if not t.causal and t.pad_mask:
        problems.append(("text.pad_mask", "open_clip's bidirectional text towers attend to padding (pad_mask: "
                                          "false)"))
    return problems


def _check_supported(cfg: ModelConfig) -> None:
    """Reject mm configs that open_clip (its own towers, or the timm tower the layout names) cannot express,
    naming the dotted key."""
    if cfg.one_tower is not None:  # checked first: the towers have no stacks of their own
        raise ConversionError("not convertible to open_clip: one_tower: open_clip has no one-tower models")
    layout = _source(cfg).vision
    if layout not in VISION_RULES:
        raise ConversionError(f"not convertible to open_clip: open_clip.vision {layout!r} is not supported yet")
    problems = _stack_problems(cfg, layout) + _vision_problems(cfg, layout) + _text_problems(cfg)
    if cfg.decoder is not None:
        if cfg.decoder.transformer.mlp_ratio != 4:  # open_clip does not pass its decoder an mlp_ratio
            problems.append(("decoder.transformer.mlp_ratio", "open_clip's decoder MLP ratio is 4"))
        if cfg.decoder.layout != "separate":
            problems.append(("decoder.layout", "open_clip's decoder has the 'separate' layout"))
        context_dim = cfg.embed_dim if cfg.vision.pool == "attn" else cfg.vision.transformer.width
        if context_dim != cfg.decoder.transformer.width:
            problems.append(("decoder.transformer.width", (
                f"open_clip's cross-attention needs the image tokens' width ({context_dim}), "
                f"got {cfg.decoder.transformer.width}")))
    if problems:
        raise ConversionError(f"not convertible to open_clip: {problems[0][0]}: {problems[0][1]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def _reference(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The mm model's state dict on the meta device: names and shapes, no memory, no init cost."""
    with torch.device("meta"):
        return model_class(cfg)(cfg).state_dict()


def _plan(cfg: ModelConfig, text_prefix: str, mm_ref: dict[str, torch.Tensor]) -> Plan:
    """:func:`rules` expanded for ``cfg`` (rules whose mm keys ``mm_ref`` has), covering every mm key."""
    def fields(i: int) -> dict:
        return {"i": i, "self_block": 2 * i, "cross_block": 2 * i + 1, "text": text_prefix}

    # an mm tensor no rule takes: an mm feature that _check_supported does not know and the table does not describe
    return plan(rules(cfg), cfg, mm_ref, {k: s.depth for k, s in _stacks(cfg).items()}, fields=fields,
                unmatched="no open_clip counterpart for mm key {key!r}")


def _label(cfg: ModelConfig | str | dict) -> str:
    return repr(cfg) if isinstance(cfg, str) else "the given config"


def convert_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig | str) -> dict[str, torch.Tensor]:
    """open_clip state dict -> mm state dict for the model ``cfg`` (an mm ModelConfig or preset name).

    The text tower's prefix is taken from ``sd``: ``text.`` (CoCa, CustomTextCLIP) or none (CLIP).
    Raises :class:`ConversionError` naming the first tensor whose shape differs from what ``cfg``
    expects, and any missing or unexpected keys. Tensors copied unchanged are ``sd``'s own (as with
    ``state_dict()``); no two results share storage."""
    label, cfg = _label(cfg), resolve_config(cfg)
    _check_supported(cfg)
    text_prefix = "text." if any(k.startswith("text.") for k in sd) else ""
    return _plan(cfg, text_prefix, _reference(cfg)).to_mm(sd, f"open_clip state dict does not fit mm model {label}")


def export_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig | str, *,
                      custom_text: bool | None = None) -> dict[str, torch.Tensor]:
    """mm state dict of the model ``cfg`` -> open_clip state dict.

    ``custom_text``: put the text tower under ``text.`` (open_clip's CoCa and CustomTextCLIP); default: as
    ``cfg.open_clip.custom_text`` says (a config made in mm: for CoCa only, as open_clip builds its plain CLIPs
    with a top-level text tower). Tensors are shared with ``sd`` as in :func:`convert_state_dict`."""
    label, cfg = _label(cfg), resolve_config(cfg)
    _check_supported(cfg)
    if custom_text is None:
        custom_text = _source(cfg).custom_text
    return _plan(cfg, "text." if custom_text else "", _reference(cfg)).from_mm(
        sd, f"mm state dict does not fit mm model {label}")


def _check_module(model: nn.Module, cfg: ModelConfig) -> None:
    """Settings of an open_clip module that its state dict does not show: the MLP activation of each
    tower and CoCa's class-token mask. They must match ``cfg`` for the models to compute the same."""
    stacks = _stacks(cfg)
    prefixes = {"visual.": "vision", "text_decoder.": "decoder"}
    for name, module in model.named_modules():
        if not name.endswith(".mlp.gelu"):  # open_clip's ResidualAttentionBlock names its activation so
            continue
        tower = next((t for p, t in prefixes.items() if name.startswith(p)), "text")
        if tower not in stacks:  # a decoder the config lacks: the state dict check names its keys
            continue
        kind = type(module).__name__
        act = {"QuickGELU": "quick_gelu", "GELU": "gelu" if getattr(module, "approximate", "none") == "none" else "gelu_tanh"}
        if act.get(kind, kind) != stacks[tower].act:
            raise ConversionError(
                f"open_clip module {name} is {kind} but the mm config's {tower}.transformer.act is "
                f"{stacks[tower].act!r} (open_clip's -quickgelu models need the mm -quickgelu preset)")
    correct = getattr(getattr(model, "text", None), "correct_cls_mask", None)
    if cfg.text.embed_cls and correct is not None and ("correct" if correct else "open_clip") != cfg.text.cls_mask:
        raise ConversionError(
            f"open_clip's text.correct_cls_mask is {correct} but the mm config's text.cls_mask is "
            f"{cfg.text.cls_mask!r} (use text.cls_mask={'correct' if correct else 'open_clip'!r})")


def open_clip_config(cfg: ModelConfig | str) -> dict:
    """Keyword arguments of open_clip's ``CLIP`` (``CoCa`` when the dict has ``multimodal_cfg``) for a
    model of mm config ``cfg``: ``open_clip.CoCa(**open_clip_config("tiny-coca"))`` builds the open_clip
    model that :func:`to_open_clip`'s state dict loads into. open_clip has no config key for CoCa's
    class-token mask: for ``text.cls_mask: correct`` set ``model.text.correct_cls_mask = True``."""
    cfg = resolve_config(cfg)
    _check_supported(cfg)
    source = _source(cfg)
    if source.vision != "vit":  # a timm tower: open_clip names it, and builds exactly the registry's model
        if source.name in open_clip_model_names() and _same_network(cfg, open_clip_preset(source.name)):
            return registry_config(source.name)
        raise ConversionError(f"not convertible to an open_clip config: open_clip builds this image tower with timm "
                              f"(open_clip.vision {source.vision!r}) from a timm model name, and the config is not "
                              "that of an open_clip registry model; its weights convert (to_open_clip) into the model "
                              "open_clip builds for the registry name")
    v, t = cfg.vision, cfg.text
    vt, tt = v.transformer, t.transformer
    coca = cfg.decoder is not None
    out = {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": vt.act == "quick_gelu",
        "init_logit_scale": cfg.init_logit_scale,
        "vision_cfg": {
            "image_size": v.image_size, "patch_size": v.patch_size, "width": vt.width, "layers": vt.depth,
            "head_width": vt.head_dim, "mlp_ratio": vt.mlp_ratio, "ls_init_value": vt.layer_scale,
            "no_ln_pre": not v.norm_pre, "pool_type": "avg" if v.pool == "mean" else "tok",
            "attentional_pool": v.pool == "attn", "attn_pooler_queries": v.attn_pool_queries,
            "attn_pooler_heads": v.attn_pool_heads, "output_tokens": coca,
        },
        "text_cfg": {
            "context_length": t.context_length, "vocab_size": t.vocab_size, "width": tt.width, "heads": tt.heads,
            "layers": tt.depth, "mlp_ratio": tt.mlp_ratio, "ls_init_value": tt.layer_scale,
            "embed_cls": t.embed_cls, "pad_id": t.pad_id, "proj_bias": t.proj_bias, "output_tokens": coca,
        },
    }
    if cfg.init_logit_bias is not None:
        out["init_logit_bias"] = cfg.init_logit_bias
    if coca:
        dt = cfg.decoder.transformer
        out["multimodal_cfg"] = {
            "context_length": t.context_length, "vocab_size": t.vocab_size, "width": dt.width, "heads": dt.heads,
            "layers": dt.depth, "ls_init_value": dt.layer_scale,
        }
    return out


_PREPROCESSING = ("image_mean", "image_std", "resize_mode", "interpolation")


def _same_network(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether two configs build the same network (preprocessing and open_clip names aside)."""
    def arch(cfg: ModelConfig) -> dict:
        d = asdict(cfg)
        d.pop("open_clip")
        for k in _PREPROCESSING:
            d["vision"].pop(k)
        return d
    return arch(a) == arch(b)


def open_clip_model_config(name: ModelConfig | str | dict, module: nn.Module | None = None) -> ModelConfig:
    """The mm config of an open_clip model: ``name`` is an mm ModelConfig (kept), an mm preset or open_clip
    registry name, or an open_clip config dict (a user's JSON). With the open_clip ``module`` itself, its timm
    image tower is read rather than built again, and its preprocessing (what ``open_clip.create_model`` set from
    a pretrained tag: mean / std, resize mode, interpolation) is the config's."""
    trunk = getattr(getattr(module, "visual", None), "trunk", None)
    if isinstance(name, dict):
        cfg = from_open_clip_config(name, trunk=trunk)
    elif isinstance(name, str) and name not in mm_presets() and name in open_clip_model_names():
        cfg = from_open_clip_config(registry_config(name), name, trunk=trunk)
    else:
        cfg = resolve_config(name)
    pre = getattr(getattr(module, "visual", None), "preprocess_cfg", None) or {}
    v = cfg.vision
    for key, field in (("mean", "image_mean"), ("std", "image_std"), ("resize_mode", "resize_mode"),
                       ("interpolation", "interpolation")):
        if pre.get(key) is not None:
            setattr(v, field, tuple(pre[key]) if key in ("mean", "std") else pre[key])
    return validate(cfg)


def from_open_clip(model_or_state_dict: nn.Module | dict[str, torch.Tensor], name: ModelConfig | str | dict) -> CLIP:
    """An mm model with the weights of an open_clip model (or its state dict).

    ``name``: the open_clip model name (``ViT-B-32``, ``coca_ViT-B-32``, ``ViT-SO400M-14-SigLIP``...: its
    registry config is translated, :mod:`mm.hub.open_clip_configs`), an open_clip config dict, or an mm
    ModelConfig. Given the open_clip module, its preprocessing comes along (:func:`open_clip_model_config`). The
    mm model's tensors are new (never shared with the source), with the source's dtype and device."""
    module = model_or_state_dict if isinstance(model_or_state_dict, nn.Module) else None
    label, cfg = _label(name), open_clip_model_config(name, module)
    _check_supported(cfg)
    if module is not None:
        _check_module(module, cfg)
        sd = module.state_dict()
    else:
        sd = model_or_state_dict
    # copies: training either model must leave the other untouched
    mm_sd = {k: v.detach().clone() for k, v in convert_state_dict(sd, cfg).items()}
    with torch.device("meta"):  # no random init: every tensor is assigned from mm_sd
        model = model_class(cfg)(cfg)
    model.load_state_dict(mm_sd, strict=True, assign=True)
    device = next(iter(mm_sd.values())).device
    for m in model.modules():  # tables derived from the config (RoPE): computed, not loaded
        if hasattr(m, "init_buffers") and any(b.is_meta for b in m.buffers(recurse=False)):
            m.init_buffers(device)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:  # a non-persistent buffer has no value in any state dict; building on meta cannot fill it
        raise ConversionError(f"mm model {label} has buffer {left[0]!r} that a state dict does not hold")
    return model


def to_open_clip(model: CLIP, *, custom_text: bool | None = None) -> dict[str, torch.Tensor]:
    """The open_clip state dict of an mm model: ``open_clip.create_model(name).load_state_dict(sd)``
    loads it with ``strict=True``. Like ``state_dict()``, it shares the model's tensors where they are
    copied unchanged. ``custom_text`` as in :func:`export_state_dict`."""
    return export_state_dict(model.state_dict(), model.config, custom_text=custom_text)
