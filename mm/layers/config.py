"""Configs of the shared blocks: the Transformer stack every tower uses, its Mixture-of-Experts FFN and its
block-sparse attention. Plain dataclasses (``mm.config`` loads, overrides and validates them)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

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

    # Keys of earlier versions, accepted when reading and dropped (``mm.config.from_dict``): every saved
    # model's config.json held grad_checkpointing, a training setting now (``train.grad_checkpointing``).
    legacy_keys: ClassVar[tuple[str, ...]] = ("grad_checkpointing",)

    width: int = 512  # token width
    depth: int = 12  # blocks
    heads: int = 8  # attention heads (width must divide by heads)
    mlp_ratio: float = 4.0  # FFN hidden width / width
    ffn: str = "mlp"  # mlp | swiglu
    act: str = "gelu"  # activation of the mlp FFN (quick_gelu for OpenAI weights)
    qkv_bias: bool = True  # biases on the query/key/value projections
    # with qkv_bias: a key bias too; false = query and value biases only (EVA's attention; softmax ignores a key
    # bias); self-attention stacks only
    k_bias: bool = True
    qk_norm: bool = False  # LayerNorm on queries and keys, per head
    # sub-LN (NormFormer; EVA02's scale_attn_inner + scale_mlp): a LayerNorm on the attention output before its
    # projection and on the FFN's hidden activations before its down projection
    sub_norm: bool = False
    norm_eps: float = 1e-5  # LayerNorm epsilon
    layer_scale: float | None = None  # LayerScale init value; None = off
    drop_path: float = 0.0  # stochastic depth, linearly increasing to this rate at the last block
    moe: MoEConfig | None = None
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
        if self.sub_norm and self.moe is not None:
            yield "sub_norm", "the MoE FFN has no inner LayerNorm"
        if not self.k_bias and not self.qkv_bias:
            yield "k_bias", "false applies with qkv_bias: true (query and value biases only)"
        sparse = self.sparse_attention
        if sparse is not None and sparse.backend == "flex" and self.heads >= 1 and self.head_dim < 16:
            # flex_attention's CUDA kernel (tl.dot) needs head_dim >= 16
            yield "sparse_attention.backend", f"flex needs head_dim >= 16, got {self.head_dim} (use dense)"


LORA_KINDS = ("qkv", "out", "attn", "mlp", "experts", "*")


@dataclass
class LoraConfig:
    """Low-rank adapters on the stacks' linear layers (``mm.layers.lora``): ``alpha / rank`` scales the update."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input (not on MoE expert adapters)
    # TOWER.KIND: TOWER = vision | text | decoder | transformer (a one-tower model's stack) | *; KIND = qkv (packed
    # self-attention qkv, cross-attention q / kv) | out (attention output) | attn (qkv + out) | mlp (dense FFN) |
    # experts (MoE expert FFNs) | *
    targets: list[str] = field(default_factory=lambda: ["*.attn"])

    def check(self) -> Iterator[tuple[str, str]]:
        if self.rank < 1:
            yield "rank", f"must be >= 1, got {self.rank}"
        if not self.alpha > 0:
            yield "alpha", f"must be > 0, got {self.alpha}"
        if not 0.0 <= self.dropout < 1.0:
            yield "dropout", f"must be in [0, 1), got {self.dropout}"
        if not self.targets:
            yield "targets", "must name at least one TOWER.KIND (e.g. vision.attn, *.mlp)"
        for i, t in enumerate(self.targets):
            tower, dot, kind = str(t).partition(".")
            if not dot or not tower or kind not in LORA_KINDS:
                yield f"targets[{i}]", f"must be TOWER.KIND with KIND one of {', '.join(LORA_KINDS)}, got {t!r}"
