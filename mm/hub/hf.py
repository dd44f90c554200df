"""Hugging Face ``transformers.CLIPModel`` checkpoints -> mm models, exactly.

``transformers`` is an optional dependency: it is imported only to read a model directory. A state
dict plus its ``config.json`` (as a dict) are enough otherwise.

HF keeps q, k and v projections apart (``self_attn.{q,k,v}_proj``); mm packs them in ``attn.qkv``
in that order, which is how open_clip's ``in_proj_weight`` packs them too. HF's projections are
bias-free ``nn.Linear`` layers, already mm's layout. The text tower pools at the end token:
HF's legacy configs (``eos_token_id == 2``) take the arg-max token id, which for CLIP's vocabulary is
the end token (49407), i.e. mm's ``eot`` pooling.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..layers import TransformerConfig
from ..models import CLIP, ModelConfig, TextConfig, VisionConfig
from .open_clip import ConversionError

_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _act(name: str) -> str:
    if name not in _ACTS:
        raise ConversionError(f"hidden_act {name!r} has no mm equivalent (known: {', '.join(_ACTS)})")
    return _ACTS[name]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The mm ModelConfig of a HF ``CLIPConfig`` (its ``to_dict()`` / ``config.json``)."""
    v, t = hf["vision_config"], hf["text_config"]
    vt = TransformerConfig(v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
                           mlp_ratio=v["intermediate_size"] / v["hidden_size"], act=_act(v.get("hidden_act", "quick_gelu")),
                           norm_eps=v.get("layer_norm_eps", 1e-5))
    tt = TransformerConfig(t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"],
                           mlp_ratio=t["intermediate_size"] / t["hidden_size"], act=_act(t.get("hidden_act", "quick_gelu")),
                           norm_eps=t.get("layer_norm_eps", 1e-5))
    return ModelConfig(
        embed_dim=hf.get("projection_dim", 512),
        vision=VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], transformer=vt),
        text=TextConfig(vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"], transformer=tt),
        init_logit_scale=hf.get("logit_scale_init_value", 2.6592),
    )


def _layer(hf: str, mm: str) -> list[tuple[tuple[str, ...], str]]:
    """(HF keys, mm key) for one encoder layer; several HF keys are concatenated (packed qkv)."""
    out = []
    for p in ("weight", "bias"):
        out += [
            ((f"{hf}.layer_norm1.{p}",), f"{mm}.norm1.{p}"),
            (tuple(f"{hf}.self_attn.{x}_proj.{p}" for x in "qkv"), f"{mm}.attn.qkv.{p}"),
            ((f"{hf}.self_attn.out_proj.{p}",), f"{mm}.attn.proj.{p}"),
            ((f"{hf}.layer_norm2.{p}",), f"{mm}.norm2.{p}"),
            ((f"{hf}.mlp.fc1.{p}",), f"{mm}.ffn.fc1.{p}"),
            ((f"{hf}.mlp.fc2.{p}",), f"{mm}.ffn.fc2.{p}"),
        ]
    return out


def _rules(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str]]:
    rules = [
        (("logit_scale",), "logit_scale"),
        (("vision_model.embeddings.patch_embedding.weight",), "vision.patch_embed.weight"),
        (("vision_model.embeddings.class_embedding",), "vision.cls_token"),
        (("vision_model.embeddings.position_embedding.weight",), "vision.pos_embed"),
        (("visual_projection.weight",), "vision.proj.weight"),
        (("text_model.embeddings.token_embedding.weight",), "text.token_embedding.weight"),
        (("text_model.embeddings.position_embedding.weight",), "text.pos_embed"),
        (("text_projection.weight",), "text.proj.weight"),
    ]
    for p in ("weight", "bias"):
        rules += [
            ((f"vision_model.pre_layrnorm.{p}",), f"vision.norm_pre.{p}"),  # sic: HF's spelling
            ((f"vision_model.post_layernorm.{p}",), f"vision.norm.{p}"),
            ((f"text_model.final_layer_norm.{p}",), f"text.norm.{p}"),
        ]
    for i in range(cfg.vision.transformer.depth):
        rules += _layer(f"vision_model.encoder.layers.{i}", f"vision.transformer.blocks.{i}")
    for i in range(cfg.text.transformer.depth):
        rules += _layer(f"text_model.encoder.layers.{i}", f"text.transformer.blocks.{i}")
    return rules


def convert_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF CLIPModel state dict -> mm state dict; errors name the first missing key or shape mismatch."""
    with torch.device("meta"):
        ref = CLIP(cfg).state_dict()
    out, used = {}, set()
    for hf_keys, mm_key in _rules(cfg):
        missing = [k for k in hf_keys if k not in sd]
        if missing:
            raise ConversionError(f"HF state dict has no {missing[0]!r} (needed for mm {mm_key!r})")
        t = torch.cat([sd[k] for k in hf_keys]) if len(hf_keys) > 1 else sd[hf_keys[0]]
        if tuple(t.shape) != tuple(ref[mm_key].shape):
            raise ConversionError(f"HF {hf_keys[0]!r} gives shape {tuple(t.shape)} for mm {mm_key!r}, "
                                  f"expected {tuple(ref[mm_key].shape)}")
        out[mm_key] = t.detach().clone()
        used.update(hf_keys)
    # position_ids are index buffers HF derives from the config; anything else unused means a mismatch
    extra = sorted(k for k in sd if k not in used and not k.endswith("position_ids"))
    if extra:
        raise ConversionError(f"HF state dict has {len(extra)} tensors mm does not use, first {extra[0]!r}")
    return out


def from_hf_clip(model_or_dir: Any) -> CLIP:
    """An mm CLIP with the weights of a ``transformers.CLIPModel`` (a module, or a directory holding
    ``config.json`` and its weights)."""
    if isinstance(model_or_dir, (str, Path)):
        try:
            from transformers import CLIPModel
        except ImportError as e:
            raise ImportError("reading a Hugging Face checkpoint needs `pip install transformers`") from e
        d = Path(model_or_dir)
        hf_cfg = json.loads((d / "config.json").read_text())
        model_or_dir = CLIPModel.from_pretrained(str(d))
    else:
        hf_cfg = model_or_dir.config.to_dict()
    cfg = config_from_hf(hf_cfg)
    sd = convert_hf_state_dict(model_or_dir.state_dict(), cfg)
    with torch.device("meta"):
        model = CLIP(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model
