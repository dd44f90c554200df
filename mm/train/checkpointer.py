"""Checkpoints of a run: what is written at ``step_N`` (model and optimizer as the run's state strategy gathers
them, scheduler, the stepper's and the task's own state, every process's RNG state and data position) and read
back on resume (:mod:`mm.train.checkpoint` holds the file format and the crash-safe publish)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..utils import dist
from . import checkpoint as ckpt
from .config import RunConfig
from .feed import Feed
from .state import PlainState
from .step import Stepper, TrainingError
from .tasks import Task


def find_resume(cfg: RunConfig) -> Path | None:
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        found = ckpt.complete_checkpoints(Path(cfg.output_dir) / "checkpoints")
        return found[-1] if found else None
    return Path(cfg.train.resume)


class Checkpointer:
    """``save(step)`` (every process calls it) and ``resume(path)`` (returns the step to continue from), over the
    run's parts. ``resumed_from`` / ``rng`` are the last resume's checkpoint and this process's RNG state in it."""

    def __init__(self, cfg: RunConfig, state: PlainState, task: Task, stepper: Stepper, sched: Any, feed: Feed):
        self.cfg, self.state, self.task, self.stepper, self.sched, self.feed = cfg, state, task, stepper, sched, feed
        self.root = Path(cfg.output_dir) / "checkpoints"
        self.resumed_from: Path | None = None
        self.rng: dict[str, Any] | None = None

    def save(self, at: int) -> None:
        """Checkpoint ``step_{at}``: written under a temporary name by every process, then published."""
        gathered = self.state.gather()  # collective where sharded: every process takes part
        if dist.is_main():
            record = {"step": at, "world_size": dist.world_size(), "fsdp": self.state.sharded,
                      "batches": self.feed.state.batches, **self.stepper.state_dict(), **self.state.record()}
            ckpt.save_main(self.root, at, self.state.core, self.state.opt, self.sched, record, **gathered)
            self.task.save(ckpt.tmp_dir(self.root, at))
        dist.barrier()
        ckpt.save_rank(self.root, at, dist.rank(), self.feed.state.to_json(self.feed.workers_per_process))
        dist.barrier()
        if dist.is_main():
            ckpt.publish(self.root, at, self.cfg.train.keep_checkpoints)
        dist.barrier()

    def resume(self, path: Path | None = None) -> int | None:
        """Continue from ``path`` (default: ``train.resume``'s choice, e.g. the newest complete checkpoint):
        weights, optimizer, scheduler, scaler, counters, this process's data position and RNG state. Returns the
        step the checkpoint was written at (None: nothing to resume)."""
        path = path if path is not None else find_resume(self.cfg)
        if path is None:
            return None
        state = ckpt.load(path, dist.rank())
        sharded = self.state.sharded
        if bool(state["state"].get("fsdp", False)) != sharded:
            raise TrainingError(f"{path} was written {'without' if sharded else 'with'} a sharded model "
                                f"(train.fsdp={not sharded} over several processes); resume it the same way (the "
                                "optimizer state is stored differently)")
        self.state.load(state, path)
        self.task.load(path)
        self.sched.load_state_dict(state["scheduler"])
        self.stepper.load_state_dict(state["state"])
        same = state["state"]["world_size"] == dist.world_size()
        if not self.feed.restore(state["data"], state["state"].get("batches", 0), same) and dist.is_main():
            print(f"warning: resuming with a different number of processes x workers than {path} was written "
                  "with; the data stream restarts its shuffle order (not bit-exact)")
        self.resumed_from, self.rng = path, state["rng"]
        return state["state"]["step"]
