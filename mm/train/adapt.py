"""Adapting a pretrained model in a training run: start from its weights (``train.init_from``), freeze
parts of it (``train.freeze``: LiT locks the image tower), and give the rest their own learning rates
(``train.lr_mult`` per tower, ``train.layer_decay`` per depth as in BEiT / timm).

Selectors name parameters: a tower (a top-level part of the model: ``vision``, ``text``, ``decoder``;
a one-tower model's shared ``transformer``; ``logit_scale``) selects everything under it; anything else
is a glob over parameter names (``vision.transformer.blocks.[0-3].*``, ``*.norm*``). A selector matching
no parameter is a config error naming its key, raised before any work starts.

Frozen parameters get ``requires_grad=False`` and so never reach the optimizer; every module whose
parameters are all frozen (a whole tower, a block) is kept in eval mode (:func:`set_train_mode`), so
dropout, drop-path and patch dropout are off there and MoE routers route with their eval capacity and no
jitter: a frozen tower computes what it computes at inference, as LiT intends.
"""
from __future__ import annotations

import fnmatch
import re

import torch
from torch import nn

from ..config import ConfigError
from ..hub import load_model, load_state_dict_checked, load_weights, parse_spec
from ..hub.wrapped import refuse_wrapped
from ..layers.config import LoraConfig
from ..layers.lora import LoraError, add_lora, lora_targets, mark_only_lora_trainable
from ..models import model_class
from .config import RunConfig

# leaves of a tower that feed its first block: the "embeddings" of layer-wise decay
_EMBED_LEAVES = ("patch_embed", "cls_token", "pos_embed", "norm_pre", "token_embedding", "modality_embed")
_BLOCK = re.compile(r"^(?:(\w+)\.)?transformer\.blocks\.(\d+)\.")


# -- init_from -----------------------------------------------------------------------------------
def load_init_weights(model: nn.Module, spec: str) -> None:
    """Copy the weights ``spec`` names into ``model`` (strict: every tensor, same shapes; errors name the
    first offender). Open_clip state dicts are converted exactly (``mm.hub.load_weights``)."""
    if parse_spec(spec).kind not in ("dir", "open_clip"):  # a weights file
        load_weights(model, spec)
        return
    source = load_model(spec, names={"spec": "train.init_from"})  # an mm directory (hash-checked) or open_clip's registry
    refuse_wrapped(source, f"train.init_from {spec}")  # the preflight says so first; library callers see it here
    load_state_dict_checked(model, source.state_dict(), source=spec)


# -- selecting parameters --------------------------------------------------------------------------
def towers(model: nn.Module) -> list[str]:
    """Top-level names a selector may use as a whole: child modules and direct parameters."""
    return [n for n, _ in model.named_children()] + [n for n, _ in model.named_parameters(recurse=False)]


def matches(selector: str, name: str, tower_names: list[str]) -> bool:
    if selector in tower_names:
        return name == selector or name.startswith(selector + ".")
    return fnmatch.fnmatchcase(name, selector)


def is_frozen(name: str, selectors: list[str], tower_names: list[str]) -> bool:
    """Whether ``train.freeze`` freezes parameter ``name``: the last selector matching it decides, a selector
    starting with ``!`` keeping it trainable (``["*", "!decoder.*.cross_attn.*"]``: everything but cross-attention)."""
    frozen = False
    for s in selectors:
        keep = s.startswith("!")
        if matches(s[1:] if keep else s, name, tower_names):
            frozen = not keep
    return frozen


def check_selectors(cfg: RunConfig) -> None:
    """Every ``train.freeze`` / ``train.lr_mult`` entry must select a parameter of the model; all of them
    frozen is an error too. The model is built on the meta device (names only, no memory, no init)."""
    t = cfg.train
    if not (t.freeze or t.lr_mult):
        return
    mcfg = cfg.model_config()
    with torch.device("meta"):
        model = model_class(mcfg)(mcfg)
    names, top = [n for n, _ in model.named_parameters()], towers(model)
    for key, selectors in (("train.freeze", t.freeze), ("train.lr_mult", list(t.lr_mult))):
        for s in selectors:
            if not any(matches(s.removeprefix("!") if key == "train.freeze" else s, n, top) for n in names):
                raise ConfigError(f"{key}: {s!r} matches no parameter (towers: {', '.join(top)}; or a glob over "
                                  f"parameter names such as {names[len(names) // 2]!r})")
    if t.freeze and all(is_frozen(n, t.freeze, top) for n in names):
        raise ConfigError(f"train.freeze: {t.freeze} freezes every parameter; nothing would train")


def freeze(model: nn.Module, selectors: list[str]) -> list[str]:
    """``requires_grad=False`` for the selected parameters; returns the names of the modules to keep in eval
    mode (the outermost modules whose parameters are all frozen)."""
    top = towers(model)
    for name, p in model.named_parameters():
        if is_frozen(name, selectors, top):
            p.requires_grad_(False)
    return frozen_modules(model)


def frozen_modules(model: nn.Module) -> list[str]:
    out: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in out):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(name)
    return out


def set_train_mode(model: nn.Module, frozen: list[str]) -> None:
    """Training mode, except the frozen modules. Set once at the start of a run: evaluation and generation
    (``eval_mode``) restore every module's own mode afterwards, so the frozen ones stay in eval mode."""
    model.train()
    for name in frozen:
        model.get_submodule(name).eval()


# -- learning-rate scales ------------------------------------------------------------------------
def layer_ids(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Parameter name -> (layer id, depth L) for layer-wise decay: embeddings 0, block i of a stack of L
    layers i + 1, everything after the stack (final norm, pooling, projection, LM head, logit scale) L + 1.
    A stack holding 2 blocks per layer (CoCa's decoder) counts layers, not blocks. Every stack is scaled by
    its own depth; embeddings shared by a one-tower model take the shared stack's."""
    stacks: dict[str, tuple[int, int]] = {}  # prefix -> (blocks, depth)
    for name, module in model.named_modules():
        if name == "transformer" or name.endswith(".transformer"):
            prefix = name[: -len("transformer")]
            stacks[prefix] = (len(module.blocks), module.cfg.depth)
    deepest = max((d for _, d in stacks.values()), default=0)
    out = {}
    for name, _ in model.named_parameters():
        m = _BLOCK.match(name)
        if m:
            prefix = f"{m.group(1)}." if m.group(1) else ""
            n_blocks, depth = stacks[prefix]
            out[name] = (int(m.group(2)) * depth // n_blocks + 1, depth)
            continue
        tower, _, rest = name.partition(".")
        depth = stacks.get(f"{tower}.", (0, deepest))[1] if rest else deepest
        embedding = tower in _EMBED_LEAVES or rest.split(".")[0] in _EMBED_LEAVES
        out[name] = (0 if embedding else depth + 1, depth)
    return out


def lr_scales(model: nn.Module, lr_mult: dict[str, float], layer_decay: float | None) -> dict[str, float]:
    """Parameter name -> learning-rate multiplier: the last ``lr_mult`` entry selecting it (1 if none) times
    ``layer_decay ** (L + 1 - layer id)`` (BEiT: block i of L gets decay^(L - i), embeddings decay^(L + 1),
    heads 1)."""
    top = towers(model)
    ids = layer_ids(model) if layer_decay is not None else {}
    scales = {}
    for name, _ in model.named_parameters():
        s = 1.0
        for sel, mult in lr_mult.items():
            if matches(sel, name, top):
                s = float(mult)
        if layer_decay is not None:
            layer, depth = ids[name]
            s *= layer_decay ** (depth + 1 - layer)
        scales[name] = s
    return scales


def check_lora(cfg: RunConfig) -> None:
    """``train.lora``'s targets must select layers of the model, each wide enough for the rank: checked on the
    model built on the meta device, before any work."""
    if cfg.train.lora is None:
        return
    mcfg = cfg.model_config()
    with torch.device("meta"):
        model = model_class(mcfg)(mcfg)
    try:
        lora_targets(model, cfg.train.lora)
    except LoraError as e:
        raise ConfigError(f"train.{e}") from None


def add_adapters(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Adapters on the layers ``lora`` targets, everything else frozen; returns the frozen modules."""
    add_lora(model, lora)
    mark_only_lora_trainable(model)
    return frozen_modules(model)


def prepare(model: nn.Module, cfg: RunConfig) -> tuple[list[str], dict[str, float] | None]:
    """Apply ``train.init_from`` and ``train.freeze`` (or ``train.lora``: adapters, the base frozen) to a freshly
    built model; returns the frozen modules (for :func:`set_train_mode`) and the learning-rate scales (None when
    every one is 1)."""
    t = cfg.train
    if t.init_from:
        load_init_weights(model, t.init_from)
    if t.lora is not None:
        frozen = add_adapters(model, t.lora)
    else:
        frozen = freeze(model, t.freeze) if t.freeze else []
    scales = lr_scales(model, t.lr_mult, t.layer_decay) if (t.lr_mult or t.layer_decay is not None) else None
    return frozen, scales
