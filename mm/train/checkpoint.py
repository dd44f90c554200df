"""Training checkpoints: atomic, resumable, pruned.

A checkpoint is a directory ``output_dir/checkpoints/step_N/`` with ``model.safetensors``,
``optimizer.pt`` + ``scheduler.pt`` (plain tensors and numbers: loaded with ``weights_only=True``),
``trainer_state.json`` and, per process, ``rank_R.pt`` (RNG states) and ``data_rank_R.json`` (the data
stream position). It is written as ``step_N.tmp`` and renamed when every process has finished, so a
crash or kill -9 mid-write never leaves a directory that ``resume: auto`` would pick.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def tmp_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step}.tmp"


def save_main(root: str | Path, step: int, model: torch.nn.Module, optimizer, scheduler, state: dict, *,
              model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Main process: model, optimizer, scheduler and trainer state into ``step_N.tmp``. ``model_state`` /
    ``optimizer_state``: already gathered state dicts (a sharded model's), used instead of the modules'."""
    from safetensors.torch import save_file

    d = tmp_dir(root, step)
    if d.exists():
        shutil.rmtree(d)  # left over from a crash
    d.mkdir(parents=True)
    model_state = model.state_dict() if model_state is None else model_state
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(d / "model.safetensors"))
    if os.environ.get("MM_FAULT_KILL_IN_CHECKPOINT") == str(step):
        # fault injection for the crash-safety test: die like kill -9 half-way through this checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, d / "optimizer.pt")
    torch.save(scheduler.state_dict(), d / "scheduler.pt")
    (d / "trainer_state.json").write_text(json.dumps(state, indent=1))
    return d


def save_rank(root: str | Path, step: int, rank: int, data_state: dict) -> None:
    """Every process: its RNG states and data position (after the main process created the directory)."""
    d = tmp_dir(root, step)
    torch.save(rng_state(), d / f"rank_{rank}.pt")
    (d / f"data_rank_{rank}.json").write_text(json.dumps(data_state))


def publish(root: str | Path, step: int, keep: int) -> Path:
    """Main process, after all ranks wrote: atomically rename, then prune to the newest ``keep``."""
    src, dst = tmp_dir(root, step), Path(root) / f"step_{step}"
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def load(ckpt: str | Path, rank: int) -> dict[str, Any]:
    """Everything needed to resume, for process ``rank``; tensors stay on CPU."""
    from safetensors.torch import load_file

    d = Path(ckpt)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"checkpoint {d} is incomplete: {name} is missing")
    out = {
        "model": load_file(str(d / "model.safetensors")),
        "optimizer": torch.load(d / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(d / "scheduler.pt", weights_only=True),
        "state": json.loads((d / "trainer_state.json").read_text()),
        "rng": None,
        "data": None,
    }
    if (d / f"rank_{rank}.pt").is_file():
        out["rng"] = torch.load(d / f"rank_{rank}.pt", weights_only=True)
    if (d / f"data_rank_{rank}.json").is_file():
        out["data"] = json.loads((d / f"data_rank_{rank}.json").read_text())
    return out
