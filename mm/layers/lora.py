"""Low-rank adaptation (LoRA, Hu et al. 2021) of the shared blocks' linear layers and MoE experts.

One mechanism for every adapted weight. ``add_lora(model, cfg)`` turns each targeted module into a :class:`LoRA`
in place: its class is swapped for a subclass of both (the technique of ``torch.nn.utils.parametrize``) and the
low-rank factors are registered on it, while its own parameters stay where they are, so the base state-dict keys
do not change (``init_from``, checkpoints and conversion read the same names) and ``layers/moe.py`` knows nothing
of adapters. How the update ``delta = (alpha / r) * B A`` (in the weight's layout) reaches the computation depends
on the weight, not on the mechanism:

* an ``nn.Linear`` (:class:`LoRALinear`) adds it on the input side, ``y = x W^T + b + (alpha / r) *
  B(A(dropout(x)))``, exactly peft's LoRA layer: the frozen weight's gradient is never formed and dropout applies;
  the factors are ``lora_A`` (r x in) and ``lora_B`` (out x r), peft's names, so an adapter saved in peft's
  layout (``mm.hub.adapter``) loads into these modules with peft too. A fused ``qkv`` projection gets one adapter
  over its three outputs, as peft does for any packed projection;
* any other weight (MoE experts' batched ``w1`` / ``w2``, (E, in, out), used as ``x @ W`` inside the layer) reads
  as ``W + delta`` while the module's forward runs and as the parameter itself otherwise (:class:`WeightLoRA`: the
  attribute is a property of the swapped class), factors ``lora_w1.A`` (E, in, r) and ``lora_w1.B`` (E, r, out);
  dropout does not apply.

Why not ``torch.nn.utils.parametrize`` itself: it moves the weight to ``parametrizations.weight.original`` (the base
state-dict keys change), and a Linear whose weight is ``W + BA`` forms the frozen weight's full gradient in
backward and has no place for dropout on the adapter's input.

``lora_B`` / ``B`` start at zero, so an adapted model computes exactly what its base computes until it trains.
``merge_lora`` folds each update into its weight (in fp32, one rounding) and gives every module its class back.
The adapter parameters are found by module type (:func:`lora_parameters`), never by their names.

Targets are ``TOWER.KIND``: TOWER one of the model's stacks (``vision``, ``text``, ``decoder``, a one-tower
model's ``transformer``) or ``*``; KIND ``qkv`` (self-attention's packed qkv, cross-attention's q and kv),
``out`` (attention output projection), ``attn`` (both), ``mlp`` (the dense FFN's two projections, MLP or
SwiGLU), ``experts`` (MoE expert FFNs) or ``*`` (all of them).
"""
from __future__ import annotations

import fnmatch
import math
import re

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


# -- the adapted modules -----------------------------------------------------------------------------------------
class LoRA(nn.Module):
    """What every adapted module is: its own class plus this one, made by :func:`add_lora` (never constructed).

    A subclass states which of the module's weights carry an update, the update (``lora_delta``), the factors it
    registered for it and how to remove them; merging, finding and naming are shared."""

    _lora_base: type  # the module's class before it was adapted: merging gives it back

    def lora_weights(self) -> tuple[str, ...]:
        """Names of the module's parameters that carry an update."""
        raise NotImplementedError

    def lora_delta(self, weight: str) -> torch.Tensor:
        """The update of ``weight``, in its layout: ``weight + lora_delta(weight)`` is the merged weight."""
        raise NotImplementedError

    def lora_factors(self) -> dict[str, tuple[nn.Parameter, bool]]:
        """The factors by name relative to the module, each with whether it starts at zero (the update is linear
        in that one: scaling it scales the update)."""
        raise NotImplementedError

    def _lora_remove(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold every update into its weight (computed in fp32, rounded once to the weight's dtype), in place,
        drop the factors and give the module its own class back."""
        for w in self.lora_weights():
            p = self._parameters[w]
            p.copy_((p.detach().float() + self.lora_delta(w).detach().float()).to(p.dtype))
        self._lora_remove()
        self.__class__ = self._lora_base


class LoRALinear(LoRA, nn.Linear):
    """An ``nn.Linear`` plus a low-rank update on its input side (peft's layer): its ``weight`` / ``bias`` are the
    base layer's own tensors, untouched."""

    _lora_base = nn.Linear

    @staticmethod
    def factor_shapes(weight: str, shape: tuple[int, ...], rank: int) -> dict[str, tuple[int, ...]]:
        out_f, in_f = shape
        return {"lora_A.weight": (rank, in_f), "lora_B.weight": (out_f, rank)}

    def _lora_init(self, weight: str, rank: int, alpha: float, dropout: float) -> None:
        dev, dt = self.weight.device, self.weight.dtype
        self.lora_rank, self.lora_alpha, self.lora_scaling = rank, alpha, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
        if self.weight.device.type != "meta":  # A as nn.Linear's default (Kaiming-uniform, as peft), B zero
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.lora_scaling

    def lora_weights(self) -> tuple[str, ...]:
        return ("weight",)

    def lora_delta(self, weight: str) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.lora_scaling

    def lora_factors(self) -> dict[str, tuple[nn.Parameter, bool]]:
        return {"lora_A.weight": (self.lora_A.weight, False), "lora_B.weight": (self.lora_B.weight, True)}

    def _lora_remove(self) -> None:
        for name in ("lora_dropout", "lora_A", "lora_B"):
            delattr(self, name)
        del self.lora_rank, self.lora_alpha, self.lora_scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_rank}, alpha={self.lora_alpha}"


class LoRAFactors(nn.Module):
    """The factors of one batched weight (E, d_in, d_out) used as ``x @ W``: delta = scale * A @ B, A (E, d_in, r)
    (normal, std d_in^-1/2), B (E, r, d_out) (zero)."""

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

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class WeightLoRA(LoRA):
    """A module whose adapted weights read as ``W + delta`` while its forward runs: a property per weight on the
    swapped class, factors in a :class:`LoRAFactors` child ``lora_<weight>``. The module's own code reads
    ``self.w1`` as always and gets the adapted weight.

    Outside its forward the attribute is the base parameter, as a LoRALinear's ``weight`` is: FSDP2
    (``reset_sharded_param`` at its first forward and after ``.to()``), ``get_parameter`` and anything else that
    reaches a parameter by ``getattr(module, name)`` must get the parameter itself (peft's ``ParamWrapper`` scopes
    its parametrization to the forward for the same reason). The forward is marked by a pre-hook and an always-called
    hook (an exception does not leave the module marked), not by wrapping ``forward`` in try/finally: torch.compile
    cannot resume a graph broken inside a try block (the MoE's data-dependent routing breaks it), and wrapping
    doubled the graph breaks of tiny-moe's vision tower (7 -> 14) and slowed its compile."""

    _lora_names: tuple[str, ...] = ()  # the adapted weights, in the module's parameter order (per generated class)
    _lora_calls = 0  # forwards of this module running now (an instance attribute once one has run)

    @staticmethod
    def factor_shapes(weight: str, shape: tuple[int, ...], rank: int) -> dict[str, tuple[int, ...]]:
        e, d_in, d_out = shape
        return {f"lora_{weight}.A": (e, d_in, rank), f"lora_{weight}.B": (e, rank, d_out)}

    def _lora_init(self, weight: str, rank: int, alpha: float, dropout: float) -> None:
        self.add_module(f"lora_{weight}", LoRAFactors(self._parameters[weight], rank, alpha))
        if "_lora_hooks" not in self.__dict__:  # the first adapted weight of this module
            self._lora_hooks = (self.register_forward_pre_hook(_forward_starts),
                                self.register_forward_hook(_forward_ends, always_call=True))

    def lora_weights(self) -> tuple[str, ...]:
        return self._lora_names

    def lora_delta(self, weight: str) -> torch.Tensor:
        return self._modules[f"lora_{weight}"].delta()

    def lora_factors(self) -> dict[str, tuple[nn.Parameter, bool]]:
        out = {}
        for w in self._lora_names:
            f = self._modules[f"lora_{w}"]
            out[f"lora_{w}.A"], out[f"lora_{w}.B"] = (f.A, False), (f.B, True)
        return out

    def _lora_remove(self) -> None:
        for w in self._lora_names:
            delattr(self, f"lora_{w}")
        for handle in self.__dict__.pop("_lora_hooks"):
            handle.remove()
        self.__dict__.pop("_lora_calls", None)

    def __reduce_ex__(self, protocol):  # the generated class is not importable: pickle / deepcopy rebuild it
        return _rebuild_weight_lora, (self._lora_base, self._lora_names), self.__dict__


def _forward_starts(module: WeightLoRA, args: tuple) -> None:
    module._lora_calls += 1


def _forward_ends(module: WeightLoRA, args: tuple, out: object) -> None:
    module._lora_calls -= 1


def _adapted_weight(name: str) -> property:
    def get(self: WeightLoRA) -> torch.Tensor:
        p = self._parameters[name]
        return p + self._modules[f"lora_{name}"].delta() if self._lora_calls else p
    return property(get, doc=f"``{name}``, plus its low-rank update while the module's forward runs (mm.layers.lora)")


_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _weight_lora_class(base: type, names: tuple[str, ...]) -> type:
    """``base`` with ``names`` read as weight + update: one class per (base, names), made once."""
    key = (base, names)
    if key not in _CLASSES:
        body = {"_lora_base": base, "_lora_names": names, "__module__": __name__,
                **{n: _adapted_weight(n) for n in names}}
        _CLASSES[key] = type(f"LoRA{base.__name__}", (WeightLoRA, base), body)
    return _CLASSES[key]


def _rebuild_weight_lora(base: type, names: tuple[str, ...]) -> WeightLoRA:
    return object.__new__(_weight_lora_class(base, names))


def _linear_lora_class(base: type) -> type:
    if base is nn.Linear:
        return LoRALinear
    if (base, ()) not in _CLASSES:  # a subclass of nn.Linear: the same layer over it
        _CLASSES[(base, ())] = type(f"LoRA{base.__name__}", (LoRALinear, base),
                                    {"_lora_base": base, "__module__": __name__})
    return _CLASSES[(base, ())]


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module owning the weight a layer name means, and that weight's name: a Linear ``...attn.qkv`` -> (it,
    ``weight``); an MoE expert weight ``...ffn.w1`` -> (the MoE, ``w1``). LoraError for anything else."""
    parent, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(parent)
    except AttributeError:
        raise LoraError(f"layer {name} does not exist in this model") from None
    if isinstance(owner, MoE) and leaf in ("w1", "w2"):
        return owner, leaf
    layer = owner._modules.get(leaf)
    if isinstance(layer, nn.Linear):
        return layer, "weight"
    if layer is None and leaf not in owner._parameters:
        raise LoraError(f"layer {name} does not exist in this model")
    raise LoraError(f"layer {name} is neither a Linear layer nor an MoE expert weight: it cannot take an adapter")


def _attach(module: nn.Module, weight: str, rank: int, alpha: float, dropout: float) -> None:
    """Make ``module`` a :class:`LoRA` carrying an update of its parameter ``weight`` (the one mechanism)."""
    base = module._lora_base if isinstance(module, LoRA) else type(module)
    if isinstance(module, nn.Linear) and weight == "weight":
        if isinstance(module, LoRA):
            raise LoraError("the layer already carries an adapter")
        module.__class__ = _linear_lora_class(base)
    else:
        have = module.lora_weights() if isinstance(module, LoRA) else ()
        if weight in have:
            raise LoraError(f"{weight} already carries an adapter")
        names = {*have, weight}
        module.__class__ = _weight_lora_class(base, tuple(n for n in module._parameters if n in names))
    module._lora_init(weight, rank, alpha, dropout)


def _factor_shapes(module: nn.Module, weight: str, rank: int) -> dict[str, tuple[int, ...]]:
    kind = LoRALinear if isinstance(module, nn.Linear) and weight == "weight" else WeightLoRA
    return kind.factor_shapes(weight, tuple(module._parameters[weight].shape), rank)


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
    """The two dimensions an adapter's rank may not exceed: (out, in) of a Linear, (in, out) of an expert weight."""
    owner, weight = _resolve(model, name)
    shape = owner._parameters[weight].shape
    return int(shape[-2]), int(shape[-1])


# -- adding, finding, merging -------------------------------------------------------------------------------------
def add_lora(model: nn.Module, cfg: LoraConfig, targets: list[str] | None = None) -> list[str]:
    """Put adapters on the layers ``cfg.targets`` select (or exactly ``targets``); returns their names. The base
    parameters are untouched (same tensors, same names); freezing them is the caller's choice."""
    names = lora_targets(model, cfg) if targets is None else targets
    for name in names:
        owner, weight = _resolve(model, name)
        try:
            _attach(owner, weight, cfg.rank, cfg.alpha, cfg.dropout)
        except LoraError as e:
            raise LoraError(f"{name}: {e}") from None
    return names


def lora_tensor_shapes(model: nn.Module, layers: list[str], rank: int) -> dict[str, tuple[int, ...]]:
    """The adapter tensors (state-dict names) and shapes ``add_lora(model, ..., targets=layers)`` at ``rank`` would
    make, without making them; LoraError naming a layer this model does not have or that cannot be adapted."""
    out: dict[str, tuple[int, ...]] = {}
    for name in layers:
        owner, weight = _resolve(model, name)
        prefix = name if weight == "weight" else name.rpartition(".")[0]
        out.update({f"{prefix}.{k}": s for k, s in _factor_shapes(owner, weight, rank).items()})
    return out


def lora_modules(model: nn.Module) -> list[tuple[str, LoRA]]:
    """The adapted modules, by name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRA)]


def lora_parameters(model: nn.Module, *, zero_only: bool = False) -> dict[str, nn.Parameter]:
    """The adapter factors by their names in ``model``, found by module type (:class:`LoRA`), in module order;
    ``zero_only``: just those that start at zero (``lora_B``, experts' ``B``)."""
    out = {}
    for name, module in lora_modules(model):
        for k, (p, zero) in module.lora_factors().items():
            if zero or not zero_only:
                out[f"{name}.{k}" if name else k] = p
    return out


# tensor names of the factors, as :meth:`LoRALinear.factor_shapes` / :meth:`WeightLoRA.factor_shapes` give them
_FACTOR_NAME = re.compile(r"\.lora_[AB]\.weight$|\.lora_\w+\.[AB]$")


def is_lora_param(name: str) -> bool:
    """Whether a tensor name read from a file or a checkpoint (no model at hand) is an adapter factor's. With a
    model, :func:`lora_parameters` finds them by module type."""
    return _FACTOR_NAME.search(name) is not None


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRA) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone, by their names in the model (state-dict order)."""
    names = lora_parameters(model)
    return {k: v for k, v in model.state_dict().items() if k in names}


def adapted_layers(model: nn.Module) -> list[str]:
    """Names of the layers carrying an adapter (as ``add_lora`` takes them): Linear layers, then expert weights,
    each in module order (the order adapter files list them in)."""
    linear, weights = [], []
    for name, module in lora_modules(model):
        if isinstance(module, LoRALinear):
            linear.append(name)
        else:
            weights += [f"{name}.{w}" for w in module.lora_weights()]
    return linear + weights


def mark_only_lora_trainable(model: nn.Module) -> None:
    factors = {id(p) for p in lora_parameters(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in factors)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is a plain one again (same state-dict keys,
    same modules and classes as its base)."""
    for _, module in lora_modules(model):
        module.merge_lora()
    return model
