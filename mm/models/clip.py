"""The models' composition: a learnable temperature (and bias, SigLIP), normalised embeddings and named
outputs around towers. ``ImageTextModel`` is what every mm model is; ``CLIP`` has an image and a text tower,
``CoCa`` adds a captioning decoder, and the one-tower ``LIMoE`` (limoe.py) runs one shared stack instead."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import BlockCache, RouterStats, Transformer, text_valid_mask
from .config import ModelConfig
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
    # the image tower's outputs of the extra views forward(views=...) was given, by name (an objective's local
    # crops or masked images, run in the same forward so that DDP sees one forward per backward)
    views: dict[str, TowerOutput] | None = None


@dataclass
class ImageView:
    """Extra images for the image tower in the same forward: ``images`` (B', 3, H, W), optionally a patch ``mask``
    (B', N) with the ``mask_token`` that replaces the masked patches (:meth:`VisionTower.embed`)."""

    images: torch.Tensor
    mask: torch.Tensor | None = None
    mask_token: torch.Tensor | None = None


def _mean_aux(stats: dict[str, list[RouterStats]]) -> torch.Tensor | None:
    flat = [s.aux_loss for layer in stats.values() for s in layer]
    return torch.stack(flat).mean() if flat else None


def _embeddings(v: TowerOutput | None, t: TowerOutput | None) -> dict[str, torch.Tensor]:
    return {name: o.emb for name, o in (("vision", v), ("text", t)) if o is not None}


def moe_blocks(stack: Transformer) -> list[int]:
    """Indices of the MoE blocks of a stack, in the order of its router statistics."""
    return [i for i, blk in enumerate(stack.blocks) if blk.is_moe]


class ImageTextModel(nn.Module):
    """What every mm model offers: ``encode_image`` / ``encode_text`` (projected embeddings, optionally
    L2-normalised) and ``forward(images, tokens)`` -> :class:`ModelOutput`, around a learnable
    ``logit_scale`` (and ``logit_bias``, SigLIP). A model says how it embeds (``_encode``) and which
    Transformer stacks it has (``stacks``); gradient checkpointing and MoE bookkeeping follow from those."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))

    def stacks(self) -> dict[str, Transformer]:
        """The model's Transformer stacks by name."""
        raise NotImplementedError

    def moe_layers(self) -> dict[str, list[int]]:
        """Block indices of the MoE layers behind each entry of ``ModelOutput.router_stats``."""
        return {name: moe_blocks(stack) for name, stack in self.stacks().items()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them (every stack)."""
        for stack in self.stacks().values():
            stack.grad_checkpointing = enable

    def _encode(self, images: torch.Tensor | None, tokens: torch.Tensor | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, list[RouterStats]], torch.Tensor | None]:
        """Projected, unnormalised embeddings by modality ("vision", "text"), router statistics by tower or
        modality, and the mean weighted MoE aux loss (None without MoE layers)."""
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = self._encode(images, None)[0]["vision"]
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = self._encode(None, tokens)[0]["text"]
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None, *,
                views: dict[str, ImageView] | None = None) -> ModelOutput:
        out = self.embed(images, tokens)
        out.views = self.image_views(views)
        return out

    def image_views(self, views: dict[str, ImageView] | None) -> dict[str, TowerOutput] | None:
        """The image tower's output for each extra view (None without views)."""
        if not views:
            return None
        tower = getattr(self, "vision", None)
        if not isinstance(tower, VisionTower):
            raise TypeError(f"{type(self).__name__} has no image tower of its own to run extra views through")
        return {name: tower(v.images, v.mask, v.mask_token) for name, v in views.items()}

    def embed(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> ModelOutput:
        """The towers' outputs alone (normalised embeddings, logit scale / bias, MoE statistics): what a
        contrastive loss needs, without any decoder a subclass runs in ``forward``."""
        return self._output(*self._encode(images, tokens))

    def _output(self, embs: dict[str, torch.Tensor], stats: dict[str, list[RouterStats]],
                aux: torch.Tensor | None) -> ModelOutput:
        out = ModelOutput(logit_scale=self.logit_scale.exp(), logit_bias=self.logit_bias)
        if "vision" in embs:
            out.image_emb = F.normalize(embs["vision"], dim=-1)
        if "text" in embs:
            out.text_emb = F.normalize(embs["text"], dim=-1)
        if aux is not None:
            out.router_stats, out.aux_loss = stats, aux
        return out


class CLIP(ImageTextModel):
    """An image tower and a text tower, each with its own stack (Radford et al. 2021; SigLIP with a logit
    bias)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.vision = VisionTower(cfg.vision, cfg.embed_dim)
        self.text = TextTower(cfg.text, cfg.embed_dim)

    def stacks(self) -> dict[str, Transformer]:
        return {"vision": self.vision.transformer, "text": self.text.transformer}

    def _towers(self, images: torch.Tensor | None, tokens: torch.Tensor | None
                ) -> tuple[TowerOutput | None, TowerOutput | None, dict[str, list[RouterStats]]]:
        v = self.vision(images) if images is not None else None
        t = self.text(tokens) if tokens is not None else None
        stats = {name: o.router_stats for name, o in (("vision", v), ("text", t)) if o is not None}
        return v, t, stats

    def _encode(self, images, tokens):
        v, t, stats = self._towers(images, tokens)
        return _embeddings(v, t), stats, _mean_aux(stats)


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

    def stacks(self) -> dict[str, Transformer]:
        return {**super().stacks(), "decoder": self.decoder.transformer}

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                caption_rows: int | None = None, *, decoder_tokens: torch.Tensor | None = None,
                decoder_targets: torch.Tensor | None = None,
                views: dict[str, ImageView] | None = None) -> ModelOutput:
        """``caption_rows``: teacher-force the decoder on the first rows of the batch only (all by default;
        ``train.caption_fraction``; 0: not at all): the embeddings cover every row, the caption logits and labels
        those rows.

        ``decoder_tokens`` (B, T) with ``decoder_targets`` (B, T) bool: the decoder reads these sequences instead of
        the captions (LocCa's prompted tasks, mm/data/locca.py), through a second pass of the text tower, and is
        trained only on the tokens marked as targets (not on a prompt); ``caption_rows`` applies to them alike."""
        v, t, stats = self._towers(images, tokens)
        logits = labels = None
        rows = 0
        if v is not None and t is not None:
            rows = tokens.shape[0] if caption_rows is None else caption_rows
            if not 0 <= rows <= tokens.shape[0]:
                raise ValueError(f"caption_rows must be in [0, {tokens.shape[0]}] (the batch), got {caption_rows}")
        if rows:
            if decoder_tokens is None:
                seqs, feats, targets = tokens[:rows], t.tokens[:rows], None
            else:
                if decoder_targets is None or decoder_targets.shape != decoder_tokens.shape:
                    raise ValueError("decoder_tokens need decoder_targets of the same shape")
                seqs, targets = decoder_tokens[:rows], decoder_targets[:rows]
                feats = self.text(seqs).tokens  # (an MoE text tower's routing of this pass is not logged)
            context_valid = v.valid[:rows] if v.valid is not None else None
            logits, labels, stats["decoder"] = self._teacher_forced(seqs, feats, v.tokens[:rows], targets,
                                                                    context_valid)
        out = self._output(_embeddings(v, t), stats, _mean_aux(stats))
        out.caption_logits, out.caption_labels = logits, labels
        out.views = self.image_views(views)
        return out

    def _teacher_forced(self, seqs: torch.Tensor, feats: torch.Tensor, image_tokens: torch.Tensor,
                        targets: torch.Tensor | None, context_valid: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, list[RouterStats]]:
        """The decoder over ``seqs``' text features: packed logits and labels at the positions whose next token is
        real (and, with ``targets``, a target)."""
        valid = text_valid_mask(seqs, eot_id=self.config.text.eot_id, pad_id=self.config.text.pad_id)
        # Positions after the batch's longest caption only predict padding and, the decoder being
        # causal, change nothing before them: the decoder leaves them out, and the LM head also skips
        # every other position that predicts padding. With short captions in a long context this
        # removes most of the decoder's and LM head's work and most of the logits' memory.
        n = int(valid.sum(1).max().clamp_min(2))
        predicts = valid[:, 1:n] if targets is None else valid[:, 1:n] & targets[:, 1:n]
        logits, stats = self.decoder(feats[:, : n - 1], image_tokens, valid=valid[:, : n - 1], select=predicts,
                                     context_valid=context_valid)
        return logits, seqs[:, 1:n][predicts], stats

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, context_dim): what the decoder cross-attends to."""
        out = self.vision(images)
        if out.valid is not None:  # generation's cross-attention caches keys without a padding mask
            raise ValueError("captioning a padded NaFlex batch needs attentional pooling (vision.pool: attn); "
                             "caption these images one at a time")
        return out.tokens

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
