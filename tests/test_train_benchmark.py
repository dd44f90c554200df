"""`eval.benchmark` (mm/train/benchmark.py): an `mm benchmark` suite scored during training. Each evaluation's result
files equal what `mm benchmark` itself gives on the checkpoint saved at that step, the logged metrics are
results.csv's, and a bad suite fails before any training work with one line naming `eval.benchmark`.

The suite's datasets are built here in clip_benchmark's webdataset layout from the same noisy colour squares the
run trains on (tests/conftest.py): a classification set and a retrieval set."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import COLOURS, colour_samples, make_colour_shards, write_wds
from test_train import _free_port, metrics

from mm.cli import main
from mm.train.preflight import load_run_config
from mm.train.trainer import run

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["a {c} square", "a photo of something {c}"]


def write_suite(path: Path, **suite) -> Path:
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training shards, and a suite of two datasets under its dataset_root: `colours` (4 classes, labels in cls)
    and `captions` (retrieval: two captions per image)."""
    tmp = tmp_path_factory.mktemp("train_benchmark")
    shards = make_colour_shards(tmp / "shards")
    test = colour_samples(20, start=2000)
    write_wds(tmp / "wds" / "colours", [{"jpg": m["jpg"], "cls": m["cls"]} for _, m in test], classes=COLOURS,
              templates=TEMPLATES)
    write_wds(tmp / "wds" / "captions", [{"jpg": m["jpg"], "txt": m["txt"] + b"\n" + f"picture {k}".encode()}
                                         for k, m in colour_samples(14, start=3000)], shards=3,
              dataset_type="retrieval")
    suite = write_suite(tmp / "suite.yaml", dataset_root="wds",
                        datasets=["wds/colours", {"dataset": "wds/captions", "tasks": ["zeroshot_retrieval"]}])
    return tmp, shards, suite


def overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train={shards}/train-{{0000..0002}}.tar", "data.batch_size=4", "data.workers=0",
            "data.shuffle_buffer=8", "train.steps=4", "train.warmup_steps=1", "train.lr=0.01", "train.log_every=1",
            "train.checkpoint_every=2", "train.seed=1", "eval.every=2", "eval.batch_size=8", f"output_dir={out}",
            *extra]


def results(d: Path) -> dict[tuple[str, str], dict]:
    """The clip_benchmark result files of a directory by (dataset, task)."""
    out = {}
    for p in d.glob("*.json"):
        r = json.loads(p.read_text())
        out[r["dataset"], r["task"]] = r
    return out


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def check_against_mm_benchmark(run_dir: Path, suite: Path, tmp: Path, steps: list[int]) -> None:
    """Every evaluation's files equal `mm benchmark` on that step's checkpoint (scored in one process here), and
    its log record holds results.csv's main metrics and average."""
    recs = {r["step"]: r for r in metrics(run_dir) if "benchmark_average" in r}
    assert sorted(recs) == steps
    scored = {}
    for step, rec in recs.items():
        ours = run_dir / "benchmark" / f"step_{step}"
        theirs = tmp / f"mm_benchmark_step_{step}"
        weights = run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"
        assert main(["benchmark", "--suite", str(suite), "--model", "tiny-clip", "--pretrained", str(weights),
                     "--output", str(theirs), "--workers", "0", "--batch-size", "8"]) == 0
        got, want = results(ours), results(theirs)
        scored[step] = want
        assert got.keys() == want.keys() == {("wds/colours", "zeroshot_classification"),
                                             ("wds/captions", "zeroshot_retrieval")}
        for key in want:
            assert same(got[key]["metrics"], want[key]["metrics"]), (step, key, got[key], want[key])
            assert (got[key]["model"], got[key]["pretrained"]) == (str(run_dir), f"step_{step}")
        with open(ours / "results.csv") as f:
            rows = list(csv.DictReader(f))
        entries = [r for r in rows if r["dataset"] != "average"]
        (average,) = [r for r in rows if r["dataset"] == "average"]
        assert len(entries) == 2 and (ours / "results.md").is_file()
        for r in entries:
            assert rec[f"benchmark/{r['dataset'].removeprefix('wds/')}/{r['task']}"] == float(r["main_metric"])
        assert rec["benchmark_average"] == float(average["main_metric"])
        assert rec["benchmark_average"] == pytest.approx(sum(float(r["main_metric"]) for r in entries) / 2, rel=1e-12)
    # the steps' checkpoints score differently, so the equalities above show each evaluation scored its step's model
    first, last = scored[steps[0]], scored[steps[-1]]
    assert any(not same(first[k]["metrics"], last[k]["metrics"]) for k in first)


def test_benchmark_during_training_equals_mm_benchmark_on_the_checkpoints(data, tmp_path):
    tmp, shards, suite = data
    run_dir = tmp_path / "run"
    run(load_run_config(None, overrides(shards, run_dir, f"eval.benchmark={suite}",
                                        f"eval.zeroshot.shards={shards}/test-0000.tar")))
    check_against_mm_benchmark(run_dir, suite, tmp_path, [2, 4])
    evals = [r for r in metrics(run_dir) if "benchmark_average" in r]
    assert all("zeroshot_top1" in r for r in evals)  # one record with the run's other evaluation metrics
    assert (run_dir / "benchmark.png").is_file()


def test_an_entry_failing_mid_run_is_logged_and_training_goes_on(data, tmp_path):
    """A problem only reading finds (a label past classnames.txt) fails that entry: the others are still logged,
    the average is left out (it would average other entries than the rest of the curve) and the run finishes."""
    tmp, shards, _ = data
    bad = tmp_path / "wds" / "bad_label"
    write_wds(bad, [{"jpg": m["jpg"], "cls": b"7" if i == 3 else m["cls"]}
                    for i, (_, m) in enumerate(colour_samples(8, start=5000))], classes=COLOURS, templates=TEMPLATES)
    suite = write_suite(tmp_path / "suite.yaml", datasets=[str(bad), str(tmp / "wds" / "colours")])
    run_dir = tmp_path / "run"
    run(load_run_config(None, overrides(shards, run_dir, f"eval.benchmark={suite}")))
    recs = [r for r in metrics(run_dir) if any(k.startswith("benchmark") for k in r)]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        assert r["benchmark_failed"] == 1 and "benchmark_average" not in r
        assert "benchmark/colours/zeroshot_classification" in r
        assert "benchmark/bad_label/zeroshot_classification" not in r
        assert len(list((run_dir / "benchmark" / f"step_{r['step']}").glob("*.json"))) == 1
    assert (run_dir / "final" / "model.safetensors").is_file()


def bad_suites(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (suite file, what the error line must say)."""
    no_names = tmp / "wds" / "no_names"
    if not no_names.exists():
        write_wds(no_names, [{"jpg": m["jpg"], "cls": m["cls"]} for _, m in colour_samples(4, start=4000)])
    return {
        "missing file": (tmp / "nowhere.yaml", f"{tmp / 'nowhere.yaml'}: no such file"),
        "models": (write_suite(tmp / "models.yaml", dataset_root="wds", models=["tiny-clip"],
                               datasets=["wds/colours"]), "remove the suite's 'models' key"),
        "unknown task": (write_suite(tmp / "task.yaml", dataset_root="wds",
                                     datasets=[{"dataset": "wds/colours", "tasks": ["zeroshot_counting"]}]),
                         "unknown task 'zeroshot_counting'"),
        "no classnames.txt": (write_suite(tmp / "names.yaml", dataset_root="wds", datasets=["wds/no_names"]),
                              "no classnames.txt"),
        "no such dataset": (write_suite(tmp / "missing.yaml", dataset_root="wds", datasets=["wds/colors"]),
                            "dataset 'wds/colors': directory"),
    }


@pytest.mark.parametrize("case", ["missing file", "models", "unknown task", "no classnames.txt", "no such dataset"])
def test_bad_suites_fail_before_training_with_one_line(data, tmp_path, capsys, case):
    tmp, shards, _ = data
    suite, message = bad_suites(tmp)[case]
    run_dir = tmp_path / "run"
    assert main(["train", *overrides(shards, run_dir, f"eval.benchmark={suite}")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: eval.benchmark: ") and message in errors[0], errors
    assert not run_dir.exists()  # nothing was started


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_benchmark_equals_mm_benchmark_on_the_checkpoints(data, tmp_path, fsdp):
    """2 gloo processes: every process scores its share of the suite, on the model it trains (DDP) or on a whole
    copy of the sharded one (train.fsdp)."""
    tmp, shards, suite = data
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(ROOT / "train.py"),
           *overrides(shards, run_dir, f"eval.benchmark={suite}", f"train.fsdp={str(fsdp).lower()}")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r for r in metrics(run_dir) if r.get("final")][0]["param_sha256"]  # a 2-process run, finished
    assert metrics(run_dir)[0]["world_size"] == 2
    check_against_mm_benchmark(run_dir, suite, tmp_path, [2, 4])
