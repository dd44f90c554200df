"""ViT image tower: patchify -> (+ class token, positions) -> Transformer -> norm -> pool -> project."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (
    AttentionalPool,
    LatentAttentionPool,
    RotaryEmbedding2D,
    RouterStats,
    Transformer,
    TransformerConfig,
    sincos_1d,
    sincos_2d,
)
from .config import VisionConfig
from .patches import Patches


def _not_compiled(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)`` where it matters, under torch.compile, and made there rather than at import:
    disabling imports torch._dynamo (~1.5 s a process), which eager use never needs and every CLI call and
    DataLoader worker would pay. Dynamo traces this wrapper (``is_compiling`` is true there) and meets the disabled
    function: a graph break."""
    disabled: Callable | None = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call


@dataclass
class TowerOutput:
    emb: torch.Tensor  # (B, embed_dim) projected, not normalised
    tokens: torch.Tensor  # (B, T, D) per-token features after the final norm (for captioning / dense use)
    router_stats: list[RouterStats] = field(default_factory=list)
    valid: torch.Tensor | None = None  # (B, T) bool: NaFlex input's real patches among ``tokens`` (None: all real)


class ConvStem(nn.Sequential):
    """A convolutional stem in place of the patchify (after Xiao et al. 2021, "Early convolutions help transformers
    see better"): a 3x3 convolution at full resolution with ``width`` channels, then log2(patch) 3x3 stride-2
    convolutions doubling them, the last one mapping to the stack's width; each but the last is followed by
    GroupNorm (8 groups: per image, unlike the paper's BatchNorm, so that no image's features depend on its batch:
    gradient caching, evaluation and one-image requests give the same numbers) and GELU.
    (B, 3, H, W) -> (B, out_width, H / patch, W / patch), the patchify's grid.

    Why: a patchify is a linear map of each patch's pixels, so a small object is seen through the partial views of
    whichever patches it straddles, at every offset inside them, and the stack must learn each; 3x3 filters shared
    across positions learn local form once, and the full-resolution stage keeps 1-2 pixel detail (a small star's
    points at 32 px) before any downsampling. Supervised shape classification of the built-in shapes (32 px, patch
    8, the same ViT, 300 steps of 128): 57% with the patchify, 87% with stride-2 convolutions only, 95% with this
    stem (small shapes 89%), for ~15% more time per step (docs/concepts.md, "What the demo model needed").
    """

    def __init__(self, patch_size: int, out_width: int, width: int = 16):
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1), nn.GroupNorm(min(8, width), width), nn.GELU()]
        c = width
        for _ in range(patch_size.bit_length() - 2):  # log2(patch) - 1 stride-2 stages keep a norm and activation
            layers += [nn.Conv2d(c, 2 * c, 3, 2, 1), nn.GroupNorm(min(8, 2 * c), 2 * c), nn.GELU()]
            c *= 2
        layers.append(nn.Conv2d(c, out_width, 3, 2, 1))
        super().__init__(*layers)


class _VisionParts(nn.Module):
    """What every image tower has around a Transformer stack: ``embed`` (patchify, class token, positions,
    patch dropout, ln_pre) and ``head`` (final norm, pooling, projection); ``stack`` gives the widths."""

    def _init_embed(self, cfg: VisionConfig, stack: TransformerConfig) -> None:
        self.cfg = cfg
        w = stack.width
        scale = w**-0.5
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.patch_size, w, cfg.stem_width)
        else:  # ViT's patchify: one linear map per non-overlapping patch
            self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.prefix = 1 if cfg.class_token else 0
        self.cls_token = nn.Parameter(scale * torch.randn(w)) if cfg.class_token else None
        n_pos = cfg.grid**2 + self.prefix
        self.rope = None
        if cfg.rope is not None:  # axial RoPE on top of the learned or fixed positions (timm's Eva towers)
            r = cfg.rope
            self.rope = RotaryEmbedding2D(stack.head_dim, cfg.grid, self.prefix, axial=dict(
                temperature=r.temperature, ref_grid=r.ref_grid, offset=r.offset, column_first=r.order == "xy"))
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(scale * torch.randn(n_pos, w))
        elif cfg.pos_embed == "sincos2d":  # fixed: a buffer derived from the config, not saved
            self.register_buffer("pos_embed", sincos_2d(w, cfg.grid, self.prefix), persistent=False)
        else:  # rope2d: positions enter inside attention, nothing is added to the tokens
            self.pos_embed = None
            self.rope = RotaryEmbedding2D(stack.head_dim, cfg.grid, self.prefix)
        self.norm_pre = nn.LayerNorm(w, eps=stack.norm_eps) if cfg.norm_pre else nn.Identity()

    def _init_head(self, cfg: VisionConfig, embed_dim: int, stack: TransformerConfig) -> None:
        w = stack.width
        if cfg.pool == "attn":
            self.attn_pool = AttentionalPool(embed_dim, w, cfg.attn_pool_heads, cfg.attn_pool_queries, stack.norm_eps)
            pool_dim = embed_dim
        elif cfg.pool == "map":
            hidden = int(w * (cfg.attn_pool_mlp_ratio or stack.mlp_ratio))
            self.attn_pool = LatentAttentionPool(w, cfg.attn_pool_heads, hidden, stack.act, stack.norm_eps)
            pool_dim = w
        else:
            self.attn_pool = None
            pool_dim = w
        self.norm = nn.LayerNorm(pool_dim, eps=stack.norm_eps)
        if cfg.proj == "linear":
            self.proj = nn.Linear(pool_dim, embed_dim, bias=cfg.proj_bias)
            nn.init.normal_(self.proj.weight, std=pool_dim**-0.5)
            if cfg.proj_bias:
                nn.init.zeros_(self.proj.bias)
        else:  # the pooled features are the embedding (their width is embed_dim)
            self.proj = nn.Identity()

    def _patch_dropout(self, x: torch.Tensor, valid: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FLIP (Li et al. 2023): keep a random subset of patch tokens per image; prefix tokens stay.
        Returns the tokens and the kept positions (B, T') including the prefix, for RoPE. ``valid`` (B, T) (NaFlex
        padding): real patches are kept before padding, so an image keeps min(its patches, the share) real ones."""
        p = self.cfg.patch_dropout
        if not self.training or p == 0.0:
            return x, None
        b, n = x.shape[0], x.shape[1] - self.prefix
        n_keep = max(1, int(n * (1 - p)))
        score = torch.rand(b, n, device=x.device)
        if valid is not None:
            score = score + valid[:, self.prefix :].to(score.dtype)  # real patches (1 + u) outrank padding (u)
        keep = score.topk(n_keep, dim=1).indices + self.prefix  # (B, n_keep)
        if self.prefix:
            keep = torch.cat([torch.arange(self.prefix, device=x.device).expand(b, -1), keep], dim=1)
        return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])), keep

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) -> the stack's input tokens (B, T, width) and, in training with patch dropout,
        the kept positions (for RoPE). ``mask`` (B, N) bool over the patch grid (row-major): those patches'
        embeddings are replaced by ``mask_token`` (width,) before positions are added (masked image modelling:
        BEiT / iBOT / TIPS)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, W)
        if mask is not None:
            if mask_token is None or mask.shape != x.shape[:2]:
                raise ValueError(f"a patch mask needs a mask_token and the shape (batch, patches) = "
                                 f"{tuple(x.shape[:2])}, got {None if mask is None else tuple(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        x, keep = self._patch_dropout(x)
        return self.norm_pre(x), keep

    def embed_patches(self, p: Patches, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """NaFlex input (mm/models/patches.py) -> the stack's input tokens (B, prefix + N, width), their validity
        (B, prefix + N) (None when no position is padding) and the RoPE tables (None without RoPE).

        The same weights as :meth:`embed`: the patchify's convolution applied as a linear map over channels-last
        patches, the learned position table resized to each image's grid (``vision.pos_interpolation``, antialiased,
        corners not aligned: timm's ``NaFlexEmbeds`` (bicubic) and Hugging Face's Siglip2 (bilinear)); a fixed table
        (sin-cos) or RoPE is computed at each patch's coordinates. A square batch gives :meth:`embed`'s tokens."""
        cfg = self.cfg
        problem = naflex_problem(cfg)
        if problem:
            raise ValueError(f"this image tower takes square images only: {problem}")
        w = self.patch_embed.weight  # (width, 3, p, p) -> (width, p*p*3), channels last like the patches
        x = F.linear(p.pixels.to(w.dtype), w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.patch_embed.bias)
        if mask is not None:
            if mask_token is None or mask.shape != x.shape[:2]:
                raise ValueError(f"a patch mask needs a mask_token and the shape (batch, patches) = "
                                 f"{tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        if cfg.pos_embed == "learned":
            x = x + self._resized_positions(p.shapes, x.shape[1]).to(x.dtype)
        elif cfg.pos_embed == "sincos2d":
            half = x.shape[-1] // 2
            rows, cols = p.coords[..., 0].reshape(-1), p.coords[..., 1].reshape(-1)
            table = torch.cat([sincos_1d(half, cols), sincos_1d(half, rows)], dim=1)
            x = x + table.view(*x.shape).to(x.dtype)
        valid = p.valid if p.padded else None
        if self.cls_token is not None:
            cls = self.cls_token.to(x.dtype)
            if cfg.pos_embed == "learned":
                cls = cls + self.pos_embed[0].to(x.dtype)
            x = torch.cat([cls.expand(x.shape[0], 1, -1), x], dim=1)
            if valid is not None:
                valid = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)
        rope = self.rope.at(p.coords) if self.rope is not None else None
        x, keep = self._patch_dropout(x, valid)
        if keep is not None:  # the kept tokens' validity and rotations
            valid = valid.gather(1, keep) if valid is not None else None
            if rope is not None:
                idx = keep[:, None, :, None].expand(-1, 1, -1, rope[0].shape[-1])
                rope = (rope[0].gather(2, idx), rope[1].gather(2, idx))
        return self.norm_pre(x), valid, rope

    @_not_compiled  # a loop over the batch's grids: compiled, every new set of grids would recompile
    def _resized_positions(self, shapes: torch.Tensor, length: int) -> torch.Tensor:
        """The learned table's patch rows resized to each image's grid: (B, length, width), zeros at padding."""
        g, width = self.cfg.grid, self.pos_embed.shape[-1]
        table = self.pos_embed[self.prefix :].reshape(g, g, width)
        out = table.new_zeros(len(shapes), length, width)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(shapes.tolist()):
            groups.setdefault((h, w), []).append(i)
        for (h, w), rows in groups.items():
            if (h, w) == (g, g):
                t = table.reshape(g * g, width)
            else:  # in fp32: CPU interpolation has no antialiased half precision
                t = F.interpolate(table.permute(2, 0, 1)[None].float(), size=(h, w), mode=self.cfg.pos_interpolation,
                                  align_corners=False, antialias=True)[0].permute(1, 2, 0).reshape(h * w, width)
            idx = torch.tensor(rows, device=out.device)
            out[idx, : h * w] = t.to(out.dtype).expand(len(rows), -1, -1)
        return out

    def head(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stack's output (B, T, width) -> projected embedding (B, embed_dim) and normed tokens. ``valid``
        (B, T) bool, prefix included: NaFlex input's real tokens (pooling leaves padding out); None: all real."""
        keys = valid if valid is not None else None
        if self.cfg.pool == "attn":
            # open_clip's CoCa layout (kept for weight compatibility): the first pooled query is the
            # contrastive embedding, the other queries are the decoder's image tokens.
            x = self.norm(self.attn_pool(x, keys))
            pooled, tokens = x[:, 0], x[:, 1:]
        elif self.cfg.pool == "map":  # timm: the final norm, then the learned query attends to every token
            x = self.norm(x)
            pooled, tokens = self.attn_pool(x, keys), x[:, self.prefix :]
        elif self.cfg.final_ln_after_pool:  # open_clip's CLIPA: pool, then norm (the tokens stay un-normed)
            tokens = x[:, self.prefix :]
            pooled = self.norm(x[:, 0] if self.cfg.pool == "cls" else _mean(tokens, valid, self.prefix))
        else:
            x = self.norm(x)
            tokens = x[:, self.prefix :]
            pooled = x[:, 0] if self.cfg.pool == "cls" else _mean(tokens, valid, self.prefix)
        return self.proj(pooled), tokens

def naflex_problem(cfg: VisionConfig) -> str | None:
    """Why an image tower of this config cannot take NaFlex patch sequences (None: it can)."""
    if cfg.stem != "patch":
        return "its convolutional stem (vision.stem: conv) convolves whole images; NaFlex needs the patchify"
    if cfg.rope is not None:
        return "its axial RoPE (vision.rope) scales positions to one fixed grid"
    return None


class VisionEmbedHead(_VisionParts):
    """An image tower without a stack of its own (``transformer`` is None): a one-tower model (LIMoE,
    mm/models/limoe.py) runs its one shared stack, ``stack``, between ``embed`` and ``head``."""

    transformer = None

    def __init__(self, cfg: VisionConfig, embed_dim: int, stack: TransformerConfig):
        super().__init__()
        self._init_embed(cfg, stack)
        self._init_head(cfg, embed_dim, stack)


class VisionTower(_VisionParts):
    """The image tower of a two-tower model: ``embed`` -> its own ``Transformer`` -> ``head``."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        # registered in this order (embedding, stack, head): parameters, and so the optimizer state of
        # training checkpoints, are listed in it
        self._init_embed(cfg, cfg.transformer)
        self.transformer = Transformer(cfg.transformer)
        self._init_head(cfg, embed_dim, cfg.transformer)

    def forward(self, images: torch.Tensor | Patches, mask: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None) -> TowerOutput:
        """images: (B, 3, H, W) normalised pixels at ``cfg.image_size``, or NaFlex :class:`Patches` (each image at
        its own grid; attention and pooling see only its own patches); ``mask`` / ``mask_token``: patches
        replaced by a learned token (:meth:`embed`)."""
        if isinstance(images, Patches):
            x, valid, rope = self.embed_patches(images, mask, mask_token)
            x, stats = self.transformer(x, rope=rope, key_padding_mask=valid)
            emb, tokens = self.head(x, valid)
            # attentional pooling's tokens are its queries' outputs: all real
            real = None if valid is None or self.cfg.pool == "attn" else valid[:, self.prefix :]
            return TowerOutput(emb, tokens, stats, real)
        x, keep = self.embed(images, mask, mask_token)
        rope = self.rope(keep) if self.rope is not None else None
        x, stats = self.transformer(x, rope=rope)
        emb, tokens = self.head(x)
        return TowerOutput(emb, tokens, stats)


def _mean(tokens: torch.Tensor, valid: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """Mean over the patch tokens (B, N, D); with ``valid`` (B, prefix + N), over each image's real ones."""
    if valid is None:
        return tokens.mean(1)
    w = valid[:, prefix:].to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1)
