"""clip_benchmark's linear probe (mm/eval/benchmark_probe.py) on synthetic features: against scikit-learn's
logistic regression, its metrics, its weight-decay search, few-shot selection, determinism, bad inputs.

Features are unit vectors around 10 class means in 32 dimensions, noisy enough that classes overlap (accuracy
well below 1). The last test (marker ``benchmark_peer``, not in the default run) runs clip_benchmark 1.6.2's own
``linear_probe.evaluate`` on the same features and compares every metric and its whole weight-decay search.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from mm.eval.benchmark_probe import WEIGHT_DECAYS, _fewshot_indices, linear_probe, mean_per_class_recall

ROOT = Path(__file__).resolve().parents[1]
CLASSES, DIM = 10, 32


def features(n: int, seed: int, classes: int = CLASSES, balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` unit vectors, each its class's mean (fixed per class) plus Gaussian noise; labels ``0 .. classes-1``
    in turn (balanced) or drawn at random."""
    means = F.normalize(torch.randn(classes, DIM, generator=torch.Generator().manual_seed(1000)), dim=-1)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes if balanced else torch.randint(0, classes, (n,), generator=g)
    return F.normalize(means[y] + 0.3 * torch.randn(n, DIM, generator=g), dim=-1), y


@pytest.fixture(autouse=True)
def one_thread():
    """The probes here are tiny (32 x 10 weights, batches of 64), where intra-op threads only add synchronisation
    (5x slower on a busy 2-core machine); clip_benchmark's process in the peer test runs on one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def splits():
    return {"train": features(300, 1), "val": features(100, 2), "test": features(1000, 3, balanced=False)}


def val_accuracies(log: list[str]) -> dict[float, float]:
    """{weight decay: val top-1} from the probe's log, in the order tried."""
    pairs = [re.fullmatch(r"linear probe: val top-1 (\S+) at weight decay (\S+)", line).groups() for line in log]
    return {float(wd): float(acc) for acc, wd in pairs}


def test_probe_agrees_with_sklearn_logistic_regression(splits):
    """Both choose their regularisation on the same val split and refit on train + val: test accuracies close,
    predictions mostly the same (the probe's top-1 against sklearn's predictions as labels is their agreement)."""
    (tx, ty), (vx, vy), (sx, sy) = splits["train"], splits["val"], splits["test"]
    ours = linear_probe(tx, ty, sx, sy, vx, vy)
    grid = np.logspace(-3, 3, 13)
    best_c = max(grid, key=lambda c: LogisticRegression(C=c, max_iter=5000).fit(tx, ty).score(vx, vy))
    clf = LogisticRegression(C=best_c, max_iter=5000).fit(torch.cat([tx, vx]), torch.cat([ty, vy]))
    sk_acc = clf.score(sx, sy)
    assert 0.6 < sk_acc < 0.97 and 0.6 < ours["lp_acc1"] < 0.97  # overlapping classes: neither trivial nor hopeless
    assert ours["lp_acc1"] == pytest.approx(sk_acc, abs=0.04)
    agreement = linear_probe(tx, ty, sx, torch.as_tensor(clf.predict(sx)), vx, vy)["lp_acc1"]
    assert agreement >= 0.9
    assert ours["lp_acc1"] <= ours["lp_acc5"] <= 1


def test_mean_per_class_recall_is_sklearns_balanced_accuracy(splits):
    g = np.random.default_rng(0)
    for n, classes in ((50, 3), (200, 10), (7, 7)):
        target, pred = g.integers(0, classes, n), g.integers(0, classes + 2, n)  # pred has classes target lacks
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns about classes only in pred
            assert mean_per_class_recall(target, pred) == balanced_accuracy_score(target, pred)
    # the probe's metric is the mean over the test's classes of its top-1 on that class alone (same model: no val)
    (tx, ty), (sx, sy) = splits["train"], splits["test"]
    whole = linear_probe(tx, ty, sx, sy)
    per_class = [linear_probe(tx, ty, sx[sy == c], sy[sy == c])["lp_acc1"] for c in sy.unique().tolist()]
    assert whole["lp_mean_per_class_recall"] == pytest.approx(float(np.mean(per_class)), abs=1e-12)
    assert whole["lp_mean_per_class_recall"] != whole["lp_acc1"]  # the test set is imbalanced


def test_weight_decay_search(splits):
    """The search tries clip_benchmark's 7 initial points first, then refines around the peak; it picks the weight
    decay of highest val accuracy among those it tried, from the grid; decay matters (the strongest scores far
    worse), and the val split decides: other val data, another choice."""
    (tx, ty), (vx, vy), (sx, sy) = splits["train"], splits["val"], splits["test"]
    log: list[str] = []
    out = linear_probe(tx, ty, sx, sy, vx, vy, log=log.append)
    tried = val_accuracies(log)
    assert len(tried) == len(log) <= 7 + 2 * 4  # each weight decay trained once
    assert list(tried)[:7] == pytest.approx(np.logspace(-6, 2, 7).tolist())
    assert out["weight_decay"] in WEIGHT_DECAYS and out["weight_decay"] in tried
    assert tried[out["weight_decay"]] == max(tried.values())
    assert tried[100.0] < max(tried.values()) - 0.2
    assert linear_probe(tx, ty, sx, sy)["weight_decay"] == 0  # no val split: no decay, as clip_benchmark
    choices = {linear_probe(tx, ty, sx, sy, *features(100, seed), fewshot_k=2)["weight_decay"] for seed in (2, 4, 5)}
    assert len(choices) > 1, choices


def test_deterministic_and_leaves_the_global_rng_alone(splits):
    (tx, ty), (vx, vy), (sx, sy) = splits["train"], splits["val"], splits["test"]
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = linear_probe(tx, ty, sx, sy, vx, vy, fewshot_k=5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert linear_probe(tx, ty, sx, sy, vx, vy, fewshot_k=5, seed=3) == first
    assert first["seed"] == 3 and first["fewshot_k"] == 5 and first["epochs"] == 10 and first["normalized"] is True
    assert linear_probe(tx, ty, sx, sy, vx, vy, fewshot_k=5, seed=4) != first


def test_fewshot_selects_k_per_class(splits):
    (tx, ty), (sx, sy) = splits["train"], splits["test"]
    for k in (1, 5, 30):
        torch.manual_seed(0)
        idxs = _fewshot_indices(ty, k)
        assert len(set(idxs.tolist())) == len(idxs)
        assert torch.bincount(ty[idxs]).tolist() == [k] * CLASSES
    # k = every class's size keeps the whole set, in the same order as no few-shot at all
    assert linear_probe(tx, ty, sx, sy, fewshot_k=30) == {**linear_probe(tx, ty, sx, sy), "fewshot_k": 30}
    with pytest.raises(ValueError, match=r"fewshot_k=31 is more than the 30 training sample\(s\) of class 0"):
        linear_probe(tx, ty, sx, sy, fewshot_k=31)
    short = ty != 4
    short[(ty == 4).nonzero()[:3]] = True  # class 4: 3 samples
    with pytest.raises(ValueError, match="of class 4$"):
        linear_probe(tx[short], ty[short], sx, sy, fewshot_k=5)


def test_top5_is_nan_below_five_classes():
    (tx, ty), (sx, sy) = features(120, 1, classes=4), features(80, 3, classes=4)
    out = linear_probe(tx, ty, sx, sy)
    assert math.isnan(out["lp_acc5"]) and 0 < out["lp_acc1"] <= 1


@pytest.mark.parametrize("change, message", [
    (dict(train_x=torch.zeros(0, DIM), train_y=torch.zeros(0, dtype=torch.long)), "the train split is empty"),
    (dict(test_y=torch.zeros(5, dtype=torch.long)), "1000 test features but 5 test labels"),
    (dict(test_y=torch.full((1000,), CLASSES)), "test label 10 is out of range: the train labels .* up to 9"),
    (dict(val_y=torch.full((100,), -1)), "val label -1 is negative"),
    (dict(val_y=None), "give both val_x and val_y, or neither"),
    (dict(test_x=torch.zeros(1000, DIM + 1)), "test features have dimension 33, train features 32"),
    (dict(train_x=torch.zeros(300)), "train features must be a 2-D float array"),
    (dict(train_y=torch.zeros(300)), "train labels must be a 1-D integer array"),
    (dict(fewshot_k=0), "fewshot_k must be a positive number"),
    (dict(epochs=0), "epochs and batch_size must be at least 1"),
])
def test_bad_inputs_raise(splits, change, message):
    (tx, ty), (vx, vy), (sx, sy) = splits["train"], splits["val"], splits["test"]
    kw = dict(train_x=tx, train_y=ty, test_x=sx, test_y=sy, val_x=vx, val_y=vy) | change
    with pytest.raises(ValueError, match=message):
        linear_probe(**kw)


# -- clip_benchmark itself -----------------------------------------------------------------------
CB_PATH = os.path.abspath(os.environ.get("MM_CLIP_BENCHMARK_PATH", str(ROOT / ".venv-clip-benchmark")))

# clip_benchmark's evaluate asserts device == "cuda" and calls .cuda(): run on the CPU by making those the CPU
# (its DataParallel, with no CUDA device visible, calls the module directly). Harness for the peer, not a mock.
PEER = r"""
import json, sys
import torch

torch.nn.Module.cuda = lambda self, device=None: self
torch.Tensor.cuda = lambda self, *a, **k: self
_to = torch.Tensor.to
torch.Tensor.to = lambda self, *a, **k: _to(self, *("cpu" if x == "cuda" else x for x in a), **k)
from clip_benchmark.metrics import linear_probe

torch.set_num_threads(1)  # as the test's own process

feature_root, runs = sys.argv[1], json.loads(sys.argv[2])
for run in runs:
    print("RUN", flush=True)
    torch.manual_seed(run["seed"])  # clip_benchmark's CLI seeds at startup; here nothing runs in between
    metrics = linear_probe.evaluate(None, None, None, run["fewshot_k"], run["batch_size"], 0, 0.1, 10, "m",
                                    run["seed"], feature_root, "cuda", val_dataloader="cached" if run["val"] else None,
                                    normalize=True, amp=False, verbose=True)
    print("RESULT " + json.dumps(metrics), flush=True)
"""


@pytest.mark.benchmark_peer
def test_equals_clip_benchmark_linear_probe(tmp_path, splits):
    """clip_benchmark 1.6.2's ``linear_probe.evaluate`` on features cached as it caches them (it then skips
    featurizing), on the CPU, seeded right before it as mm seeds: with the val split (the weight-decay search),
    without, few-shot, another seed and batch size: every metric equal, and every weight decay it tries has the
    same val accuracy in both. Setup of clip_benchmark as in tests/test_benchmark.py::test_equals_clip_benchmark."""
    cached = tmp_path / "m"
    cached.mkdir()
    for split, (x, y) in splits.items():
        torch.save(x, cached / f"features_{split}.pt")
        torch.save(y, cached / f"targets_{split}.pt")
    runs = [dict(val=True, fewshot_k=-1, seed=0, batch_size=64), dict(val=False, fewshot_k=-1, seed=0, batch_size=64),
            dict(val=True, fewshot_k=5, seed=0, batch_size=64), dict(val=True, fewshot_k=-1, seed=7, batch_size=48)]
    env = {**os.environ, "PYTHONPATH": CB_PATH, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", PEER, str(tmp_path), json.dumps(runs)], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, (f"clip_benchmark 1.6.2 from {CB_PATH} failed (`make test-benchmark` installs it "
                                  f"there)\n{proc.stderr[-3000:]}")
    outputs = proc.stdout.split("RUN\n")[1:]
    assert len(outputs) == len(runs)
    (tx, ty), (vx, vy), (sx, sy) = splits["train"], splits["val"], splits["test"]
    for run, out in zip(runs, outputs):
        cb = json.loads(re.search(r"^RESULT (.*)$", out, re.M).group(1))
        cb_tried = {float(wd): float(acc) for wd, acc in re.findall(r"weight_decay (\S+): (\S+)$", out, re.M)}
        log: list[str] = []
        val = (vx, vy) if run["val"] else ()
        ours = linear_probe(tx, ty, sx, sy, *val, fewshot_k=run["fewshot_k"], seed=run["seed"],
                            batch_size=run["batch_size"], log=log.append)
        assert set(ours) == set(cb)
        assert ours == pytest.approx(cb, abs=1e-6, nan_ok=True), run
        assert ours["weight_decay"] == cb["weight_decay"]
        assert val_accuracies(log) == cb_tried
        assert len(cb_tried) >= (7 if run["val"] else 0)
