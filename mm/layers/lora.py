"""Low-rank adaptation (LoRA, Hu et al. 2021) of the shared blocks' linear layers and MoE experts.

``add_lora(model, cfg)`` replaces each targeted ``nn.Linear`` of a Transformer stack by a :class:`LoRALinear`
holding the same ``weight`` / ``bias`` tensors (the base state-dict keys do not change) plus ``lora_A`` (r x in)
and ``lora_B`` (out x r): ``y = x W^T + b + (alpha / r) * B(A(dropout(x)))``. ``lora_B`` starts at zero, so an
adapted model computes exactly what its base computes until it trains. A fused ``qkv`` projection gets one
adapter over its three outputs, as peft does for any packed projection. The names are peft's (``lora_A``,
``lora_B``), so an adapter saved in peft's layout (``mm.hub.adapter``) loads into these modules with peft too.

MoE experts (``experts`` targets) are batched 3-D weights, not Linears: each expert gets its own factors
(``lora_w1_A`` (E, in, r) ...), added to the expert weights as ``scale * A @ B`` at every call (dropout does not
apply to them).

Targets are ``TOWER.KIND``: TOWER one of the model's stacks (``vision``, ``text``, ``decoder``, a one-tower
model's ``transformer``) or ``*``; KIND ``qkv`` (self-attention's packed qkv, cross-attention's q and kv),
``out`` (attention output projection), ``attn`` (both), ``mlp`` (the dense FFN's two projections, MLP or
SwiGLU), ``experts`` (MoE expert FFNs) or ``*`` (all of them).
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .block import Transformer
from .config import LORA_KINDS, LoraConfig
from .mlp import Mlp, SwiGLU
from .moe import MoE

_KIND_GROUPS = {"attn": ("qkv", "out"), "*": ("qkv", "out", "mlp", "experts")}


class LoraError(ValueError):
    """A LoRA target that names nothing, a rank the layer cannot take, or an adapter that does not fit."""


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a low-rank update; its ``weight`` / ``bias`` are the base layer's own tensors."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # no new weight: the base layer's parameters are taken over as they are
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
        self.reset_lora()

    def reset_lora(self) -> None:
        """A as nn.Linear's default (Kaiming-uniform, as peft), B zero: the update starts at exactly zero."""
        if self.lora_A.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear with the update folded into its weight (computed in fp32)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        w = self.weight.detach().float() + self.delta_weight().detach().float()
        out.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=self.weight.requires_grad)
        out.bias = self.bias
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


class ExpertLoRA(nn.Module):
    """Per-expert factors of one MoE weight (E, d_in, d_out): delta = scale * A @ B, A (E, d_in, r), B (E, r, d_out)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        e, d_in, d_out = weight.shape
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.A = nn.Parameter(torch.empty(e, d_in, rank, device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(e, rank, d_out, device=weight.device, dtype=weight.dtype))
        if weight.device.type != "meta":
            nn.init.normal_(self.A, std=d_in**-0.5)

    def delta(self) -> torch.Tensor:
        return torch.bmm(self.A, self.B) * self.scaling


# -- choosing the layers -----------------------------------------------------------------------------------------
def stacks(model: nn.Module) -> dict[str, Transformer]:
    """The model's Transformer stacks by tower: ``vision``, ``text``, ``decoder`` or a one-tower ``transformer``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Transformer) and name:
            tower = name.split(".")[0]
            out.setdefault(tower, module)
    return out


def _kinds(kind: str) -> tuple[str, ...]:
    return _KIND_GROUPS.get(kind, (kind,))


def _layers_of(stack: Transformer, prefix: str) -> list[tuple[str, str]]:
    """(module name, kind) of every adaptable layer of one stack, in module order."""
    out = []
    for name, module in stack.named_modules():
        full = f"{prefix}.{name}"
        if isinstance(module, Attention):
            for proj in ("qkv", "q", "kv"):
                if isinstance(getattr(module, proj, None), nn.Linear):
                    out.append((f"{full}.{proj}", "qkv"))
            out.append((f"{full}.proj", "out"))
        elif isinstance(module, (Mlp, SwiGLU)):
            out += [(f"{full}.fc1", "mlp"), (f"{full}.fc2", "mlp")]
        elif isinstance(module, MoE):
            out += [(f"{full}.w1", "experts"), (f"{full}.w2", "experts")]
    return out


def lora_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Names of the layers ``cfg.targets`` select (Linears, or MoE expert weights ``...ffn.w1``); LoraError naming
    a target that selects nothing, or a layer narrower than the rank."""
    towers = stacks(model)
    layers = {t: _layers_of(s, f"{_path(model, s)}") for t, s in towers.items()}
    chosen: list[str] = []
    for target in cfg.targets:
        tower, _, kind = target.partition(".")
        matched = [t for t in towers if fnmatch.fnmatchcase(t, tower)]
        if not matched:
            raise LoraError(f"lora.targets: {target!r}: no stack named {tower!r} in this model "
                            f"(stacks: {', '.join(towers)}; or * for all)")
        kinds = _kinds(kind)
        found = [n for t in matched for n, k in layers[t] if k in kinds]
        if not found:
            raise LoraError(f"lora.targets: {target!r} selects no layer ({kind!r} in {', '.join(matched)}; kinds: "
                            f"{', '.join(LORA_KINDS)})")
        chosen += [n for n in found if n not in chosen]
    for name in chosen:
        shape = _shape(model, name)
        if cfg.rank > min(shape):
            raise LoraError(f"lora.rank {cfg.rank} is larger than layer {name} ({shape[0]} x {shape[1]}) allows")
    return chosen


def _path(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent)
    if isinstance(owner, MoE):
        w = getattr(owner, leaf)
        return int(w.shape[1]), int(w.shape[2])
    lin = owner.get_submodule(leaf)
    return lin.out_features, lin.in_features


# -- adding, reading, merging -------------------------------------------------------------------------------------
def add_lora(model: nn.Module, cfg: LoraConfig, targets: list[str] | None = None) -> list[str]:
    """Put adapters on the layers ``cfg.targets`` select (or exactly ``targets``); returns their names. The base
    parameters are untouched (same tensors, same names); freezing them is the caller's choice."""
    names = lora_targets(model, cfg) if targets is None else targets
    for name in names:
        parent, _, leaf = name.rpartition(".")
        try:
            owner = model.get_submodule(parent)
        except AttributeError:
            raise LoraError(f"no layer {name} in this model") from None
        if isinstance(owner, MoE):
            owner.add_expert_lora(leaf, ExpertLoRA(getattr(owner, leaf), cfg.rank, cfg.alpha))
            continue
        base = getattr(owner, leaf, None)
        if not isinstance(base, nn.Linear) or isinstance(base, LoRALinear):
            raise LoraError(f"{name} is not a plain Linear layer that can take an adapter")
        setattr(owner, leaf, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout))
    return names


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_w1." in name or ".lora_w2." in name


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, ExpertLoRA)) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone, by their names in the model."""
    return {k: v for k, v in model.state_dict().items() if is_lora_param(k)}


def adapted_layers(model: nn.Module) -> list[str]:
    """Names of the layers carrying an adapter (as ``add_lora`` takes them)."""
    out = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n, m in model.named_modules():
        if isinstance(m, MoE):
            out += [f"{n}.{leaf}" for leaf in ("w1", "w2") if getattr(m, f"lora_{leaf}", None) is not None]
    return out


def mark_only_lora_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is a plain one again (same state-dict keys as
    its base)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, module.merged())
        elif isinstance(module, MoE):
            module.merge_expert_lora()
    return model
