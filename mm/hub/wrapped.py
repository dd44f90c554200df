"""open_clip models mm does not build with its own blocks (ConvNeXt, ViTamin, FastViT / MobileCLIP, ResNet image
towers, Hugging Face text towers, EVA-02-E's post-norm blocks), run through open_clip itself behind mm's
model interface: ``encode_image`` / ``encode_text`` / ``forward`` -> :class:`~mm.models.ModelOutput`, and a
``config`` holding what mm's commands read (image size and preprocessing, context length and tokenizer,
embedding width). So ``mm zeroshot`` / ``embed`` / ``search`` / ``eval`` / ``probe`` and distillation (as a
teacher) work with every open_clip model; what needs mm's own blocks (training, fine-tuning, ``train.init_from``,
MoE, FSDP per block, export, int8 quantization) refuses such a model with :class:`WrappedModelError`, one line
naming the operation and the part mm does not build (:func:`refuse_wrapped`).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, validate
from ..models import ModelOutput, NotNative, TextConfig, VisionConfig
from .open_clip_configs import (
    from_open_clip_config,
    interface_config,
    registry_config,
)


@dataclass
class WrappedConfig:
    """An open_clip model run through open_clip: its open_clip config (to rebuild it) and the parts of an mm
    ModelConfig that mm's commands read. ``decoder`` / ``one_tower`` are always null (CoCa models are native)."""

    open_clip_config: dict[str, Any]  # open_clip's model config dict (registry JSON or a user's)
    name: str | None = None  # the open_clip model name, if from its registry
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(transformer=None))
    text: TextConfig = field(default_factory=lambda: TextConfig(transformer=None))

    @property
    def decoder(self) -> None:  # an mm ModelConfig's field: a wrapped model has no mm decoder
        return None

    @property
    def one_tower(self) -> None:
        return None

    def check(self) -> Iterator[tuple[str, str]]:
        if self.embed_dim < 1:
            yield "embed_dim", f"must be >= 1, got {self.embed_dim}"


def wrapped_config(cfg: dict[str, Any] | str, module: nn.Module | None = None) -> WrappedConfig:
    """The WrappedConfig of an open_clip model config (or registry name); with the open_clip ``module``, its
    preprocessing (what a pretrained tag set) is taken."""
    name = cfg if isinstance(cfg, str) else None
    cfg = registry_config(cfg) if isinstance(cfg, str) else copy.deepcopy(cfg)
    embed_dim, vision, text = interface_config(cfg)
    pre = getattr(getattr(module, "visual", None), "preprocess_cfg", None) or {}
    for key, attr in (("mean", "image_mean"), ("std", "image_std"), ("resize_mode", "resize_mode"),
                      ("interpolation", "interpolation")):
        if pre.get(key) is not None:
            setattr(vision, attr, tuple(pre[key]) if key in ("mean", "std") else pre[key])
    return validate(WrappedConfig(open_clip_config=cfg, name=name, embed_dim=embed_dim, vision=vision, text=text))


def build_open_clip(cfg: dict[str, Any]) -> nn.Module:
    """open_clip's model for a config dict (random weights), as ``open_clip.create_model`` builds it."""
    import open_clip

    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    if "multimodal_cfg" in cfg:
        return open_clip.CoCa(**kwargs)
    return (open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP)(**kwargs)


class OpenClipModel(nn.Module):
    """An open_clip model (``self.model``) with mm's model interface. Its state dict is open_clip's (under
    ``model.``); ``mm.save_pretrained`` writes it with its open_clip config, so the directory loads again."""

    def __init__(self, model: nn.Module, config: WrappedConfig):
        super().__init__()
        self.model, self.config = model, config

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return getattr(self.model, "logit_bias", None)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> ModelOutput:
        out = ModelOutput(logit_scale=self.model.logit_scale.exp(), logit_bias=self.logit_bias)
        if images is not None:
            out.image_emb = F.normalize(self.encode_image(images), dim=-1)
        if tokens is not None:
            out.text_emb = F.normalize(self.encode_text(tokens), dim=-1)
        return out

    def moe_layers(self) -> dict[str, list[int]]:
        return {}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def wrap_open_clip(model: nn.Module, cfg: dict[str, Any] | str) -> OpenClipModel:
    """An open_clip model (built by ``open_clip.create_model`` or :func:`build_open_clip`) behind mm's interface;
    ``cfg``: its open_clip config dict or registry name."""
    return OpenClipModel(model, wrapped_config(cfg, model))


def is_wrapped(model: Any) -> bool:
    return isinstance(model, OpenClipModel)


class WrappedModelError(ValueError):
    """What needs mm's own blocks (training, fine-tuning, export, int8, FSDP, ``train.init_from``) was given an
    open_clip model mm runs through open_clip. The message is one line naming the operation and what mm does not
    build of the model."""


USES = "mm runs such models for zeroshot, embed, search, eval, probe and as a distill.teacher"


def not_native_reason(cfg: WrappedConfig) -> str:
    """Why mm runs a model through open_clip: the part of its open_clip config mm does not build with its own
    blocks (:class:`NotNative`'s message, e.g. "RN50: vision_cfg: a ResNet image tower ...")."""
    label = cfg.name or "the open_clip config"
    try:
        from_open_clip_config(cfg.open_clip_config, cfg.name)
    except NotNative as e:
        return str(e)
    except ConfigError as e:  # a config open_clip builds and mm cannot even read
        return f"{label}: {e}"
    return f"{label}: saved as an open_clip model (mm can now build it: convert it again to train it)"


def native_only(what: str, reason: str) -> str:
    """The one-line refusal of ``what`` for a model mm runs through open_clip, ``reason`` saying why."""
    return f"{what} needs a model built with mm's own blocks, and mm runs this one through open_clip ({reason}); {USES}"


def refuse_wrapped(model: Any, what: str, error: type[Exception] = WrappedModelError) -> None:
    """Raise ``error`` (default :class:`WrappedModelError`) naming ``what`` and the part of the model mm does not
    build, for a model run through open_clip; nothing for an mm model."""
    if is_wrapped(model):
        raise error(native_only(what, not_native_reason(model.config)))
