"""CLIP / CoCa composition: two towers, a learnable temperature (and bias, SigLIP), a captioning decoder
(CoCa), named outputs; ``create_model`` picks the class from the config (one-tower LIMoE: limoe.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig, apply_overrides, from_dict, load_file, validate
from ..layers import BlockCache, RouterStats, Transformer, text_valid_mask
from .decoder import CaptionDecoder
from .text import TextTower
from .vision import TowerOutput, VisionTower


@dataclass
class ModelOutput:
    """What ``model(images, tokens)`` returns; losses consume it (``loss(out)``)."""

    image_emb: torch.Tensor | None = None  # (B, embed_dim), L2-normalised
    text_emb: torch.Tensor | None = None  # (B, embed_dim), L2-normalised
    logit_scale: torch.Tensor | None = None  # the multiplier exp(log-scale), as open_clip returns it
    logit_bias: torch.Tensor | None = None  # SigLIP only
    # CoCa only, teacher forcing: caption_logits (N, vocab) at the N positions of the batch whose next token
    # is a real caption token (up to and including the end token), in row-major order; caption_labels (N,)
    # those next tokens. Padding is left out rather than masked (see CoCa.forward).
    caption_logits: torch.Tensor | None = None
    caption_labels: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE only: mean of the MoE layer calls' weighted aux losses
    # MoE only: per tower ("vision", "text", "decoder"; a one-tower model: per modality), per MoE layer in
    # order (the block indices are the model's ``moe_layers()``)
    router_stats: dict[str, list[RouterStats]] | None = None


def _mean_aux(stats: dict[str, list[RouterStats]]) -> torch.Tensor | None:
    flat = [s.aux_loss for layer in stats.values() for s in layer]
    return torch.stack(flat).mean() if flat else None


def moe_blocks(stack: Transformer) -> list[int]:
    """Indices of the MoE blocks of a stack, in the order of its router statistics."""
    return [i for i, blk in enumerate(stack.blocks) if blk.is_moe]


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # a one-tower model's towers only embed / pool / project, around its shared stack
        self.vision = VisionTower(cfg.vision, cfg.embed_dim, cfg.one_tower)
        self.text = TextTower(cfg.text, cfg.embed_dim, cfg.one_tower)
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

    def moe_layers(self) -> dict[str, list[int]]:
        """Block indices of the MoE layers behind each entry of ``ModelOutput.router_stats``."""
        return {"vision": moe_blocks(self.vision.transformer), "text": moe_blocks(self.text.transformer)}

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> ModelOutput:
        out, _, _, stats = self._towers(images, tokens)
        return self._finish(out, stats)

    def _towers(self, images, tokens) -> tuple[ModelOutput, TowerOutput | None, TowerOutput | None, dict]:
        out = ModelOutput(logit_scale=self.logit_scale.exp(), logit_bias=self.logit_bias)
        stats: dict[str, list[RouterStats]] = {}
        v = t = None
        if images is not None:
            v = self.vision(images)
            out.image_emb = F.normalize(v.emb, dim=-1)
            stats["vision"] = v.router_stats
        if tokens is not None:
            t = self.text(tokens)
            out.text_emb = F.normalize(t.emb, dim=-1)
            stats["text"] = t.router_stats
        return out, v, t, stats

    @staticmethod
    def _finish(out: ModelOutput, stats: dict[str, list[RouterStats]]) -> ModelOutput:
        if any(stats.values()):
            out.router_stats = stats
            out.aux_loss = _mean_aux(stats)
        return out


@dataclass
class DecodeCache:
    """Decoding state of a CoCa model: KV caches of the text tower and of the decoder (whose
    cross-attention entries hold the image tokens' keys/values)."""

    text: list[BlockCache] = field(default_factory=list)
    decoder: list[BlockCache] = field(default_factory=list)

    def _kvs(self):
        for c in self.text + self.decoder:
            yield from (kv for kv in (c.self_kv, c.cross_kv) if kv is not None)

    def reorder(self, index: torch.Tensor) -> None:
        """Rows ``index`` continue (beam search); cross-attention entries are per image and stay."""
        for c in self.text + self.decoder:
            c.reorder(index)

    def repeat_interleave(self, n: int) -> None:
        """Every row becomes ``n`` rows (the beams of one image)."""
        for kv in self._kvs():
            kv.repeat_interleave(n)


class CoCa(CLIP):
    """CLIP plus a captioning decoder (Yu et al. 2022): ``forward`` also returns next-token
    ``caption_logits`` and their ``caption_labels`` (teacher forcing on the image's tokens)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        v = cfg.vision
        # attentional pooling hands the decoder embed_dim-wide tokens, otherwise the ViT's own
        context_dim = cfg.embed_dim if v.pool == "attn" else v.transformer.width
        self.decoder = CaptionDecoder(cfg.decoder, context_dim, cfg.text.vocab_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.decoder.transformer.grad_checkpointing = enable

    def moe_layers(self) -> dict[str, list[int]]:
        return {**super().moe_layers(), "decoder": moe_blocks(self.decoder.transformer)}

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> ModelOutput:
        out, v, t, stats = self._towers(images, tokens)
        if v is not None and t is not None:
            valid = text_valid_mask(tokens, eot_id=self.config.text.eot_id, pad_id=self.config.text.pad_id)
            # Positions after the batch's longest caption only predict padding and, the decoder being
            # causal, change nothing before them: the decoder leaves them out, and the LM head also skips
            # every other position that predicts padding. With short captions in a long context this
            # removes most of the decoder's and LM head's work and most of the logits' memory.
            n = int(valid.sum(1).max().clamp_min(2))
            predicts_real = valid[:, 1:n]
            logits, stats["decoder"] = self.decoder(t.tokens[:, : n - 1], v.tokens, valid=valid[:, : n - 1],
                                                    select=predicts_real)
            out.caption_logits = logits
            out.caption_labels = tokens[:, 1:n][predicts_real]
        return self._finish(out, stats)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, context_dim): what the decoder cross-attends to."""
        return self.vision(images).tokens

    def new_decode_cache(self, max_len: int | None = None) -> DecodeCache:
        """Empty KV caches for generating up to ``max_len`` positions (default: the context length)."""
        max_len = max_len or self.config.text.context_length
        return DecodeCache(self.text.transformer.new_cache(max_len), self.decoder.transformer.new_cache(max_len))

    def next_token_logits(self, tokens: torch.Tensor, image_tokens: torch.Tensor | None,
                          cache: DecodeCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of the token after each of ``tokens`` (B, T), all positions real (no
        padding). With a ``cache``, ``tokens`` are the positions after those already cached and
        ``image_tokens`` are needed on the first call only."""
        feats = self.text.token_features(tokens, cache.text if cache is not None else None)
        logits, _ = self.decoder(feats, image_tokens, cache=cache.decoder if cache is not None else None)
        return logits


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


def model_class(cfg: ModelConfig) -> type[CLIP]:
    """LIMoE for a one-tower config, CoCa when the config has a captioning decoder, else CLIP."""
    if cfg.one_tower is not None:
        from .limoe import LIMoE  # limoe.py builds on this module

        return LIMoE
    return CoCa if cfg.decoder is not None else CLIP


def create_model(spec: str | Path | dict | ModelConfig, pretrained: str | Path | None = None,
                 **overrides: Any) -> CLIP:
    """Build a model from a preset name, a config file, a dict or a config object: randomly initialised,
    or with the weights of ``pretrained`` (an mm or open_clip ``.safetensors`` / ``.pt`` / ``.bin`` file;
    open_clip state dicts are converted exactly, pickles that would run code are refused).

    A directory made by :func:`mm.save_pretrained` loads that model (weights included). Overrides use
    dotted keys with ``__`` or nested dicts: ``create_model("tiny-clip", vision__patch_dropout=0.5)``.
    """
    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        from ..pretrained import load_pretrained

        if overrides or pretrained is not None:
            raise ConfigError("overrides and pretrained= cannot be applied when loading a saved model directory")
        return load_pretrained(spec)
    cfg = resolve_config(spec, **overrides)
    model = model_class(cfg)(cfg)
    if pretrained is not None:
        from ..pretrained import load_weights

        load_weights(model, pretrained)
    return model
