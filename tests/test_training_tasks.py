"""A training objective of one's own (docs/training_tasks.md): the page's example module, read from the page,
trains through `train.objective` with neither executor nor trainer code knowing it: its loss is logged, its
predictor head trains and is checkpointed, the image tower trains and the frozen text tower does not, and a run
stopped and resumed equals an uninterrupted one bit for bit (the head's state included). A bad objective fails
before any work with one line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_colour_shards
from safetensors.torch import load_file

import mm

ROOT = Path(__file__).resolve().parents[1]


def example_module(d: Path) -> Path:
    """flip_task.py as docs/training_tasks.md shows it (its one python block)."""
    page = (ROOT / "docs" / "training_tasks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 1
    (d / "flip_task.py").write_text(blocks[0])
    return d


def train(work: Path, out: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cfg = {"model": "tiny-clip",
           "data": {"train": f"{work}/shards/train-{{0000..0002}}.tar", "batch_size": 4, "workers": 1,
                    "shuffle_buffer": 8},
           "train": {"steps": 6, "warmup_steps": 1, "lr": 1e-3, "log_every": 1, "seed": 2,
                     "objective": "flip_task:make_task", "freeze": ["text", "logit_scale"]},
           "output_dir": str(work / out)}
    (work / f"{out}.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mm", "train", str(work / f"{out}.yaml"), *overrides], cwd=work,
                          capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("objective")
    make_colour_shards(d / "shards")
    return example_module(d)


def test_the_documented_objective_trains_and_resumes_exactly(work):
    import json

    train(work, "full", "train.checkpoint_every=3")
    recs = [json.loads(line) for line in (work / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["flip_loss"] for r in recs if "flip_loss" in r]
    assert len(losses) == 6 and all(-1 <= v <= 1 for v in losses) and losses[-1] != losses[0]
    torch.manual_seed(2)  # the run's initial weights (train.seed 2)
    start = mm.create_model("tiny-clip").state_dict()
    final = load_file(str(work / "full" / "final" / "model.safetensors"))
    changed = {k.split(".")[0] for k in final if not torch.equal(final[k], start[k])}
    assert changed == {"vision"}  # the image tower alone: the text tower and the logit scale are frozen
    heads = [load_file(str(work / "full" / "checkpoints" / f"step_{s}" / "flip_predictor.safetensors"))
             for s in (3, 6)]
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # the head trains

    train(work, "split", "train.checkpoint_every=3", "train.stop_after=3")
    train(work, "split", "train.checkpoint_every=3", "train.resume=auto")
    split = load_file(str(work / "split" / "final" / "model.safetensors"))
    assert all(torch.equal(split[k], final[k]) for k in final)
    head = load_file(str(work / "split" / "checkpoints" / "step_6" / "flip_predictor.safetensors"))
    assert all(torch.equal(head[k], heads[1][k]) for k in head)


@pytest.mark.parametrize(("objective", "message"), [
    ("flip_task", "train.objective: must be 'module:factory'"),
    ("no_such_module:make", "train.objective: cannot import 'no_such_module'"),
    ("flip_task:nothing", "train.objective: module 'flip_task' has no 'nothing'"),
])
def test_a_bad_objective_fails_before_any_work(work, objective, message):
    proc = train(work, "bad", f"train.objective={objective}", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (work / "bad").exists()
