"""CLIP composition: two towers, a learnable temperature (and bias, SigLIP), named outputs; create_model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig, apply_overrides, from_dict, load_file, validate
from ..layers import RouterStats
from .text import TextTower
from .vision import VisionTower


@dataclass
class ModelOutput:
    """What ``model(images, tokens)`` returns; losses consume it (``loss(out)``)."""

    image_emb: torch.Tensor | None = None  # (B, embed_dim), L2-normalised
    text_emb: torch.Tensor | None = None  # (B, embed_dim), L2-normalised
    logit_scale: torch.Tensor | None = None  # the multiplier exp(log-scale), as open_clip returns it
    logit_bias: torch.Tensor | None = None  # SigLIP only
    caption_logits: torch.Tensor | None = None  # CoCa only: (B, T, vocab)
    aux_loss: torch.Tensor | None = None  # MoE only: mean of the MoE layers' weighted aux losses
    router_stats: dict[str, list[RouterStats]] | None = None  # MoE only: per tower, per MoE layer


def _mean_aux(stats: dict[str, list[RouterStats]]) -> torch.Tensor | None:
    flat = [s.aux_loss for layer in stats.values() for s in layer]
    return torch.stack(flat).mean() if flat else None


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.vision = VisionTower(cfg.vision, cfg.embed_dim)
        self.text = TextTower(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = self.vision(images).emb
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = self.text(tokens).emb
        return F.normalize(emb, dim=-1) if normalize else emb

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> ModelOutput:
        out = ModelOutput(logit_scale=self.logit_scale.exp(), logit_bias=self.logit_bias)
        stats: dict[str, list[RouterStats]] = {}
        if images is not None:
            v = self.vision(images)
            out.image_emb = F.normalize(v.emb, dim=-1)
            stats["vision"] = v.router_stats
        if tokens is not None:
            t = self.text(tokens)
            out.text_emb = F.normalize(t.emb, dim=-1)
            stats["text"] = t.router_stats
        if any(stats.values()):
            out.router_stats = stats
            out.aux_loss = _mean_aux(stats)
        return out


def _flatten_overrides(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``vision={"patch_dropout": .5}`` and ``vision__patch_dropout=.5`` both become ``vision.patch_dropout``."""
    flat = {}
    for k, v in overrides.items():
        key = prefix + k.replace("__", ".")
        if isinstance(v, dict):
            flat.update(_flatten_overrides(v, key + "."))
        else:
            flat[key] = v
    return flat


def resolve_config(spec: str | Path | dict | ModelConfig, **overrides: Any) -> ModelConfig:
    """A preset name, a YAML/JSON file, a dict or a ModelConfig -> validated ModelConfig."""
    from ..presets import get_preset, list_models

    if isinstance(spec, ModelConfig):
        cfg = spec
    elif isinstance(spec, dict):
        cfg = from_dict(ModelConfig, spec)
    elif isinstance(spec, (str, Path)) and str(spec) in list_models():
        cfg = get_preset(str(spec))
    elif isinstance(spec, (str, Path)) and Path(spec).is_file():
        data = load_file(spec)
        cfg = from_dict(ModelConfig, data.get("model", data) if "model" in data and isinstance(data["model"], dict) else data)
    else:
        raise ConfigError(
            f"unknown model {str(spec)!r}: not a preset ({', '.join(list_models())}) and not a config file"
        )
    if overrides:
        return apply_overrides(cfg, _flatten_overrides(overrides))
    return validate(cfg)


def create_model(spec: str | Path | dict | ModelConfig, **overrides: Any) -> CLIP:
    """Build a randomly initialised model from a preset name, a config file, a dict or a config object.

    A directory made by :func:`mm.save_pretrained` loads that model (weights included). Overrides use
    dotted keys with ``__`` or nested dicts: ``create_model("tiny-clip", vision__patch_dropout=0.5)``.
    """
    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        from ..pretrained import load_pretrained

        if overrides:
            raise ConfigError("overrides cannot be applied when loading a saved model directory")
        return load_pretrained(spec)
    return CLIP(resolve_config(spec, **overrides))
