"""The one conversion-rule engine of every foreign checkpoint layout (open_clip, Hugging Face ``transformers``).

A converter is a table of rules (:class:`Rule`): each names foreign key patterns, mm key patterns and a
:class:`Transform` holding both directions (``to_mm``, and ``from_mm``, its exact inverse). :func:`plan` expands a
table for one model into :class:`Plan` steps (rules inside a Transformer stack over its layers; a rule applies
where its condition holds and the mm model has its tensors), refusing an mm tensor that no rule takes; the plan is
then read one way or the other (:meth:`Plan.to_mm`, :meth:`Plan.from_mm`), each direction first checking the
state dict it is given against the model (shapes, missing and unexpected keys, all named). Reading one table both
ways is what makes ``from_mm(to_mm(sd))`` give back ``sd`` bit for bit.

What differs between layouts is only their tables (``mm.hub.open_clip``, ``mm.hub.hf``) and the transforms their
layouts need beyond the common ones below.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

Tensors = list[torch.Tensor]


class ConversionError(ValueError):
    """A state dict or config does not fit the conversion; the message names the offending key."""


@dataclass(frozen=True)
class Transform:
    """How the tensors of one rule turn into each other: ``to_mm`` maps the foreign tensors (in the rule's key
    order) to the mm tensors, ``from_mm`` is its exact inverse."""

    to_mm: Callable[[Tensors], Tensors]
    from_mm: Callable[[Tensors], Tensors]


# Transforms copy only what they must: a plain COPY returns its input (as ``state_dict()`` returns the
# model's own tensors), while split parts are cloned so that no two results share storage (safetensors
# refuses to save tensors that do) and transposes are made contiguous.

def _split_q_kv(ts: Tensors) -> Tensors:
    d = ts[0].shape[0] // 3
    return [ts[0][:d].clone(), ts[0][d:].clone()]


def _transpose(ts: Tensors) -> Tensors:
    return [ts[0].t().contiguous()]


def packed(parts: int) -> Transform:
    """``parts`` foreign tensors kept apart <-> one mm tensor packing them in that order (dim 0): q, k, v -> qkv;
    SwiGLU's gate, up -> fc1. Parts are cloned, so no two foreign tensors share storage."""
    return Transform(lambda ts: [torch.cat(ts)], lambda ts: [t.clone() for t in ts[0].chunk(parts)])


COPY = Transform(lambda ts: ts, lambda ts: ts)
# leading singleton dims: (1, N, W) <-> mm's (N, W), (1,) <-> a scalar
SQUEEZE = Transform(lambda ts: [ts[0].squeeze(0)], lambda ts: [ts[0].unsqueeze(0)])
# (1, 1, W) <-> mm's (W)
FLATTEN = Transform(lambda ts: [ts[0].reshape(-1)], lambda ts: [ts[0].reshape(1, 1, -1)])
# x @ P (open_clip) == Linear with weight P.T (mm)
TRANSPOSE = Transform(_transpose, _transpose)
# packed [q; k; v] (weights or biases) <-> mm cross-attention's q and packed [k; v]
PACKED_TO_Q_KV = Transform(_split_q_kv, lambda ts: [torch.cat(ts)])
# MultiheadAttention with kdim != embed_dim keeps q, k, v weights apart; mm packs [k; v]
SEPARATE_TO_Q_KV = Transform(lambda ts: [ts[0], torch.cat(ts[1:])],
                             lambda ts: [ts[0], *(t.clone() for t in ts[1].chunk(2))])

TransformOf = Transform | Callable[[Any], Transform]  # a transform, or the config's transform (RoPE channels)


@dataclass(frozen=True)
class Rule:
    """Foreign keys <-> mm keys through ``transform``.

    Patterns are ``str.format`` templates filled per step: ``{i}`` is the layer index when ``layers`` names a
    stack, and a converter may add fields of its own (open_clip's ``{text}`` prefix and CoCa block indices). A
    rule applies when ``when`` (if set) holds for the config, its stack (if any) exists, and its mm keys exist in
    the mm model (optional parts: logit bias, LayerScale, class tokens, pooling heads, decoder)."""

    foreign: tuple[str, ...]
    mm: tuple[str, ...]
    transform: TransformOf = COPY
    layers: str | None = None
    when: Callable[[Any], bool] | None = None


def rule(foreign: str | tuple[str, ...], mm: str | tuple[str, ...], transform: TransformOf = COPY, *,
         layers: str | None = None, when: Callable[[Any], bool] | None = None) -> Rule:
    """A :class:`Rule`; a single key may be given as a string."""
    return Rule((foreign,) if isinstance(foreign, str) else foreign, (mm,) if isinstance(mm, str) else mm,
                transform, layers, when)


def params(foreign: str, mm: str, transform: TransformOf = COPY, *, layers: str | None = None,
           when: Callable[[Any], bool] | None = None) -> list[Rule]:
    """Rules for the ``weight`` and ``bias`` of a LayerNorm or Linear."""
    return [rule(f"{foreign}.{n}", f"{mm}.{n}", transform, layers=layers, when=when) for n in ("weight", "bias")]


class Step(NamedTuple):
    """One expanded rule: concrete foreign keys, mm keys, and the transform between them."""

    foreign: tuple[str, ...]
    mm: tuple[str, ...]
    transform: Transform


def expand(rules: Iterable[Rule], cfg: Any, depths: Mapping[str, int],
           fields: Callable[[int], Mapping[str, Any]] = lambda i: {"i": i},
           present: Mapping[str, Any] | None = None) -> list[Step]:
    """``rules`` expanded for ``cfg``: a rule applies when its ``when`` holds and its stack is in ``depths``
    (stack name -> layer count); a stack's rule gives one step per layer, with its patterns filled from
    ``fields(layer)`` (``fields(0)`` for other rules). With ``present``, only steps whose mm keys all exist there."""
    steps: list[Step] = []
    for r in rules:
        if (r.when is not None and not r.when(cfg)) or (r.layers and r.layers not in depths):
            continue
        transform = r.transform if isinstance(r.transform, Transform) else r.transform(cfg)
        for i in range(depths[r.layers]) if r.layers else (0,):
            fmt = fields(i)
            mm_keys = tuple(p.format(**fmt) for p in r.mm)
            if present is None or all(k in present for k in mm_keys):
                steps.append(Step(tuple(p.format(**fmt) for p in r.foreign), mm_keys, transform))
    return steps


def check_keys(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str,
               ignore: Callable[[str], bool] | None = None) -> None:
    """Raise one :class:`ConversionError` (``what: ...``) naming the first tensor of ``sd`` whose shape differs, then
    the missing and unexpected keys by name; ``ignore`` exempts keys from being unexpected."""
    problems = []
    bad = [k for k, v in sd.items() if k in expected and tuple(v.shape) != expected[k]]
    if bad:
        problems.append(f"{bad[0]!r} has shape {tuple(sd[bad[0]].shape)}, expected {expected[bad[0]]}"
                        + (f" ({len(bad)} tensors have wrong shapes)" if len(bad) > 1 else ""))
    unexpected = [k for k in sd if k not in expected and not (ignore is not None and ignore(k))]
    for label, keys in (("missing", [k for k in expected if k not in sd]), ("unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {label} key(s): {', '.join(map(repr, keys[:5]))}{more}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


@dataclass(frozen=True)
class Plan:
    """A rule table expanded for one mm model: ``steps`` covering every tensor of ``reference`` (the mm model's
    state dict, usually on the meta device: names and shapes)."""

    steps: tuple[Step, ...]
    reference: Mapping[str, torch.Tensor]

    def foreign_shapes(self) -> dict[str, tuple[int, ...]]:
        """The foreign state dict's keys and shapes, found by reading the reference backwards."""
        out: dict[str, tuple[int, ...]] = {}
        for s in self.steps:
            out.update(zip(s.foreign, (tuple(x.shape) for x in s.transform.from_mm([self.reference[k] for k in s.mm]))))
        return out

    def to_mm(self, sd: Mapping[str, torch.Tensor], what: str, ignore: Callable[[str], bool] | None = None
              ) -> dict[str, torch.Tensor]:
        """Foreign state dict -> mm state dict, after :func:`check_keys` against :meth:`foreign_shapes`."""
        check_keys(sd, self.foreign_shapes(), what, ignore)
        out: dict[str, torch.Tensor] = {}
        for s in self.steps:
            out.update(zip(s.mm, s.transform.to_mm([sd[k] for k in s.foreign])))
        return out

    def from_mm(self, sd: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        """mm state dict -> foreign state dict, after :func:`check_keys` against the reference."""
        check_keys(sd, {k: tuple(v.shape) for k, v in self.reference.items()}, what)
        out: dict[str, torch.Tensor] = {}
        for s in self.steps:
            out.update(zip(s.foreign, s.transform.from_mm([sd[k] for k in s.mm])))
        return out


def plan(rules: Iterable[Rule], cfg: Any, reference: Mapping[str, torch.Tensor], depths: Mapping[str, int], *,
         unmatched: str, fields: Callable[[int], Mapping[str, Any]] = lambda i: {"i": i}) -> Plan:
    """:func:`expand` ``rules`` for the mm model whose state dict is ``reference`` (only steps whose mm tensors it
    has). An mm tensor no step takes is refused (an mm feature the converter's config checks do not know yet):
    ``ConversionError(unmatched.format(key=...))``."""
    steps = expand(rules, cfg, depths, fields, present=reference)
    covered = {k for s in steps for k in s.mm}
    left = [k for k in reference if k not in covered]
    if left:
        raise ConversionError(unmatched.format(key=left[0]))
    return Plan(tuple(steps), reference)
