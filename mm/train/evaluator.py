"""Evaluation during and after a run: the ``eval`` section's shard sets (zero-shot, retrieval, captioning) on the
main process while the others wait, then the ``eval.benchmark`` suite on every process (it shares the work out);
one log record of both."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..eval import evaluate
from ..utils import dist
from .benchmark import TrainingBenchmark
from .config import RunConfig
from .metrics import RunMetrics


class RunEvaluator:
    """``run(model, step, periodic)`` evaluates ``model`` (whole and unwrapped; every process calls it) and logs;
    ``results`` holds the main process's last results. ``everywhere``: whether every process needs a whole model
    (a benchmark suite), not only the main one."""

    def __init__(self, cfg: RunConfig, device: torch.device, metrics: RunMetrics):
        self.cfg, self.device, self.metrics = cfg, device, metrics
        e = cfg.eval
        self.shard_sets = bool(e.zeroshot.shards or e.retrieval.shards or e.captioning.shards)
        self.benchmark = None if not e.benchmark else TrainingBenchmark(
            e.benchmark, cfg.output_dir, batch_size=e.batch_size, workers=cfg.data.workers,
            precision=cfg.train.precision, log=metrics.info)
        self.results: dict[str, Any] = {}

    @property
    def enabled(self) -> bool:
        return self.shard_sets or self.benchmark is not None

    @property
    def everywhere(self) -> bool:
        return self.benchmark is not None

    def run(self, model: torch.nn.Module, step: int, periodic: bool = False) -> dict[str, Any]:
        """``periodic``: one during training, on at most ``eval.every_max_samples`` samples of each set."""
        cfg, results = self.cfg, {}
        if not self.enabled:
            return results
        main = dist.is_main()
        if main and self.shard_sets:
            results = evaluate(cfg.eval.periodic() if periodic else cfg.eval, model, self.device,
                               precision=cfg.train.precision, reading=cfg.data.reading(),
                               output_dir=Path(cfg.output_dir))
            for ex in results.pop("caption_examples", [])[: 0 if periodic else None]:  # examples at the end only
                self.metrics.info(f"caption {ex['key']}: {ex['caption']!r}   (reference: {ex['references'][0]!r})")
        if self.benchmark is not None:
            results.update(self.benchmark.run(model, step))
        if main and results:
            self.metrics.log({"step": step, **results})
        dist.barrier()
        self.results = results if main else {}
        return self.results
