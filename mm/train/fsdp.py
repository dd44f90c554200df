"""Fully sharded data parallel training (``train.fsdp``): parameters, gradients and optimizer state split over
the processes with torch's FSDP2 (``fully_shard``), one unit per transformer block.

Why FSDP2 applied by mm rather than accelerate's FSDP plugin: accelerate forces plain DDP whenever it runs on
CPUs (``Accelerator(cpu=True)``), so its FSDP path could only ever run on GPUs, untested by our suite; applying
``fully_shard`` ourselves under any multi-process launch runs the same code on 2 gloo CPU ranks in the tests and
on NCCL GPUs. Each ``Block`` of every tower is one unit (its parameters are all-gathered just before it runs and
freed after), the model root a last unit for the embeddings, norms and heads.

FSDP2 cannot shard 0-dim parameters (the logit scale and bias), so they stay whole on every rank outside FSDP
and their gradients are averaged by ``mm.utils.dist.average_gradients`` (what DDP would have done). Reading the model
whole (checkpoints, evaluation, the final save) is collective: :func:`full_state_dict` gathers it to the main
process on every rank's call. Evaluation runs on the main process on an unsharded copy built from that state
(:class:`EvalCopy`), so it needs one extra copy of the weights there; an ``eval.benchmark`` suite, which every
process scores its share of, needs that copy on every process.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..hub.wrapped import refuse_wrapped
from ..layers import Block
from ..models import model_class


def shard_model(model: nn.Module) -> list[nn.Parameter]:
    """Apply ``fully_shard`` to every Block, then to the root. Returns the parameters left whole (0-dim)."""
    from torch.distributed.fsdp import fully_shard

    refuse_wrapped(model, "FSDP (train.fsdp: one unit per mm Block)")
    replicated = [p for p in model.parameters() if p.ndim == 0]
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model, ignored_params=set(replicated))
    if hasattr(model, "embed"):  # the towers without a decoder (gradient caching's first pass) gather like forward
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "embed")
    return replicated


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. a gradient norm over sharded gradients), a tensor unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _options(everywhere: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # gathered to the main process, on the CPU: other ranks get empty dicts; everywhere: on every rank, on its device
    return StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)


def full_state_dict(model: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the main process (empty elsewhere; ``everywhere``: on every process).
    Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(everywhere))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter names, whole, on the main process. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], optimized: nn.Module | None = None) -> None:
    """Load whole state dicts (as saved from :func:`full_state_dict` / :func:`full_optimizer_state`) into the
    sharded model and its optimizer; every process passes the full dicts and keeps its shard. ``optimized``: the
    module whose parameters name the optimizer's (default: the model)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(optimized if optimized is not None else model, optimizer, optimizer_state, options=opts)


class EvalCopy:
    """An unsharded copy of the model on the main process (or on every process: an evaluation that every process
    runs, ``eval.benchmark``), refreshed from the sharded one before each use."""

    def __init__(self, model: nn.Module, device: torch.device, lora: Any = None):
        self.sharded, self.device, self.copy, self.lora = model, device, None, lora  # lora: the copy's adapters

    def refresh(self, is_main: bool, everywhere: bool = False) -> nn.Module | None:
        """Collective: every process calls it; the main process gets the up-to-date copy, the others None (with
        ``everywhere``, a copy of their own too)."""
        state = full_state_dict(self.sharded, everywhere)
        if not (is_main or everywhere):
            return None
        if self.copy is None:
            cfg = self.sharded.config
            self.copy = model_class(cfg)(cfg)
            if self.lora is not None:
                from ..layers.lora import add_lora

                add_lora(self.copy, self.lora)
        self.copy.load_state_dict(state)
        self.copy.to(self.device)
        self.copy.train(False)
        return self.copy
