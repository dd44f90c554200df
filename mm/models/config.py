"""Model configs: the image tower, the text tower, CoCa's captioning decoder and the model that holds them.
Each tower names its own Transformer stack (``mm.layers.config.TransformerConfig``), or, in a one-tower
model, none: both then share ``ModelConfig.one_tower``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..layers.config import TransformerConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


RESIZE_MODES = ("shortest", "longest", "squash")
TEXT_POOLS = ("eot", "first", "last", "mean", "argmax", "eos", "end")
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass
class AxialRopeConfig:
    """timm's axial 2-D rotary position embedding (EVA02, the Perception Encoder): applied to the patch tokens'
    queries and keys inside attention, on top of ``pos_embed``. Each head has head_dim/4 frequencies
    temperature^(-j / (head_dim/4)) per image axis (``mm.layers.position.axial_rope_angles``)."""

    temperature: float = 10000.0
    # positions are rescaled so the patch grid spans ref_grid patches (the pretraining grid: EVA's rule for
    # running at another resolution); null = patch indices as they are
    ref_grid: int | None = None
    offset: float = 0.0  # added to each patch index before rescaling (the Perception Encoder: 1)
    order: str = "xy"  # xy: the first frequencies rotate with the column (timm's grid_indexing xy, PE) | ij: row

    def check(self) -> Iterator[tuple[str, str]]:
        if self.order not in ("xy", "ij"):
            yield "order", f"must be xy or ij, got {self.order!r}"
        if self.ref_grid is not None and self.ref_grid < 1:
            yield "ref_grid", f"must be >= 1 or null, got {self.ref_grid}"
        if self.temperature <= 0:
            yield "temperature", f"must be > 0, got {self.temperature}"


@dataclass
class VisionConfig:
    image_size: int = 224  # input side in pixels (square)
    patch_size: int = 32  # patch side; image_size must be a multiple (unless patch_remainder)
    # the tower's own stack; null in a one-tower model, whose stack (ModelConfig.one_tower) it shares
    transformer: TransformerConfig | None = field(default_factory=lambda: TransformerConfig(768, 12, 12))
    pos_embed: str = "learned"  # learned | sincos2d | rope2d
    # timm's axial RoPE inside attention, with a learned pos_embed (EVA02, the Perception Encoder); null = none
    rope: AxialRopeConfig | None = None
    class_token: bool = True  # prepend a learned class token
    # cls | mean | attn (attentional pooling, CoCa) | map (one learned query + MLP: SigLIP's and PE's head)
    pool: str = "cls"
    attn_pool_queries: int = 256  # attn pool: tokens handed to a captioning decoder
    attn_pool_heads: int = 8  # attn / map pool: heads of the pooler
    attn_pool_mlp_ratio: float | None = None  # map pool: its MLP's hidden width / width; null = the stack's mlp_ratio
    norm_pre: bool = True  # LayerNorm before the stack (CLIP's ln_pre)
    # allow an image_size that is not a multiple of patch_size: the last rows and columns that do not fill a patch
    # are dropped, as timm's patch embedding drops them (open_clip's ViT-SO400M-14-SigLIP-384: 384 px, 27 patches)
    patch_remainder: bool = False
    final_ln_after_pool: bool = False  # the final LayerNorm after pooling (open_clip's CLIPA) instead of before
    patch_bias: bool = False  # bias on the patch embedding (timm ViTs without a pre-norm: SigLIP)
    # patch | conv: the patch embedding is ViT's linear patchify, or a convolutional stem (a full-resolution 3x3
    # convolution, then log2(patch_size) 3x3 stride-2 ones, GroupNorm and GELU between: mm/models/vision.py
    # ConvStem): learns small objects' form in fewer steps; mm's own (open_clip and Hugging Face have no such
    # ViT: such a model does not convert to them)
    stem: str = "patch"
    stem_width: int = 16  # conv stem: channels of its first convolution, doubled at each stride-2 one
    proj: str = "linear"  # linear | none (the pooled features are the embedding: SigLIP's map head)
    proj_bias: bool = False  # bias on the output projection (timm heads)
    patch_dropout: float = 0.0  # FLIP: fraction of patch tokens dropped in training
    image_mean: tuple[float, float, float] = OPENAI_MEAN  # per-channel normalisation (OpenAI CLIP's)
    image_std: tuple[float, float, float] = OPENAI_STD  # per-channel standard deviation
    # evaluation resize (open_clip's resize_mode): shortest (shortest side to image_size, then center crop) |
    # longest (longest side to image_size, then pad to a square) | squash (both sides to image_size)
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"  # bicubic | bilinear (resampling of the resize, evaluation and training)
    # NaFlex input (images at their own aspect ratio, mm/models/patches.py): how the learned position table is resized
    # to each image's grid: bicubic (timm's NaFlexVit) | bilinear (Hugging Face's Siglip2), antialiased
    pos_interpolation: str = "bicubic"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def check(self) -> Iterator[tuple[str, str]]:
        if not 1 <= self.patch_size <= self.image_size:
            yield "patch_size", f"must be in [1, image_size {self.image_size}], got {self.patch_size}"
        elif self.image_size % self.patch_size and not self.patch_remainder:
            yield "patch_size", (f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size} "
                                 "(set patch_remainder: true to drop the pixels that do not fill a patch)")
        if self.stem not in ("patch", "conv"):
            yield "stem", f"must be patch or conv, got {self.stem!r}"
        elif self.stem == "conv":
            if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
                yield "stem", f"a conv stem needs a power-of-two patch_size (2, 4, 8, 16, ...), got {self.patch_size}"
            if self.patch_remainder:
                yield "stem", "a conv stem keeps every pixel; patch_remainder applies to the patchify only"
            if self.stem_width < 8 or self.stem_width % 8:
                yield "stem_width", f"must be a multiple of 8 (GroupNorm's 8 groups), got {self.stem_width}"
        if self.pos_embed not in ("learned", "sincos2d", "rope2d"):
            yield "pos_embed", f"must be learned, sincos2d or rope2d, got {self.pos_embed!r}"
        if self.pool not in ("cls", "mean", "attn", "map"):
            yield "pool", f"must be cls, mean, attn or map, got {self.pool!r}"
        if self.pool == "cls" and not self.class_token:
            yield "pool", "cls pooling needs class_token: true"
        if not 0.0 <= self.patch_dropout < 1.0:
            yield "patch_dropout", f"must be in [0, 1), got {self.patch_dropout}"
        if self.proj not in ("linear", "none"):
            yield "proj", f"must be linear or none, got {self.proj!r}"
        if self.final_ln_after_pool and self.pool not in ("cls", "mean"):
            yield "final_ln_after_pool", f"applies to cls or mean pooling, got pool {self.pool!r}"
        if self.pos_embed == "rope2d" and self.transformer is not None and self.transformer.head_dim % 4:
            yield "pos_embed", f"rope2d needs head_dim divisible by 4, got {self.transformer.head_dim}"
        if self.rope is not None and self.pos_embed == "rope2d":
            yield "rope", "rope2d already rotates queries and keys; axial rope goes with learned or sincos2d positions"
        if self.rope is not None and self.transformer is not None and self.transformer.head_dim % 4:
            yield "rope", f"axial RoPE needs head_dim divisible by 4, got {self.transformer.head_dim}"
        if self.resize_mode not in RESIZE_MODES:
            yield "resize_mode", f"must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}"
        if self.interpolation not in INTERPOLATIONS:
            yield "interpolation", f"must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
        if self.pos_interpolation not in INTERPOLATIONS:
            yield "pos_interpolation", f"must be one of {', '.join(INTERPOLATIONS)}, got {self.pos_interpolation!r}"


@dataclass
class TextConfig:
    vocab_size: int = 49408  # CLIP BPE
    context_length: int = 77  # tokens per text, start and end tokens included
    # the tower's own stack; null in a one-tower model, whose stack (ModelConfig.one_tower) it shares
    transformer: TransformerConfig | None = field(default_factory=lambda: TransformerConfig(512, 12, 8))
    causal: bool = True  # CLIP: causal; SigLIP-style encoders: bidirectional with a padding mask
    # eot | first | last | mean; as open_clip pools: argmax (largest token id) | eos (first eot_id) | end (last
    # position, padding or not)
    pool: str = "eot"
    pos_embed: str = "learned"  # learned | rope
    proj: str = "linear"  # linear | none (width == embed_dim: the pooled features are the embedding)
    proj_bias: bool = False  # bias on the output projection
    pad_mask: bool = True  # bidirectional text: hide padding from attention (open_clip's towers do not)
    pad_id: int = 0  # padding token id
    sot_id: int = 49406  # start of text: the first token of every caption a decoder generates
    eot_id: int = 49407  # end of text
    # CoCa: a learned class token appended after the text; its output (normed after pooling) is the
    # contrastive embedding, and the other positions feed the captioning decoder. Overrides ``pool``.
    embed_cls: bool = False
    # Which keys the appended class token may attend to. "correct": the real tokens and itself.
    # "open_clip": open_clip's CoCa mask (the default there, and what its pretrained CoCa weights were
    # trained with): padding is found by id and the mask is shifted one position to the right.
    cls_mask: str = "correct"
    # "clip": mm's CLIP BPE (token-exact with open_clip's). "hf:NAME": a Hugging Face tokenizer, run through
    # open_clip's HFTokenizer (SigLIP's SentencePiece / Gemma vocabularies, BERT, XLM-V); its files come from
    # the Hugging Face cache (or the network)
    tokenizer: str = "clip"
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)  # for an hf: tokenizer, e.g. {clean: canonicalize}

    def check(self) -> Iterator[tuple[str, str]]:
        if self.vocab_size < 1:
            yield "vocab_size", f"must be >= 1, got {self.vocab_size}"
        if self.context_length < 2:
            yield "context_length", f"must be >= 2 (start + end token), got {self.context_length}"
        if self.pool not in TEXT_POOLS:
            yield "pool", f"must be one of {', '.join(TEXT_POOLS)}, got {self.pool!r}"
        if self.proj not in ("linear", "none"):
            yield "proj", f"must be linear or none, got {self.proj!r}"
        if self.pos_embed not in ("learned", "rope"):
            yield "pos_embed", f"must be learned or rope, got {self.pos_embed!r}"
        if self.pos_embed == "rope" and self.transformer is not None and self.transformer.head_dim % 2:
            yield "pos_embed", f"rope needs an even head_dim, got {self.transformer.head_dim}"
        for k in ("eot_id", "sot_id", "pad_id"):
            if not 0 <= getattr(self, k) < self.vocab_size:
                yield k, f"{getattr(self, k)} is outside vocab_size {self.vocab_size}"
        if self.cls_mask not in ("correct", "open_clip"):
            yield "cls_mask", f"must be correct or open_clip, got {self.cls_mask!r}"
        if self.embed_cls and not self.causal:
            yield "embed_cls", "the appended class token is for causal text towers (CoCa)"
        if self.tokenizer != "clip" and not (self.tokenizer.startswith("hf:") and len(self.tokenizer) > 3):
            yield "tokenizer", f"must be clip or hf:NAME (a Hugging Face tokenizer), got {self.tokenizer!r}"
        if self.tokenizer_kwargs and self.tokenizer == "clip":
            yield "tokenizer_kwargs", "only an hf: tokenizer takes keyword arguments"


DECODER_LAYOUTS = ("separate", "fused")


@dataclass
class DecoderConfig:
    """CoCa's multimodal captioning decoder. It continues from the text tower's (unimodal, causal) token
    features, cross-attends to the image tower's tokens and predicts the next token over the text
    vocabulary; it has no embedding of its own, so the token embedding is shared with the text tower."""

    transformer: TransformerConfig = field(default_factory=lambda: TransformerConfig(512, 12, 8))
    # "separate": each layer is a self-attention block then a cross-attention block, each with its own
    # FFN (open_clip's MultimodalTransformer, needed for its weights). "fused": one block per layer with
    # self-attention, cross-attention and one FFN (the Transformer decoder of Vaswani et al.).
    layout: str = "separate"
    # LocCa's box tokens (mm/data/locca.py): the last loc_bins ids of the text vocabulary stand for the bins of a
    # quantised box coordinate (text.vocab_size counts them); 0 = none (a plain CoCa decoder)
    loc_bins: int = 0

    def check(self) -> Iterator[tuple[str, str]]:
        if self.layout not in DECODER_LAYOUTS:
            yield "layout", f"must be one of {DECODER_LAYOUTS}, got {self.layout!r}"
        if self.loc_bins < 0:
            yield "loc_bins", f"must be >= 0, got {self.loc_bins}"


OPEN_CLIP_VISION_LAYOUTS = ("vit", "timm_vit", "timm_pe", "timm_eva", "timm_eva02")


@dataclass
class OpenClipSource:
    """Where a model's tensors sit in an open_clip state dict: needed to convert its weights from and to
    open_clip, nothing else (the mm model is built the same way whatever the source)."""

    name: str | None = None  # the open_clip model name it was translated from (its registry), if any
    # the image tower's tensor names: vit (open_clip's VisionTransformer, visual.*) | timm_vit (a timm
    # VisionTransformer, visual.trunk.*) | timm_pe (a timm Eva with RoPE attention: the Perception Encoder) |
    # timm_eva (a timm Eva with EVA's attention: EVA01) | timm_eva02 (separate q / k / v, SwiGLU: EVA02)
    vision: str = "vit"
    custom_text: bool = False  # the text tower under text.* (open_clip's CustomTextCLIP and CoCa)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.vision not in OPEN_CLIP_VISION_LAYOUTS:
            yield "vision", f"must be one of {', '.join(OPEN_CLIP_VISION_LAYOUTS)}, got {self.vision!r}"


@dataclass
class ModelConfig:
    """A CLIP-style model: image tower + text tower projected into a shared ``embed_dim`` space.

    With ``one_tower`` set (LIMoE, Mustafa et al. 2022) that one Transformer encodes both modalities; the
    ``vision`` and ``text`` sections then describe only embedding, pooling and projection, and their own
    ``transformer`` must be null, so the shared stack is written in one place."""

    embed_dim: int = 512  # width of the shared image-text embedding space
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)  # log of the initial inverse temperature (learned)
    init_logit_bias: float | None = None  # set (e.g. -10) for SigLIP: adds a learnable logit bias
    decoder: DecoderConfig | None = None  # set for CoCa: a captioning decoder trained jointly
    one_tower: TransformerConfig | None = None  # set for a one-tower model: the stack both modalities share
    open_clip: OpenClipSource | None = None  # open_clip's names for its tensors (models translated from open_clip)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.embed_dim < 1:
            yield "embed_dim", f"must be >= 1, got {self.embed_dim}"
        yield from self._check_stacks()
        for name, tower in (("vision", self.vision), ("text", self.text)):
            stack = tower.transformer or self.one_tower
            width = self.embed_dim if getattr(tower, "pool", None) == "attn" else stack.width if stack else None
            if tower.proj == "none" and width is not None and width != self.embed_dim:
                yield f"{name}.proj", f"none needs the pooled width ({width}) to equal embed_dim ({self.embed_dim})"
        if self.decoder is not None and not self.text.causal:
            yield "decoder", "a captioning decoder needs a causal text tower (text.causal: true)"
        if self.decoder is not None and self.text.transformer is not None \
                and self.decoder.transformer.width != self.text.transformer.width:
            yield "decoder.transformer.width", (
                f"must equal text.transformer.width ({self.text.transformer.width}): the decoder continues "
                f"from the text tower's features, got {self.decoder.transformer.width}")
        if self.decoder is not None and self.decoder.loc_bins:
            first = self.text.vocab_size - self.decoder.loc_bins
            special = max(self.text.sot_id, self.text.eot_id, self.text.pad_id)
            if first <= special:
                yield "decoder.loc_bins", (
                    f"the box tokens are the last {self.decoder.loc_bins} ids of the text vocabulary "
                    f"({self.text.vocab_size}), which would include the special token {special}: raise "
                    f"text.vocab_size to at least {special + 1 + self.decoder.loc_bins}")

    def _check_stacks(self) -> Iterator[tuple[str, str]]:
        """Each tower has its own stack, or (one-tower) neither has and both use ``one_tower``."""
        towers = (("vision", self.vision), ("text", self.text))
        if self.one_tower is None:
            for name, tower in towers:
                if tower.transformer is None:
                    yield f"{name}.transformer", "required (it may be null only in a one-tower model, with one_tower set)"
            return
        for name, tower in towers:
            if tower.transformer is not None:
                yield f"{name}.transformer", "must be null in a one-tower model: both modalities run through one_tower"
        # one stack call carries both modalities: positions are added to the tokens, not rotated in attention
        if self.vision.pos_embed == "rope2d":
            yield "vision.pos_embed", "a one-tower model needs learned or sincos2d positions, got 'rope2d'"
        if self.vision.rope is not None:
            yield "vision.rope", "a one-tower model needs learned or sincos2d positions, not rotary ones"
        if self.text.pos_embed == "rope":
            yield "text.pos_embed", "a one-tower model needs learned positions, got 'rope'"
        if self.text.embed_cls:
            yield "text.embed_cls", "the appended class token is CoCa's; a one-tower model has none"
        if self.decoder is not None:
            yield "decoder", "a one-tower model has no captioning decoder"
