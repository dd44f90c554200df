"""One-tower LIMoE (Mustafa et al. 2022): one Transformer, with MoE FFNs, encodes images and text.

Each modality is embedded as its two-tower counterpart embeds it (``VisionTower.embed``: patches +
positions; ``TextTower.embed``: tokens + positions) plus a learned modality embedding, encoded by the
shared stack (``ModelConfig.one_tower``), then pooled and projected by its tower's ``head``; the
contrastive loss takes the two embeddings as from any CLIP.

Routing. LIMoE routes the tokens of both modalities together: each MoE layer sees one batch of image and
text tokens, with one expert capacity and one load-balancing loss over it. That is why a minority
modality (text: few tokens per sample) can collapse onto a few experts unless its own entropy losses hold
it, and why modality-specific experts can emerge. Here images and texts are stacked along the batch
dimension (the shorter sequences padded) and run as ONE call of the shared stack: attention stays within
each sequence (key padding hides the padding), and every MoE layer routes all real tokens of both
modalities in one call, given each token's modality through ``MoE.forward``'s group mask, so statistics
and entropy losses are per modality. A causal text cannot share that call (the stack takes one causal
flag per call), so with ``text.causal: true`` texts run in a second call through the same weights and
are routed on their own. Single-modality calls (``encode_image``, ``encode_text``) route that modality
alone, as LIMoE does at inference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RouterStats, Transformer
from .clip import ImageTextModel, moe_blocks
from .config import ModelConfig
from .text import TextEmbedHead
from .vision import VisionEmbedHead

MODALITIES = ("vision", "text")


@dataclass
class _Part:
    """One modality's input to the shared stack."""

    x: torch.Tensor  # (B, T, width)
    real: torch.Tensor | None  # (B, T) real tokens; None: all of them
    causal: bool


class LIMoE(ImageTextModel):
    """One Transformer (``self.transformer``) shared by both modalities, between each modality's embedding
    and head (``vision`` / ``text``: :class:`VisionEmbedHead`, :class:`TextEmbedHead`, with the same
    parameter names as a two-tower model's towers) and a learned modality embedding. ``router_stats`` of
    the output are per modality."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.vision = VisionEmbedHead(cfg.vision, cfg.embed_dim, cfg.one_tower)
        self.text = TextEmbedHead(cfg.text, cfg.embed_dim, cfg.one_tower)
        self.transformer = Transformer(cfg.one_tower)
        # added to every token entering the shared stack: tells its attention and routers the modality
        self.modality_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(cfg.one_tower.width) * 0.02) for m in MODALITIES})

    def stacks(self) -> dict[str, Transformer]:
        return {"transformer": self.transformer}

    def moe_layers(self) -> dict[str, list[int]]:
        """Router statistics are per modality, over the one stack's MoE blocks."""
        blocks = moe_blocks(self.transformer)
        return {m: blocks for m in MODALITIES}

    def _encode(self, images: torch.Tensor | None, tokens: torch.Tensor | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, list[RouterStats]], torch.Tensor | None]:
        """Projected (unnormalised) embeddings and router statistics per modality, and the mean of every MoE
        layer call's weighted aux loss."""
        parts: dict[str, _Part] = {}
        if images is not None:
            x, _ = self.vision.embed(images)  # kept positions matter only to RoPE, which one-tower lacks
            parts["vision"] = _Part(x + self.modality_embed["vision"].to(x.dtype), None, False)
        if tokens is not None:
            x, valid = self.text.embed(tokens)
            parts["text"] = _Part(x + self.modality_embed["text"].to(x.dtype), valid, self.config.text.causal)
        feats: dict[str, torch.Tensor] = {}
        stats: dict[str, list[RouterStats]] = {m: [] for m in parts}
        aux: list[torch.Tensor] = []
        for causal in sorted({p.causal for p in parts.values()}):  # modalities that attend alike share a call
            names = [m for m, p in parts.items() if p.causal == causal]
            outs, layer_stats = self._run([parts[m] for m in names], causal)
            feats.update(zip(names, outs))
            for s in layer_stats:
                aux.append(s.aux_loss)
                for m, group in zip(names, s.groups):
                    stats[m].append(group)
        embs = {}
        if "vision" in feats:
            embs["vision"] = self.vision.head(feats["vision"])[0]
        if "text" in feats:
            embs["text"] = self.text.head(feats["text"], tokens, parts["text"].real)[0]
        return embs, stats, torch.stack(aux).mean() if aux else None

    def _run(self, parts: list[_Part], causal: bool) -> tuple[list[torch.Tensor], list[RouterStats]]:
        """One call of the shared stack over ``parts`` stacked along the batch, padded to the longest. The
        MoE layers get a (N, T, len(parts)) group mask: token (n, t) belongs to part j, or is padding."""
        t = max(p.x.shape[1] for p in parts)
        xs, groups = [], []
        for j, p in enumerate(parts):
            b, tp = p.x.shape[:2]
            real = p.real if p.real is not None else torch.ones(b, tp, dtype=torch.bool, device=p.x.device)
            g = torch.zeros(b, t, len(parts), dtype=torch.bool, device=p.x.device)
            g[:, :tp, j] = real
            xs.append(F.pad(p.x, (0, 0, 0, t - tp)))
            groups.append(g)
        x, group = torch.cat(xs), torch.cat(groups)
        # Rows with padding (a bidirectional text's tail, a shorter modality) need a key padding mask. A
        # causal call holds only texts, whose padding follows the end token: no mask, SDPA's causal kernel.
        padded = not causal and any(p.real is not None or p.x.shape[1] < t for p in parts)
        y, stats = self.transformer(x, causal=causal, key_padding_mask=group.any(-1) if padded else None,
                                    valid=group)
        outs, start = [], 0
        for p in parts:
            outs.append(y[start : start + p.x.shape[0], : p.x.shape[1]])
            start += p.x.shape[0]
        return outs, stats
