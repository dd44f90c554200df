"""Hugging Face ``transformers`` checkpoints <-> mm models, exactly: ``CLIPModel``, ``SiglipModel`` and
``Siglip2Model`` in (:func:`from_hf`), ``CLIPModel`` out (:func:`to_hf_clip`).

``transformers`` is an optional dependency: it is imported only to read a model directory; a module's
``state_dict()`` and ``config.to_dict()`` are enough otherwise, and writing a ``CLIPModel`` directory needs
only safetensors. One table per model type, :func:`hf_rules`, says where every HF tensor goes, with a
:class:`~mm.hub.rules.Transform` holding both directions, read one way on import and the other on export by the
engine open_clip conversion uses too (:mod:`mm.hub.rules`). Layout differences the transforms bridge:

* HF keeps q, k and v apart (``self_attn.{q,k,v}_proj``); mm packs them in ``attn.qkv`` in that order.
* SigLIP's attention-pooling head is an ``nn.MultiheadAttention`` (``in_proj_weight`` packs [q; k; v]); mm's
  latent pool (timm's layout) has ``q`` and a packed [k; v] ``kv``. Its probe is (1, 1, W), mm's latent (1, W).
* SigLIP keeps ``logit_scale`` / ``logit_bias`` as (1,) tensors, mm (and CLIP) as scalars.
* Siglip2 embeds patches with an ``nn.Linear`` over patches flattened (row, column, channel), i.e. channels
  last (``image_processing_siglip2.convert_image_to_patches``); mm's patch embedding is a Conv2d whose weight
  is (W, channel, row, column): the same numbers, permuted.

What each HF model computes, in mm's terms (transformers 4.55):

* CLIP text pools at ``argmax(input_ids)`` when ``text_config.eos_token_id == 2`` (the legacy configs of the
  OpenAI checkpoints), else at the first ``eos_token_id`` (position 0 if none): mm's ``argmax`` / ``eos``.
* SigLIP / Siglip2 text is bidirectional and pools the last position, padding or not (its processor pads to
  ``max_length``), then a ``head`` Linear with bias: mm's ``causal: false``, ``pool: end``, ``proj_bias``. mm
  computes HF's features called without ``attention_mask`` (how the checkpoints were trained, and what
  open_clip does); with one, HF hides padding from attention and the results differ.
* SigLIP's image tower is timm's ViT without class token or pre-norm (patch bias, final norm, latent-query
  attention pool, no projection): mm's ``pool: map``.
* Siglip2 (NaFlex) takes padded patch sequences (``pixel_values`` (B, N, p*p*3), ``pixel_attention_mask``,
  ``spatial_shapes``) and resizes its position table to each image's patch grid: bilinear, antialiased, corners not
  aligned, in fp32 on the CPU (``Siglip2VisionEmbeddings.resize_positional_embeddings``). mm's tower takes the same
  batch as :class:`~mm.models.patches.Patches` (``pixels``, ``valid`` as the attention mask, ``shapes`` as the spatial
  shapes) with ``vision.pos_interpolation: bilinear``, which the import sets: ``encode_image`` equals
  ``get_image_features`` and the tower's tokens at the valid positions equal ``last_hidden_state`` (1e-5 in fp32,
  tests/test_naflex_interop.py). HF resizes even when the grid is the table's, where mm adds the table as it is:
  PyTorch's antialiased bilinear resize to the same size is exactly the identity (checked bit for bit on the CPU
  in fp32), so the two agree there too. Square images at ``image_size = patch_size * sqrt(num_patches)`` go
  through mm's convolutional path with the same weights. Padding positions hold HF's first position row in HF and
  zeros in mm: neither is attended to or pooled. There is no Siglip2 export (only :func:`to_hf_clip`).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import validate
from ..layers import TransformerConfig
from ..models import CLIP, ModelConfig, TextConfig, VisionConfig
from ..utils.io import atomic_path
from .rules import COPY, PACKED_TO_Q_KV, SQUEEZE, ConversionError, Plan, Rule, Step, Transform, expand, packed, plan
from .rules import params as _params
from .rules import rule as _rule
from .wrapped import is_wrapped

HF_MODEL_TYPES = ("clip", "siglip", "siglip2")
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_LEGACY_EOS = 2  # HF CLIP's eos_token_id that selects argmax pooling (modeling_clip.CLIPTextTransformer)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")

# [q; k; v] kept apart (HF) <-> packed (mm): parts are cloned so no two tensors share storage
SPLIT_QKV = packed(3)


def _patches_to_conv(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    w = ts[0]  # (W, p * p * 3), patches flattened (row, column, channel)
    p = math.isqrt(w.shape[1] // 3)
    return [w.reshape(w.shape[0], p, p, 3).permute(0, 3, 1, 2).contiguous()]


def _conv_to_patches(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [ts[0].permute(0, 2, 3, 1).reshape(ts[0].shape[0], -1)]


LINEAR_PATCHES = Transform(_patches_to_conv, _conv_to_patches)


# ------------------------------------------------------------------------------------------------ configs

def _act(name: str) -> str:
    if name not in _ACTS:
        raise ConversionError(f"hidden_act {name!r} has no mm equivalent (known: {', '.join(_ACTS)})")
    return _ACTS[name]


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio whose ``int(width * ratio)`` is exactly ``hidden`` (4304 / 1152 alone falls one short)."""
    r = hidden / width
    while int(width * r) < hidden:
        r = math.nextafter(r, math.inf)
    return r


def _stack(c: dict[str, Any]) -> TransformerConfig:
    return TransformerConfig(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                             mlp_ratio=_mlp_ratio(c["intermediate_size"], c["hidden_size"]),
                             act=_act(c.get("hidden_act", "quick_gelu")), norm_eps=c.get("layer_norm_eps", 1e-5))


def _token_ids(t: dict[str, Any]) -> dict[str, int]:
    """pad / start / end ids from a HF text config, where they are ids of its vocabulary."""
    def ok(v: Any) -> bool:
        return isinstance(v, int) and 0 <= v < t["vocab_size"]
    pad = t.get("pad_token_id") if ok(t.get("pad_token_id")) else 0
    eot = t.get("eos_token_id") if ok(t.get("eos_token_id")) else pad
    sot = t.get("bos_token_id") if ok(t.get("bos_token_id")) else eot
    return {"pad_id": pad, "eot_id": eot, "sot_id": sot}


def _clip_ids(t: dict[str, Any], legacy: bool) -> dict[str, int]:
    """CLIP BPE's ids (mm's tokenizer pads with 0, HF's with the end token: causal pooling never sees padding);
    the end token is the one HF pools at: ``eos_token_id``, or for arg-max pooling the largest id."""
    n = t["vocab_size"]
    eot = n - 1 if legacy else t.get("eos_token_id", n - 1)
    bos = t.get("bos_token_id")
    sot = bos if isinstance(bos, int) and 0 <= bos < n and not legacy else max(eot - 1, 0)
    return {"pad_id": 0, "eot_id": eot, "sot_id": sot}


def _preprocessing(model_type: str, directory: Path | None) -> dict[str, Any]:
    """mm's image preprocessing for a HF model: its image processor's defaults, then the directory's
    ``preprocessor_config.json`` (mean, std, resampling). CLIP resizes the shortest side and crops; SigLIP
    resizes both sides (squash)."""
    out: dict[str, Any] = {} if model_type == "clip" else {
        "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5), "resize_mode": "squash",
        "interpolation": "bicubic" if model_type == "siglip" else "bilinear"}
    path = directory / "preprocessor_config.json" if directory is not None else None
    if path is not None and path.is_file():
        pre = json.loads(path.read_text())
        for key in ("image_mean", "image_std"):
            if isinstance(pre.get(key), list) and len(pre[key]) == 3:
                out[key] = tuple(float(x) for x in pre[key])
        out["interpolation"] = {2: "bilinear", 3: "bicubic"}.get(pre.get("resample"), out.get("interpolation",
                                                                                             "bicubic"))
    return out


def _clip_config(hf: dict[str, Any], pre: dict[str, Any]) -> ModelConfig:
    v, t = hf["vision_config"], hf["text_config"]
    legacy = t.get("eos_token_id", 49407) == _LEGACY_EOS
    return ModelConfig(
        embed_dim=hf.get("projection_dim", 512),
        vision=VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], transformer=_stack(v), **pre),
        text=TextConfig(vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"],
                        transformer=_stack(t), pool="argmax" if legacy else "eos", **_clip_ids(t, legacy)),
        init_logit_scale=hf.get("logit_scale_init_value", 2.6592),
    )


def _siglip_config(hf: dict[str, Any], pre: dict[str, Any], tokenizer: str | None, directory: Path | None
                   ) -> ModelConfig:
    v, t, kind = hf["vision_config"], hf["text_config"], hf["model_type"]
    width = v["hidden_size"]
    if not v.get("vision_use_head", True):
        raise ConversionError("vision_config.vision_use_head is false: the model has no image embedding")
    if (t.get("projection_size") or t["hidden_size"]) != width:  # null in a config.json: the text width
        raise ConversionError(f"text_config.projection_size ({t.get('projection_size')}) differs from the image "
                              f"embedding's width (vision_config.hidden_size {width})")
    if kind == "siglip2":
        grid = math.isqrt(v["num_patches"])
        if grid * grid != v["num_patches"]:
            raise ConversionError(f"vision_config.num_patches {v['num_patches']} is not a square grid")
        image_size = grid * v["patch_size"]
    else:
        image_size = v["image_size"]
    if kind == "siglip2":  # NaFlex input: HF resizes the position table bilinearly (antialiased)
        pre = {**pre, "pos_interpolation": "bilinear"}
    stack = _stack(v)
    tokenizer = tokenizer or _siglip_tokenizer(hf, directory)
    return ModelConfig(
        embed_dim=width,
        vision=VisionConfig(image_size=image_size, patch_size=v["patch_size"], transformer=stack, class_token=False,
                            pool="map", attn_pool_heads=stack.heads, norm_pre=False, patch_bias=True, proj="none",
                            patch_remainder=image_size % v["patch_size"] != 0, **pre),
        text=TextConfig(vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"], transformer=_stack(t),
                        causal=False, pad_mask=False, pool="end", proj="linear", proj_bias=True, tokenizer=tokenizer,
                        **_token_ids(t)),
        init_logit_scale=math.log(10), init_logit_bias=-10.0,  # the weights' values replace both
    )


def config_from_hf(hf: dict[str, Any], *, tokenizer: str | None = None, directory: str | Path | None = None
                   ) -> ModelConfig:
    """The mm ModelConfig of a HF ``CLIPConfig`` / ``SiglipConfig`` / ``Siglip2Config`` (``to_dict()`` or
    ``config.json``; no ``model_type`` means CLIP). ``tokenizer``: the text config's (SigLIP default:
    ``hf:DIRECTORY`` when it holds tokenizer files, else ``hf:`` the config's ``_name_or_path``); ``directory``:
    where ``preprocessor_config.json`` may be."""
    kind = hf.get("model_type", "clip")
    if kind not in HF_MODEL_TYPES:
        raise ConversionError(f"model_type {kind!r}: mm imports {', '.join(HF_MODEL_TYPES)}")
    v = hf["vision_config"]
    if v.get("num_channels", 3) != 3:
        raise ConversionError(f"vision_config.num_channels is {v['num_channels']}; mm's image towers take 3")
    d = Path(directory) if directory is not None else None
    pre = _preprocessing(kind, d)
    if kind == "clip":
        cfg = _clip_config(hf, pre)
        if tokenizer is not None:
            cfg.text.tokenizer = tokenizer
    else:
        cfg = _siglip_config(hf, pre, tokenizer, d)
    return validate(cfg)


def _siglip_tokenizer(hf: dict[str, Any], directory: Path | None) -> str:
    if directory is not None and any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return f"hf:{directory.resolve()}"
    name = hf.get("_name_or_path") or ""
    if name and not Path(name).is_dir():
        return f"hf:{name}"
    warnings.warn("the Hugging Face model names no tokenizer: the mm text config keeps CLIP's BPE, which does not "
                  "fit a SigLIP vocabulary (pass tokenizer='hf:NAME' or convert a directory with tokenizer files)",
                  stacklevel=3)
    return "clip"


# ------------------------------------------------------------------------------------------------ tensors

def _layer(hf: str, mm: str, tower: str) -> list[Rule]:
    """One HF encoder layer (CLIPEncoderLayer / SiglipEncoderLayer: the same names) <-> an mm Block; ``{i}`` is the
    layer of the ``tower``'s stack."""
    return [
        *_params(f"{hf}.layer_norm1", f"{mm}.norm1", layers=tower),
        *[_rule(tuple(f"{hf}.self_attn.{x}_proj.{n}" for x in "qkv"), f"{mm}.attn.qkv.{n}", SPLIT_QKV, layers=tower)
          for n in ("weight", "bias")],
        *_params(f"{hf}.self_attn.out_proj", f"{mm}.attn.proj", layers=tower),
        *_params(f"{hf}.layer_norm2", f"{mm}.norm2", layers=tower),
        *_params(f"{hf}.mlp.fc1", f"{mm}.ffn.fc1", layers=tower),
        *_params(f"{hf}.mlp.fc2", f"{mm}.ffn.fc2", layers=tower),
    ]


# every layer of both towers' stacks
LAYER_RULES: list[Rule] = [r for t in ("vision", "text")
                           for r in _layer(f"{t}_model.encoder.layers.{{i}}", f"{t}.transformer.blocks.{{i}}", t)]

CLIP_RULES: list[Rule] = [
    _rule("logit_scale", "logit_scale"),
    _rule("vision_model.embeddings.patch_embedding.weight", "vision.patch_embed.weight"),
    _rule("vision_model.embeddings.class_embedding", "vision.cls_token"),
    _rule("vision_model.embeddings.position_embedding.weight", "vision.pos_embed"),
    *_params("vision_model.pre_layrnorm", "vision.norm_pre"),  # sic: HF's spelling
    *_params("vision_model.post_layernorm", "vision.norm"),
    _rule("visual_projection.weight", "vision.proj.weight"),
    _rule("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight"),
    _rule("text_model.embeddings.position_embedding.weight", "text.pos_embed"),
    *_params("text_model.final_layer_norm", "text.norm"),
    _rule("text_projection.weight", "text.proj.weight"),
]


def _siglip_rules(kind: str) -> list[Rule]:
    head, pool = "vision_model.head", "vision.attn_pool"
    return [
        _rule("logit_scale", "logit_scale", SQUEEZE),
        _rule("logit_bias", "logit_bias", SQUEEZE),
        _rule("vision_model.embeddings.patch_embedding.weight", "vision.patch_embed.weight",
              LINEAR_PATCHES if kind == "siglip2" else COPY),
        _rule("vision_model.embeddings.patch_embedding.bias", "vision.patch_embed.bias"),
        _rule("vision_model.embeddings.position_embedding.weight", "vision.pos_embed"),
        *_params("vision_model.post_layernorm", "vision.norm"),
        _rule(f"{head}.probe", f"{pool}.latent", SQUEEZE),
        _rule(f"{head}.attention.in_proj_weight", (f"{pool}.attn.q.weight", f"{pool}.attn.kv.weight"), PACKED_TO_Q_KV),
        _rule(f"{head}.attention.in_proj_bias", (f"{pool}.attn.q.bias", f"{pool}.attn.kv.bias"), PACKED_TO_Q_KV),
        *_params(f"{head}.attention.out_proj", f"{pool}.attn.proj"),
        *_params(f"{head}.layernorm", f"{pool}.norm"),
        *_params(f"{head}.mlp.fc1", f"{pool}.mlp.fc1"),
        *_params(f"{head}.mlp.fc2", f"{pool}.mlp.fc2"),
        _rule("text_model.embeddings.token_embedding.weight", "text.token_embedding.weight"),
        _rule("text_model.embeddings.position_embedding.weight", "text.pos_embed"),
        *_params("text_model.final_layer_norm", "text.norm"),
        *_params("text_model.head", "text.proj"),
    ]


def rules(model_type: str = "clip") -> list[Rule]:
    """The rule table of a HF ``model_type`` model (:mod:`mm.hub.rules`)."""
    return [*(CLIP_RULES if model_type == "clip" else _siglip_rules(model_type)), *LAYER_RULES]


def _depths(cfg: ModelConfig) -> dict[str, int]:
    return {tower: getattr(cfg, tower).transformer.depth for tower in ("vision", "text")}


def hf_rules(cfg: ModelConfig, model_type: str = "clip") -> list[Step]:
    """(HF keys, mm keys, transform) for every tensor of a HF ``model_type`` model of mm config ``cfg``."""
    return expand(rules(model_type), cfg, _depths(cfg))


def _plan(cfg: ModelConfig, model_type: str, mm_tensors: dict[str, torch.Tensor],
          unmatched: str = "mm tensor {key!r} has no counterpart in the Hugging Face model") -> Plan:
    return plan(rules(model_type), cfg, mm_tensors, _depths(cfg), unmatched=unmatched)


def _derived(key: str) -> bool:
    """position_ids are index buffers HF derives from the config: not weights, and not needed."""
    return key.endswith("position_ids")


def convert_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, model_type: str = "clip"
                          ) -> dict[str, torch.Tensor]:
    """HF state dict -> mm state dict (new tensors); errors name the mis-shaped, missing and unused tensors."""
    with torch.device("meta"):
        ref = CLIP(cfg).state_dict()
    out = _plan(cfg, model_type, ref).to_mm(sd, f"HF {model_type} state dict does not fit the mm config",
                                            ignore=_derived)
    return {k: x.detach().clone() for k, x in out.items()}


def _load_hf_dir(d: Path) -> Any:
    """The transformers model saved in directory ``d``."""
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d / 'config.json'}: missing (not a Hugging Face model directory)")
    hf_cfg = json.loads((d / "config.json").read_text())
    kind = hf_cfg.get("model_type", "clip")
    if kind not in HF_MODEL_TYPES:
        raise ConversionError(f"{d}: model_type {kind!r}; mm imports {', '.join(HF_MODEL_TYPES)}")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("reading a Hugging Face checkpoint needs `pip install transformers`") from e
    cls = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel, "siglip2": transformers.Siglip2Model}
    return cls[kind].from_pretrained(str(d))


def from_hf(model_or_dir: Any, *, tokenizer: str | None = None) -> CLIP:
    """An mm model with the exact weights of a ``transformers`` ``CLIPModel``, ``SiglipModel`` or ``Siglip2Model``
    (a module, or a directory holding its ``config.json`` and weights), chosen by ``config.model_type``.
    ``tokenizer`` sets the text config's (see :func:`config_from_hf`)."""
    d = None
    if isinstance(model_or_dir, (str, Path)):
        d = Path(model_or_dir)
        model_or_dir = _load_hf_dir(d)
    # the loaded config, not config.json: the hub's files leave out defaults (SigLIP's often hold model_type only)
    hf_cfg = model_or_dir.config.to_dict()
    cfg = config_from_hf(hf_cfg, tokenizer=tokenizer, directory=d)
    sd = convert_hf_state_dict(model_or_dir.state_dict(), cfg, hf_cfg.get("model_type", "clip"))
    with torch.device("meta"):
        model = CLIP(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def from_hf_clip(model_or_dir: Any) -> CLIP:
    """An mm CLIP with the weights of a ``transformers.CLIPModel`` (a module, or a directory holding
    ``config.json`` and its weights). :func:`from_hf` also takes SigLIP models."""
    return from_hf(model_or_dir)


# ------------------------------------------------------------------------------------------------ export

def _stack_problems(cfg: ModelConfig) -> list[tuple[str, str]]:
    problems = []
    for tower in ("vision", "text"):
        t, key = getattr(cfg, tower).transformer, f"{tower}.transformer"
        for bad, field, why in (
            (t.ffn != "mlp", "ffn", f"HF's CLIP MLP is Linear-activation-Linear, not {t.ffn!r}"),
            (t.moe is not None, "moe", "HF's CLIP has no Mixture-of-Experts"),
            (t.sparse_attention is not None, "sparse_attention", "HF's CLIP attention is dense"),
            (t.qk_norm, "qk_norm", "HF's CLIP has no qk-norm"),
            (not t.qkv_bias, "qkv_bias", "HF's CLIP q/k/v projections have biases"),
            (not getattr(t, "k_bias", True), "k_bias", "HF's CLIP key projection has a bias"),
            (getattr(t, "sub_norm", False), "sub_norm", "HF's CLIP has no sub-LayerNorms"),
            (t.layer_scale is not None, "layer_scale", "HF's CLIP has no LayerScale"),
            (t.act not in _HF_ACTS, "act", f"HF's CLIP activations are {', '.join(_HF_ACTS)}, not {t.act!r}"),
        ):
            if bad:
                problems.append((f"{key}.{field}", why))
    return problems


def _tower_problems(cfg: ModelConfig) -> list[tuple[str, str]]:
    v, t, problems = cfg.vision, cfg.text, []
    for bad, key, why in (
        (v.stem != "patch", "vision.stem", f"HF's CLIP patchifies; mm's {v.stem!r} stem has no counterpart"),
        (v.pos_embed not in ("learned", "sincos2d"), "vision.pos_embed", "HF's CLIP adds a position table"),
        (getattr(v, "rope", None) is not None, "vision.rope", "HF's CLIP attention has no rotary positions"),
        (not v.class_token, "vision.class_token", "HF's CLIP image tower has a class token"),
        (v.pool != "cls", "vision.pool", f"HF's CLIP pools the class token, not {v.pool!r}"),
        (not v.norm_pre, "vision.norm_pre", "HF's CLIP always has the pre-norm (pre_layrnorm)"),
        (v.final_ln_after_pool, "vision.final_ln_after_pool", "HF's CLIP norms before pooling"),
        (v.patch_bias, "vision.patch_bias", "HF's CLIP patch embedding has no bias"),
        (v.proj_bias and v.proj == "linear", "vision.proj_bias", "HF's CLIP projections have no bias"),
        (t.pos_embed != "learned", "text.pos_embed", "HF's CLIP adds a learned position table"),
        (not t.causal, "text.causal", "HF's CLIP text tower is causal"),
        (t.embed_cls, "text.embed_cls", "HF's CLIP has no appended class token (CoCa)"),
        (t.pool not in ("argmax", "eos", "eot"), "text.pool",
         f"HF's CLIP pools at the arg-max id or the first end token, not {t.pool!r}"),
        (t.pool == "eot" and t.tokenizer != "clip", "text.pool",
         "eot is HF's first-end-token pooling only for texts that always hold one (CLIP BPE)"),
        (t.pool in ("eos", "eot") and t.eot_id == _LEGACY_EOS, "text.eot_id",
         f"HF's CLIP reads eos_token_id {_LEGACY_EOS} as its legacy arg-max pooling"),
        (t.proj_bias and t.proj == "linear", "text.proj_bias", "HF's CLIP projections have no bias"),
    ):
        if bad:
            problems.append((key, why))
    return problems


def check_hf_clip(model: Any) -> None:
    """Raise :class:`ConversionError` naming the first config field a HF ``CLIPModel`` cannot express."""
    if is_wrapped(model):
        raise ConversionError("not convertible to a Hugging Face CLIPModel: the model runs through open_clip "
                              "(mm does not build its towers); its weights are open_clip's own (model.model)")
    cfg = model.config
    problems = []
    if cfg.one_tower is not None:
        problems.append(("one_tower", "HF's CLIP has two towers"))
    elif cfg.decoder is not None or type(model) is not CLIP:
        problems.append(("decoder", f"HF's CLIPModel has no captioning decoder ({type(model).__name__})"))
    else:
        problems += _stack_problems(cfg) + _tower_problems(cfg)
        if cfg.init_logit_bias is not None:
            problems.append(("init_logit_bias", "HF's CLIPModel has no logit bias (SigLIP)"))
    if problems:
        raise ConversionError(f"not convertible to a Hugging Face CLIPModel: {problems[0][0]}: {problems[0][1]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def _hf_tower(stack: TransformerConfig, embed_dim: int) -> dict[str, Any]:
    return {"hidden_size": stack.width, "intermediate_size": stack.mlp_hidden, "num_hidden_layers": stack.depth,
            "num_attention_heads": stack.heads, "hidden_act": _HF_ACTS[stack.act], "layer_norm_eps": stack.norm_eps,
            "projection_dim": embed_dim, "attention_dropout": 0.0, "dropout": 0.0}


def hf_clip_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of the HF ``CLIPModel`` that :func:`to_hf_clip` writes for mm config ``cfg``."""
    v, t = cfg.vision, cfg.text
    # argmax pooling is HF's legacy eos_token_id 2; first-end-token pooling reads the end token's id
    eos = _LEGACY_EOS if t.pool == "argmax" else t.eot_id
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "torch_dtype": "float32",
        "projection_dim": cfg.embed_dim, "logit_scale_init_value": cfg.init_logit_scale, "initializer_factor": 1.0,
        "vision_config": {**_hf_tower(v.transformer, cfg.embed_dim), "image_size": v.image_size,
                          "patch_size": v.patch_size, "num_channels": 3, "model_type": "clip_vision_model"},
        "text_config": {**_hf_tower(t.transformer, cfg.embed_dim), "vocab_size": t.vocab_size,
                        "max_position_embeddings": t.context_length, "bos_token_id": t.sot_id,
                        "eos_token_id": eos, "pad_token_id": t.pad_id, "model_type": "clip_text_model"},
    }


def hf_clip_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """The HF ``CLIPModel`` state dict of an mm CLIP (checked by :func:`check_hf_clip`): contiguous CPU tensors,
    none sharing storage. A fixed sincos position table becomes HF's (learned) table; a missing projection
    (``proj: none``) becomes the identity matrix: both compute what mm does."""
    check_hf_clip(model)
    cfg = model.config
    sd = dict(model.state_dict())
    if cfg.vision.pos_embed == "sincos2d":  # a buffer, not in the state dict
        sd["vision.pos_embed"] = model.vision.pos_embed
    for tower in ("vision", "text"):
        if getattr(cfg, tower).proj == "none":
            sd[f"{tower}.proj.weight"] = torch.eye(cfg.embed_dim)
    # a tensor no rule takes is an mm feature the checks above do not know: refuse rather than drop it
    steps = _plan(cfg, "clip", sd, "not convertible to a Hugging Face CLIPModel: mm tensor {key!r} has no counterpart "
                                   "in HF's CLIP")
    out = steps.from_mm(sd, "mm state dict does not fit the mm config")
    return {k: x.detach().to("cpu", copy=True).contiguous() for k, x in out.items()}


def hf_clip_processor_files(cfg: ModelConfig) -> dict[str, str]:
    """``CLIPProcessor`` files for mm config ``cfg`` (name -> text), as far as HF can express its preprocessing:
    ``preprocessor_config.json`` (not for ``resize_mode: longest``, which pads) and, for CLIP's BPE, the
    ``CLIPTokenizer`` files made from open_clip's vocabulary (none when open_clip is not installed). HF's
    tokenizer pads with the end token, mm's with 0: the features are the same (pooling never sees padding)."""
    v, t, files = cfg.vision, cfg.text, {}
    if v.resize_mode != "longest":
        s, crop = v.image_size, v.resize_mode == "shortest"
        files["preprocessor_config.json"] = json.dumps({
            "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor", "do_resize": True,
            "size": {"shortest_edge": s} if crop else {"height": s, "width": s}, "do_center_crop": crop,
            "crop_size": {"height": s, "width": s}, "resample": 3 if v.interpolation == "bicubic" else 2,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.image_mean),
            "image_std": list(v.image_std), "do_convert_rgb": True}, indent=2)
    spec = importlib.util.find_spec("open_clip")  # its vocabulary file, without importing the package
    where = next(iter(spec.submodule_search_locations or ()), None) if spec else None
    bpe = Path(where) / "bpe_simple_vocab_16e6.txt.gz" if where else None
    if t.tokenizer != "clip" or t.vocab_size != 49408 or bpe is None or not bpe.is_file():
        return files
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[: 49152 - 256 - 2 + 1]  # the header, then the merges CLIP keeps
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2 / CLIP byte symbols
    # in the order of CLIP's vocabulary: the printable bytes as themselves, then the others shifted past 255
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = [*symbols, *(x + "</w>" for x in symbols), *("".join(m.split()) for m in lines[1:]),
             "<|startoftext|>", "<|endoftext|>"]
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    files["vocab.json"] = json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    files["merges.txt"] = "\n".join(["#version: 0.2", *lines[1:]]) + "\n"
    files["special_tokens_map.json"] = json.dumps(specials, indent=2)
    files["tokenizer_config.json"] = json.dumps({"tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
                                                 "model_max_length": t.context_length, **specials}, indent=2)
    return files


def to_hf_clip(model: CLIP, out_dir: str | Path, processor: bool = True) -> Path:
    """Write ``out_dir/config.json`` + ``model.safetensors``: a ``transformers`` ``CLIPModel`` directory that
    ``CLIPModel.from_pretrained(out_dir)`` loads with no missing or unexpected keys and that computes mm's
    ``encode_image`` / ``encode_text``; with ``processor``, also :func:`hf_clip_processor_files`. Raises
    :class:`ConversionError` naming the config field HF's CLIP cannot express. Needs no ``transformers``."""
    from safetensors.torch import save_file

    sd = hf_clip_state_dict(model)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (hf_clip_processor_files(model.config) if processor else {}).items():
        with atomic_path(d / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    with atomic_path(d / "model.safetensors") as tmp_w, atomic_path(d / "config.json") as tmp_c:
        save_file(sd, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(json.dumps(hf_clip_config(model.config), indent=2))
    return d
