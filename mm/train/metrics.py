"""The run's metrics: the step records (loss and its terms, learning rate, throughput, gradient norm, MoE routing)
and messages, through :class:`mm.train.log.RunLogger` on the main process (other processes print their own
notes prefixed with their rank)."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..layers import RouterStats
from ..models import ModelOutput
from .fsdp import plain
from .log import RunLogger


def routing_metrics(stats: dict[str, list[RouterStats]], layers: dict[str, list[int]]) -> dict[str, Any]:
    """``moe/<tower or modality>/<block>/load|dropped|entropy``: each MoE layer's fraction of assignments per
    expert (before capacity), fraction of assignments dropped over capacity and mean per-token router
    entropy (nats), in this process's last micro-batch. One device-to-host copy for all of them."""
    keys, rows = [], []
    for tower, per_layer in stats.items():
        for block, s in zip(layers[tower], per_layer):
            keys.append(f"moe/{tower}/{block}")
            rows.append(torch.cat([s.load, s.dropped_fraction[None], s.entropy[None]]).float())
    if not rows:
        return {}
    values, rec, start = torch.cat(rows).cpu().tolist(), {}, 0
    for key, row in zip(keys, rows):
        v, start = values[start : start + len(row)], start + len(row)
        rec[f"{key}/load"] = [round(x, 5) for x in v[:-2]]
        rec[f"{key}/dropped"], rec[f"{key}/entropy"] = v[-2], v[-1]
    return rec


class RunMetrics:
    """``open(step)`` before the loop, ``count(samples)`` per micro-batch, ``step_record(...)`` every
    ``train.log_every`` steps, ``info`` / ``note`` for messages, ``log`` for any record, ``close()`` at the end."""

    def __init__(self, out_dir: Path, total_steps: int, rank: int, main: bool):
        self.out_dir, self.total, self.rank, self.main = out_dir, total_steps, rank, main
        self.logger: RunLogger | None = None
        self.t_last, self.samples = time.time(), 0
        self.tokens = self.positions = 0

    def open(self, step: int) -> None:
        self.logger = RunLogger(self.out_dir, self.total, step, enabled=self.main)
        self.t_last, self.samples = time.time(), 0
        self.tokens = self.positions = 0

    def restart_clock(self) -> None:
        """Rates count from now (the loop's start: setup time is not a step's)."""
        self.t_last, self.samples = time.time(), 0
        self.tokens = self.positions = 0

    def info(self, msg: str) -> None:
        if self.logger is not None:
            self.logger.info(msg)

    def note(self, msg: str) -> None:
        """A message from any process: the log on the main one, a prefixed line on the others."""
        self.info(msg) if self.rank == 0 else print(f"[rank {self.rank}] {msg}")

    def log(self, record: dict[str, Any], show: bool = True) -> None:
        self.logger.log(record, show=show)

    def advance(self) -> None:
        self.logger.advance()

    def count(self, samples: int, tokens: int = 0, positions: int = 0) -> None:
        """A micro-batch of ``samples`` (all processes) whose images are ``tokens`` patches in ``positions`` sequence
        positions (NaFlex: the rest is padding)."""
        self.samples += samples
        self.tokens += tokens
        self.positions += positions

    def step_record(self, step: int, end: int, every: int, losses: dict[str, torch.Tensor], out: ModelOutput, *,
                    lr: float, logit_scale: float, norm: torch.Tensor | None, skipped_samples: int,
                    skipped_steps: int, extra: Callable[[float], dict[str, Any]],
                    moe_layers: dict[str, list[int]]) -> None:
        """The step's record: loss, its terms, the rates since the last record, ``extra(seconds since the last
        record)`` (the executor's: gradient caching's passes), and (own record) MoE routing."""
        dt = time.time() - self.t_last
        rec = {"step": step, "loss": losses["loss"].item(), "lr": lr,
               "samples_per_s": self.samples / max(dt, 1e-9), "skipped_samples": skipped_samples,
               "skipped_steps": skipped_steps, "logit_scale": logit_scale,
               "grad_norm": float(plain(norm)) if norm is not None else None,
               "eta_s": (end - step) * dt / every}
        if self.positions:  # image patches per second (real ones), and the share of positions that were padding
            rec.update(tokens_per_s=self.tokens / max(dt, 1e-9), padding=1 - self.tokens / self.positions)
        rec.update({k: v.item() for k, v in losses.items() if k != "loss"})  # the task's terms
        rec.update(extra(dt))
        self.log(rec)
        self.tokens = self.positions = 0
        if self.main and out.router_stats:  # own record: per-layer lists would crowd the console line
            self.log({"step": step, **routing_metrics(out.router_stats, moe_layers)}, show=False)
        self.t_last, self.samples = time.time(), 0

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
