"""``eval.benchmark``: an ``mm benchmark`` suite (:mod:`mm.eval.benchmark`) run on the model being trained at each
evaluation of the run (every ``eval.every`` steps and at the end).

Each evaluation writes ``RUN_DIR/benchmark/step_N/``: clip_benchmark's result JSON per (dataset, task), recorded
as model ``output_dir`` / pretrained ``step_N``, and ``results.csv`` / ``results.md``; and returns the metrics the
run logs with its other evaluation metrics: ``benchmark/{dataset}/{task}`` (that entry's main metric) and
``benchmark_average`` (their mean: the average row of results.csv). The suite is the file ``mm benchmark --suite``
reads, without ``models`` (the model is the run's); :func:`check_suite` checks it before any training work, as
``mm benchmark`` checks a suite before it loads a model.

Every process takes part (``run_benchmark`` shares the encoding out over the processes and gathers it); the main
process writes the result files and logs.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..eval.benchmark import (BenchmarkError, ModelRef, Suite, TaskOptions, check_entry, entries, load_suite,
                              main_metric, run_benchmark, summary_rows, write_summary)
from ..utils import dist
from ..utils.precision import autocast_dtype

KEY = "eval.benchmark"
SPLIT = "test"  # the split mm benchmark scores by default (its --split)


def check_suite(path: str, has_decoder: bool = True) -> Suite:
    """Read ``path`` and check what ``mm benchmark`` checks before loading a model (:func:`check_entry`: every
    dataset resolves, its tasks exist, a classification dataset has its class names, the splits' shards are all
    there), plus that the suite names no models. ``has_decoder``: whether the trained model can caption (the ``captioning`` task).
    Raises ConfigError ``eval.benchmark: ...`` naming the problem."""
    try:
        suite = load_suite(path)
        if suite.models:
            raise BenchmarkError(f"{path} lists models ({suite.models[0].label}, ...); during training the model is "
                                 "the one being trained: remove the suite's 'models' key")
        for entry in entries([ModelRef(KEY)], suite.datasets):
            _, task = check_entry(entry, suite.dataset_root, SPLIT)
            if task == "captioning" and not has_decoder:
                raise BenchmarkError(f"dataset {entry.dataset!r}: task captioning needs a model with a decoder "
                                     "(e.g. model: tiny-coca)")
    except BenchmarkError as e:
        raise ConfigError(f"{KEY}: {e}") from None
    return suite


class TrainingBenchmark:
    """The suite of ``eval.benchmark`` (checked again at construction) and how this run scores it."""

    def __init__(self, path: str, run_dir: str | Path, *, batch_size: int, workers: int, precision: str,
                 log: Callable[[str], None]):
        self.suite = check_suite(path)
        self.run_dir, self.batch_size, self.workers = Path(run_dir), batch_size, workers
        self.autocast_dtype = autocast_dtype(precision)
        self.log = log
        self.name = str(run_dir).rstrip("/")  # the model name results record: the run, as `mm benchmark` names a dir

    def output(self, step: int) -> Path:
        return self.run_dir / "benchmark" / f"step_{step}"

    def run(self, model: Any, step: int) -> dict[str, Any]:
        """Score ``model`` (whole and unwrapped, on every process) on the suite at ``step``; every process calls it.
        Returns the metrics to log (on every process; only the main one writes files and logs lines)."""
        ref = ModelRef(self.name, f"step_{step}")
        main = dist.is_main()
        # overwrite: a resumed run evaluating a step again scores the model it has now, never an earlier timeline's
        outcomes = run_benchmark(entries([ref], self.suite.datasets), lambda _ref: model, self.output(step),
                                 dataset_root=self.suite.dataset_root, split=SPLIT, batch_size=self.batch_size,
                                 workers=self.workers, autocast_dtype=self.autocast_dtype, overwrite=True,
                                 options=TaskOptions(progress=False),  # the training's own progress stays readable
                                 log=lambda line: self.log(f"benchmark {line}") if main else None)
        if main:
            write_summary(outcomes, self.output(step))
        metrics: dict[str, Any] = {}
        for o in outcomes:
            if o.record is not None:
                metrics[f"benchmark/{o.dataset.slug}/{o.task}"] = main_metric(o.task, o.record["metrics"])
        failed = [o for o in outcomes if o.error is not None]
        if failed:  # an average over fewer entries would not be comparable with the others on the curve
            metrics["benchmark_failed"] = len(failed)
            if main:
                self.log(f"benchmark at step {step}: {len(failed)} of {len(outcomes)} entries failed, no "
                         f"benchmark_average (errors above; results in {self.output(step)})")
        else:
            average = [r for r in summary_rows(outcomes) if r["dataset"] == "average"]
            metrics["benchmark_average"] = average[0]["main_metric"]
        return metrics

