"""Nested dataclass configs, loading from dicts / YAML / JSON, dotted overrides and validation.

Every config error names the dotted key it is about (``vision.patch_size``), and is raised before any
model is built or any data is read.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds a bad value. The message names the key."""


# ----------------------------------------------------------------------------------------------------
# Model configs
# ----------------------------------------------------------------------------------------------------

FFN_KINDS = ("mlp", "swiglu")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu")


@dataclass
class MoEConfig:
    """Mixture-of-Experts FFN placed in every ``every``-th block of a tower."""

    num_experts: int = 8  # experts per MoE layer
    top_k: int = 2  # experts per token: 1 (Switch) or 2 (GShard)
    every: int = 2  # blocks every-1, 2*every-1, ... get an MoE FFN; 1 = all blocks
    capacity_factor: float | None = 1.25  # training; None = unlimited (no token is dropped)
    eval_capacity_factor: float | None = 2.0  # evaluation and inference; None = unlimited
    router_jitter: float = 0.0  # multiplicative input noise in training (Switch Transformer)
    normalize_gates: bool = True  # renormalise top-k gate weights to sum to 1 (k > 1)
    # Batch Priority Routing (V-MoE): tokens claim expert slots in order of their top router probability,
    # not of their place in the batch (which, in a one-tower call, would put all texts after all images)
    batch_priority: bool = False
    aux_loss_weight: float = 0.01  # Switch load-balancing loss weight
    z_loss_weight: float = 0.001  # router z-loss weight (ST-MoE)
    # LIMoE's entropy losses (Mustafa et al. 2022), per modality (per tower in a two-tower model):
    local_entropy_weight: float = 0.0  # mean per-token router entropy, minimised (confident routing)
    global_entropy_weight: float = 0.0  # entropy of the mean router distribution, maximised (diversity)
    # Nats: the global term is max(0, threshold - H), so a modality is pushed to spread only until its
    # entropy reaches the threshold (LIMoE: log S for about S experts, e.g. log 4 = 1.386); null = -H.
    global_entropy_threshold: float | None = None
    # The dense equal-active-parameter twin, a control for MoE experiments: each MoE place gets one dense
    # FFN of top_k x the expert width instead (same FLOPs and active weights per token, no routing).
    dense_twin: bool = False
    # How the experts run: "grouped" sorts the kept assignments by expert and runs each FFN matmul as one
    # grouped GEMM over exactly those rows (torch's F.grouped_mm; no capacity padding, so unlimited
    # capacity costs k x tokens rows); "padded" scatters into an (experts, capacity, dim) buffer and runs
    # batched matmuls (unlimited capacity: as deep as the busiest expert's load); "auto" = grouped where torch has a fast kernel for it (fp32 on
    # CPU, bf16 on CUDA sm80+), else padded. Same routing and outputs either way (tested).
    dispatch: str = "auto"

    def check(self) -> Iterator[tuple[str, str]]:
        if self.num_experts < 1:
            yield "num_experts", f"must be >= 1, got {self.num_experts}"
        if self.top_k not in (1, 2) or self.top_k > self.num_experts:
            yield "top_k", f"must be 1 or 2 and <= num_experts ({self.num_experts}), got {self.top_k}"
        if self.every < 1:
            yield "every", f"must be >= 1, got {self.every}"
        for k in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                yield k, f"must be > 0 or null (unlimited), got {v}"
        for k in ("aux_loss_weight", "z_loss_weight", "local_entropy_weight", "global_entropy_weight"):
            if getattr(self, k) < 0:
                yield k, f"must be >= 0, got {getattr(self, k)}"
        if self.dispatch not in ("auto", "grouped", "padded"):
            yield "dispatch", f"must be auto, grouped or padded, got {self.dispatch!r}"
        tau, most = self.global_entropy_threshold, math.log(max(self.num_experts, 1))
        if tau is not None and not 0 <= tau <= most:
            # above log(num_experts) the threshold is unreachable: the term would never switch off
            yield "global_entropy_threshold", (
                f"must be in [0, log(num_experts) = {most:.4f}] nats (log S asks for about S experts), got {tau}")


SPARSE_BACKENDS = ("flex", "dense")


@dataclass
class SparseAttentionConfig:
    """Block-sparse self-attention (BigBird, Zaheer et al. 2020) over blocks of ``block_size`` tokens: a
    local band of blocks, global tokens and random blocks. Built by ``mm.layers.sparse``."""

    block_size: int = 64  # tokens per block; flex_attention skips whole blocks
    window: int = 1  # blocks on each side of a query's own block (0 = its own block only)
    global_tokens: int = 1  # the first N tokens (e.g. the class token) see all tokens and are seen by all
    random_blocks: int = 0  # extra key blocks per query block, drawn per layer from (seed, layer index)
    seed: int = 0  # of the random blocks
    # flex: flex_attention, compiled, skips empty blocks (CUDA; other devices run the mask through SDPA);
    # dense: the same mask through SDPA everywhere (the reference)
    backend: str = "flex"

    def check(self) -> Iterator[tuple[str, str]]:
        if self.backend not in SPARSE_BACKENDS:
            yield "backend", f"must be one of {SPARSE_BACKENDS}, got {self.backend!r}"
        if self.block_size < 1:
            yield "block_size", f"must be >= 1, got {self.block_size}"
        elif self.backend == "flex" and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            # flex_attention's CUDA kernels tile each sparse block with power-of-two tiles of >= 16 rows
            yield "block_size", f"the flex backend needs a power of two >= 16, got {self.block_size}"
        for k in ("window", "global_tokens", "random_blocks"):
            if getattr(self, k) < 0:
                yield k, f"must be >= 0, got {getattr(self, k)}"


@dataclass
class TransformerConfig:
    """The one block stack every tower uses."""

    width: int = 512  # token width
    depth: int = 12  # blocks
    heads: int = 8  # attention heads (width must divide by heads)
    mlp_ratio: float = 4.0  # FFN hidden width / width
    ffn: str = "mlp"  # mlp | swiglu
    act: str = "gelu"  # activation of the mlp FFN (quick_gelu for OpenAI weights)
    qkv_bias: bool = True  # biases on the query/key/value projections
    qk_norm: bool = False  # LayerNorm on queries and keys, per head
    norm_eps: float = 1e-5  # LayerNorm epsilon
    layer_scale: float | None = None  # LayerScale init value; None = off
    drop_path: float = 0.0  # stochastic depth, linearly increasing to this rate at the last block
    moe: MoEConfig | None = None
    grad_checkpointing: bool = False  # recompute each block in backward (less memory)
    sparse_attention: SparseAttentionConfig | None = None  # block-sparse self-attention; None = dense

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def check(self) -> Iterator[tuple[str, str]]:
        for k in ("width", "depth", "heads"):
            if getattr(self, k) < 1:
                yield k, f"must be >= 1, got {getattr(self, k)}"
        if self.heads >= 1 and self.width % self.heads:
            yield "heads", f"width {self.width} is not divisible by heads {self.heads}"
        if self.ffn not in FFN_KINDS:
            yield "ffn", f"must be one of {FFN_KINDS}, got {self.ffn!r}"
        if self.act not in ACTIVATIONS:
            yield "act", f"must be one of {ACTIVATIONS}, got {self.act!r}"
        if not 0.0 <= self.drop_path < 1.0:
            yield "drop_path", f"must be in [0, 1), got {self.drop_path}"
        sparse = self.sparse_attention
        if sparse is not None and sparse.backend == "flex" and self.heads >= 1 and self.head_dim < 16:
            # flex_attention's CUDA kernel (tl.dot) needs head_dim >= 16
            yield "sparse_attention.backend", f"flex needs head_dim >= 16, got {self.head_dim} (use dense)"


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    image_size: int = 224  # input side in pixels (square)
    patch_size: int = 32  # patch side; image_size must be a multiple
    # the tower's own stack; null in a one-tower model, whose stack (ModelConfig.one_tower) it shares
    transformer: TransformerConfig | None = field(default_factory=lambda: TransformerConfig(768, 12, 12))
    pos_embed: str = "learned"  # learned | sincos2d | rope2d
    class_token: bool = True  # prepend a learned class token
    pool: str = "cls"  # cls | mean | attn (attentional pooling, CoCa)
    attn_pool_queries: int = 256  # attn pool: tokens handed to a captioning decoder
    attn_pool_heads: int = 8  # attn pool: heads of the pooler
    norm_pre: bool = True  # LayerNorm before the stack (CLIP's ln_pre)
    patch_dropout: float = 0.0  # FLIP: fraction of patch tokens dropped in training
    image_mean: tuple[float, float, float] = OPENAI_MEAN  # per-channel normalisation (OpenAI CLIP's)
    image_std: tuple[float, float, float] = OPENAI_STD  # per-channel standard deviation

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def check(self) -> Iterator[tuple[str, str]]:
        if self.patch_size < 1 or self.image_size % self.patch_size:
            yield "patch_size", f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
        if self.pos_embed not in ("learned", "sincos2d", "rope2d"):
            yield "pos_embed", f"must be learned, sincos2d or rope2d, got {self.pos_embed!r}"
        if self.pool not in ("cls", "mean", "attn"):
            yield "pool", f"must be cls, mean or attn, got {self.pool!r}"
        if self.pool == "cls" and not self.class_token:
            yield "pool", "cls pooling needs class_token: true"
        if not 0.0 <= self.patch_dropout < 1.0:
            yield "patch_dropout", f"must be in [0, 1), got {self.patch_dropout}"
        if self.pos_embed == "rope2d" and self.transformer is not None and self.transformer.head_dim % 4:
            yield "pos_embed", f"rope2d needs head_dim divisible by 4, got {self.transformer.head_dim}"


@dataclass
class TextConfig:
    vocab_size: int = 49408  # CLIP BPE
    context_length: int = 77  # tokens per text, start and end tokens included
    # the tower's own stack; null in a one-tower model, whose stack (ModelConfig.one_tower) it shares
    transformer: TransformerConfig | None = field(default_factory=lambda: TransformerConfig(512, 12, 8))
    causal: bool = True  # CLIP: causal; SigLIP-style encoders: bidirectional with a padding mask
    pool: str = "eot"  # eot | first | last | mean
    pos_embed: str = "learned"  # learned | rope
    proj_bias: bool = False  # bias on the output projection
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

    def check(self) -> Iterator[tuple[str, str]]:
        if self.vocab_size < 1:
            yield "vocab_size", f"must be >= 1, got {self.vocab_size}"
        if self.context_length < 2:
            yield "context_length", f"must be >= 2 (start + end token), got {self.context_length}"
        if self.pool not in ("eot", "first", "last", "mean"):
            yield "pool", f"must be eot, first, last or mean, got {self.pool!r}"
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

    def check(self) -> Iterator[tuple[str, str]]:
        if self.layout not in DECODER_LAYOUTS:
            yield "layout", f"must be one of {DECODER_LAYOUTS}, got {self.layout!r}"


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

    def check(self) -> Iterator[tuple[str, str]]:
        if self.embed_dim < 1:
            yield "embed_dim", f"must be >= 1, got {self.embed_dim}"
        yield from self._check_stacks()
        if self.decoder is not None and not self.text.causal:
            yield "decoder", "a captioning decoder needs a causal text tower (text.causal: true)"
        if self.decoder is not None and self.text.transformer is not None \
                and self.decoder.transformer.width != self.text.transformer.width:
            yield "decoder.transformer.width", (
                f"must equal text.transformer.width ({self.text.transformer.width}): the decoder continues "
                f"from the text tower's features, got {self.decoder.transformer.width}")

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
        if self.text.pos_embed == "rope":
            yield "text.pos_embed", "a one-tower model needs learned positions, got 'rope'"
        if self.text.embed_cls:
            yield "text.embed_cls", "the appended class token is CoCa's; a one-tower model has none"
        if self.decoder is not None:
            yield "decoder", "a one-tower model has no captioning decoder"


# ----------------------------------------------------------------------------------------------------
# Generic machinery: dict <-> dataclass, overrides, validation
# ----------------------------------------------------------------------------------------------------

def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/JSON scalar to the annotated type, or raise ConfigError naming ``key``."""
    if value is None:
        if _allows_none(tp) or tp is Any:
            return None
        raise ConfigError(f"{key}: null is not allowed here (expected {getattr(tp, '__name__', tp)})")
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        # try each alternative in order (``list[str] | str``: a list, else a file path)
        alts = [a for a in typing.get_args(tp) if a is not type(None)]
        for alt in alts:
            try:
                return _coerce(value, alt, key)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in alts)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        # PyYAML (YAML 1.1) reads 1e-3 (no dot) as a string; accept plain decimal / exponent notation
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict | Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys are errors naming the dotted key."""
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {where!r} (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = _dataclass_type(hints[name])
        if sub is not None and value is not None:
            kwargs[name] = from_dict(sub, value, key)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists), suitable for JSON/YAML."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def parse_value(text: str) -> Any:
    """A command-line override value: YAML scalar/list syntax (``1e-3``, ``true``, ``[a, b]``, ``null``)."""
    import yaml

    return yaml.safe_load(text)


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``cfg`` with dotted keys replaced: ``{"vision.patch_dropout": 0.5}``.

    String values are parsed as YAML (so CLI ``key=value`` pairs can be passed through). Setting a
    key inside an optional section that is null (``vision.transformer.moe.num_experts``) creates that
    section with defaults first.
    """
    data = to_dict(cfg)
    cls = type(cfg)
    for dotted, value in overrides.items():
        if isinstance(value, str):
            value = parse_value(value)
        parts = dotted.split(".")
        node, node_cls = data, cls
        for i, part in enumerate(parts):
            key = ".".join(parts[: i + 1])
            hints = typing.get_type_hints(node_cls)
            if part not in hints:
                raise ConfigError(f"unknown config key {key!r} (valid keys here: {', '.join(sorted(hints))})")
            if i == len(parts) - 1:
                node[part] = to_dict(value) if dataclasses.is_dataclass(value) else value
                break
            sub = _dataclass_type(hints[part])
            if sub is None:
                raise ConfigError(f"{key!r} is a value, not a section; cannot set {dotted!r}")
            if node.get(part) is None:
                node[part] = to_dict(sub())
            node, node_cls = node[part], sub
    return validate(from_dict(cls, data))


def validate(cfg: Any, prefix: str = "") -> Any:
    """Run every nested ``check()``; raise ConfigError for the first problem, naming its dotted key."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate(v, f"{prefix}{f.name}.")
    if hasattr(cfg, "check"):
        for key, msg in cfg.check():
            raise ConfigError(f"{prefix}{key}: {msg}")
    return cfg


def load_file(path: str | Path) -> dict:
    """Read a YAML or JSON file into a dict, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ConfigError(f"{path}: cannot parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
