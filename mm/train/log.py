"""What the user sees: a progress bar (plain lines when not a TTY), metrics.jsonl, TensorBoard, PNG plots.

Only the main process logs. Nothing here touches the device: callers pass Python numbers.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from ..utils.progress import Progress


class RunLogger:
    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.total = total_steps
        self.tb = None
        self.t_start = time.time()
        # a bar on a terminal; elsewhere each logged record is a line of its own (format_record)
        self.progress = Progress(total_steps, "step", enabled=enabled, initial=start_step)
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (open for the run; close() closes it)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                self.info("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")

    def info(self, msg: str) -> None:
        self.progress.write(msg)

    def advance(self, n: int = 1) -> None:
        self.progress.update(n)

    def log(self, record: dict[str, Any], show: bool = True) -> None:
        """Append a record (must hold ``step``) to metrics.jsonl and TensorBoard; show it."""
        if not self.enabled:
            return
        record = {"time": round(time.time() - self.t_start, 3), **record}
        self.metrics.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, step)
        if not show:
            return
        if self.progress.is_bar and "loss" in record:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                      sps=f"{record.get('samples_per_s', 0):.0f}")
        else:
            self.info(format_record(record, self.total))

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.close()
        if self.tb is not None:
            self.tb.close()
        self.metrics.close()


def format_record(r: dict[str, Any], total: int) -> str:
    parts = [f"step {r['step']}/{total}"]
    for k, v in r.items():
        if k in ("step", "time"):
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    if "eta_s" in r:
        parts.append(f"(ETA {int(r['eta_s']) // 60}m{int(r['eta_s']) % 60:02d}s)")
    return "  ".join(p for p in parts if not p.startswith("eta_s"))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(output_dir: str | Path) -> list[Path]:
    """PNG plots against step: ``loss.png`` (the loss and its parts), ``lr.png``, ``eval.png`` (zero-shot
    accuracy, retrieval recall), ``caption.png`` (BLEU-4, CIDEr), ``attributes.png`` (the fraction of generated
    captions that state each attribute right: the built-in set), ``benchmark.png`` (``eval.benchmark``'s average
    and each entry's main metric) and ``experts.png`` (MoE expert usage); each
    only when metrics.jsonl has its values. Returns the files written. Uses matplotlib's object API, not
    pyplot: no backend is selected, so a notebook's inline backend is left alone."""
    from matplotlib.figure import Figure

    d = Path(output_dir)
    records = read_metrics(d / "metrics.jsonl")
    written = []
    panels = [("loss", ["loss", "contrastive_loss", "caption_loss", "aux_loss", "task_loss", "kl_loss",
                        "feature_loss"]), ("lr", ["lr"]),
              ("eval", ["zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"]),
              ("caption", ["caption_bleu4", "caption_cider"]),
              ("attributes", ["caption_attr_color", "caption_attr_shape", "caption_attr_size", "caption_attr_position"]),
              ("benchmark", ["benchmark_average",  # and each entry's main metric, benchmark/DATASET/TASK
                             *sorted({k for r in records for k in r if k.startswith("benchmark/")})])]
    for name, keys in panels:
        series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig = Figure(figsize=(6, 3.5), dpi=100)
        ax = fig.subplots()
        for k, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=k)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = d / f"{name}.png"
        fig.savefig(path)
        written.append(path)
    experts = _plot_experts(records, d / "experts.png")
    return written + ([experts] if experts is not None else [])


def _plot_experts(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Heatmaps of each MoE layer's load per expert (``moe/<tower>/<block>/load``), averaged over the
    logged steps: one panel per tower (one-tower models: per modality), layers x experts, one colour scale."""
    import numpy as np
    from matplotlib.figure import Figure

    loads: dict[str, dict[int, list[list[float]]]] = {}
    dropped: dict[tuple[str, int], list[float]] = {}
    for r in records:
        for k, v in r.items():
            m = re.fullmatch(r"moe/(.+)/(\d+)/(load|dropped)", k)
            if m and m[3] == "load":
                loads.setdefault(m[1], {}).setdefault(int(m[2]), []).append(v)
            elif m:
                dropped.setdefault((m[1], int(m[2])), []).append(v)
    if not loads:
        return None
    grids = {t: (sorted(layers), np.array([np.mean(layers[b], axis=0) for b in sorted(layers)]))
             for t, layers in loads.items()}
    vmax = max(g.max() for _, g in grids.values())
    rows = max(len(b) for b, _ in grids.values())
    fig = Figure(figsize=(5.5 * len(grids), 1.5 + 0.5 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False)
    for ax, (tower, (blocks, grid)) in zip(axes[0], grids.items()):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(len(blocks)), [f"{b}: {np.mean(dropped.get((tower, b), [0])):.0%} dropped" for b in blocks])
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("expert")
        ax.set_ylabel("block")
        ax.set_title(tower)
    fig.colorbar(im, ax=list(axes[0]), label="fraction of assignments")
    n = len({r["step"] for r in records if any(k.startswith("moe/") for k in r)})
    fig.suptitle(f"expert load, mean over {n} logged steps")
    fig.savefig(path)
    return path
