"""What a run's state is, and how it is written, read and finished: one strategy per kind of run, so that the
trainer's save / resume / finish hold no branches of their own.

- :class:`PlainState`: the model's and the optimizer's own state dicts (one process, DDP).
- :class:`ShardedState` (``train.fsdp`` over several processes): whole state dicts gathered from the FSDP2 shards
  to the main process (a collective every process takes), loaded back into the shards; evaluation and ``final/``
  use an unsharded copy (:class:`mm.train.fsdp.EvalCopy`).
- :class:`AdapterState` (``train.lora``): the adapters alone (the frozen base is ``train.init_from``'s, its hash
  recorded and checked on resume); ``final/`` is a peft-layout adapter directory naming its base.
  :class:`ShardedAdapterState`: the same under ``train.fsdp``, the adapters gathered from their shards.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..hub import base_sha256, load_state_dict_checked, save_adapter, save_pretrained
from ..layers.lora import lora_state_dict
from ..utils import dist
from ..utils.nn import params_sha256
from . import fsdp as sharding
from .step import TrainingError


class PlainState:
    """A whole model on every process."""

    sharded = False

    def __init__(self, core: nn.Module, optimizer: torch.optim.Optimizer):
        self.core, self.opt = core, optimizer

    def gather(self) -> dict[str, Any]:
        """What the checkpoint writes instead of the modules' own state dicts (collective where sharded)."""
        return {}

    def record(self) -> dict[str, Any]:
        """Entries of the checkpoint's trainer state that this kind of run needs on resume."""
        return {}

    def load(self, state: dict[str, Any], path: Path) -> None:
        """Model and optimizer from a checkpoint read by :func:`mm.train.checkpoint.load`."""
        self.core.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])

    def adopt(self, params: list[nn.Parameter]) -> None:
        """Parameters the optimizer holds beside the model's (the objective's own, e.g. distillation's
        projection): the model's state strategy saves the model; the task saves these."""
        return None

    def sync_grads(self) -> None:
        """Gradients the data-parallel wrapper does not average (FSDP2's replicated scalars)."""
        return None

    def whole(self, main: bool, everywhere: bool = False) -> nn.Module | None:
        """The whole, unsharded model to evaluate and save (collective where sharded: every process calls it);
        None on a process that holds none."""
        return self.core

    def hashes(self, whole: nn.Module | None) -> list[str]:
        """Every process's weight hash (the main process's list is complete): replicas must be equal."""
        return dist.gather_object(params_sha256(self.core))

    def save_final(self, directory: Path, whole: nn.Module | None) -> None:
        save_pretrained(whole if whole is not None else self.core, directory)


class ShardedState(PlainState):
    sharded = True

    def __init__(self, core: nn.Module, optimizer: torch.optim.Optimizer, eval_copy: sharding.EvalCopy,
                 replicated: list[nn.Parameter]):
        super().__init__(core, optimizer)
        self.eval_copy, self.replicated = eval_copy, replicated
        self.optimized = core  # what names the optimizer's parameters in its sharded state dict

    def adopt(self, params: list[nn.Parameter]) -> None:
        # torch's sharded optimizer state dict names every optimizer parameter by a module path: the objective's
        # parameters get theirs under "task" (the model's under "model"; a run without any keeps plain names)
        if params:
            self.optimized = nn.ModuleDict({"model": self.core, "task": nn.ParameterList(params)})

    def sync_grads(self) -> None:
        dist.average_gradients(self.replicated)  # the 0-dim scalars FSDP2 cannot shard

    def gather(self) -> dict[str, Any]:
        return {"model_state": sharding.full_state_dict(self.core),
                "optimizer_state": sharding.full_optimizer_state(self.optimized, self.opt)}

    def load(self, state: dict[str, Any], path: Path) -> None:
        sharding.load_full_state(self.core, self.opt, state["model"], state["optimizer"], self.optimized)

    def whole(self, main: bool, everywhere: bool = False) -> nn.Module | None:
        return self.eval_copy.refresh(main, everywhere=everywhere)

    def hashes(self, whole: nn.Module | None) -> list[str]:
        return [params_sha256(whole)] if whole is not None else []  # one whole copy: one hash


class AdapterState(PlainState):
    """LoRA: the adapters are the run's weights; ``base`` is what the adapter names as its base."""

    def __init__(self, core: nn.Module, optimizer: torch.optim.Optimizer, lora: Any, base: str | None,
                 base_hash: str | None = None):
        super().__init__(core, optimizer)
        self.lora, self.base = lora, base
        # the frozen base's: a resume must rebuild the same one
        self.base_hash = base_hash if base_hash is not None else base_sha256(core)

    def gather(self) -> dict[str, Any]:
        return {"model_state": lora_state_dict(self.core)}

    def record(self) -> dict[str, Any]:
        return {"lora_base_sha256": self.base_hash}

    def load(self, state: dict[str, Any], path: Path) -> None:
        self._check(state, path)
        load_state_dict_checked(self.core, {**self.core.state_dict(), **state["model"]}, source=str(path))
        self.opt.load_state_dict(state["optimizer"])

    def _check(self, state: dict[str, Any], path: Path) -> None:
        if state["state"].get("lora_base_sha256") != self.base_hash:
            raise TrainingError(f"{path} was trained on other base weights than train.init_from gives now "
                                "(train.lora's base changed); resume with the same base")
        if set(state["model"]) != set(lora_state_dict(self.core)):
            raise TrainingError(f"{path}: its adapter tensors are not this run's train.lora layers")

    def save_final(self, directory: Path, whole: nn.Module | None) -> None:
        save_adapter(self.core, directory, self.lora, base=self.base, base_hash=self.base_hash)


class ShardedAdapterState(AdapterState):
    """LoRA under ``train.fsdp``: the adapters sharded with their layers; checkpoints hold them whole (gathered:
    collective) with their optimizer state by name, ``final/`` is the adapter directory of the unsharded copy."""

    sharded = True

    def __init__(self, core: nn.Module, optimizer: torch.optim.Optimizer, lora: Any, base: str | None,
                 base_hash: str, eval_copy: sharding.EvalCopy, replicated: list[nn.Parameter]):
        super().__init__(core, optimizer, lora, base, base_hash)
        self.eval_copy, self.replicated = eval_copy, replicated

    def gather(self) -> dict[str, Any]:
        adapters = {k: sharding.plain(v) for k, v in lora_state_dict(self.core).items()}
        if not dist.is_main():
            adapters = {}
        return {"model_state": adapters, "optimizer_state": sharding.full_optimizer_state(self.core, self.opt)}

    def load(self, state: dict[str, Any], path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        self._check(state, path)
        set_model_state_dict(self.core, state["model"], options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(self.core, self.opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))

    def sync_grads(self) -> None:
        dist.average_gradients(self.replicated)

    def whole(self, main: bool, everywhere: bool = False) -> nn.Module | None:
        return self.eval_copy.refresh(main, everywhere=everywhere)

    def hashes(self, whole: nn.Module | None) -> list[str]:
        return [params_sha256(whole)] if whole is not None else []

    def save_final(self, directory: Path, whole: nn.Module | None) -> None:
        save_adapter(whole, directory, self.lora, base=self.base, base_hash=self.base_hash)
