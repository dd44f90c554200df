"""End-to-end training runs in subprocesses (as users run them): exact resume, crash safety, signals,
bad data, config errors, and 2-process training through `accelerate launch`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    colour_samples,
    jpeg_bytes,
    make_colour_shards,
    png_bytes,
    write_tar,
    sigterm_when,
)
from PIL import Image

import mm

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, shards: Path, out: str, **sections) -> Path:
    cfg = {
        "model": "tiny-clip",
        "data": {"train": f"{shards}/train-{{0000..0002}}.tar", "batch_size": 4, "workers": 2, "shuffle_buffer": 8},
        "train": {"steps": 8, "warmup_steps": 2, "lr": 1e-3, "checkpoint_every": 0, "log_every": 1, "seed": 1},
        "eval": {"batch_size": 8},
        "output_dir": str(tmp_path / out),
    }
    for sec, values in sections.items():
        cfg[sec].update(values) if isinstance(cfg.get(sec), dict) else cfg.__setitem__(sec, values)
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, *overrides: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(config), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff == 0.0, f"max abs difference {diff}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 8-step run (with a final zero-shot evaluation) that other tests compare against."""
    tmp = tmp_path_factory.mktemp("ref")
    shards = make_colour_shards(tmp / "shards", templates=("a {} square",))
    cfg = write_config(tmp, shards, "full", eval={"batch_size": 8, "zeroshot": {"shards": f"{shards}/test-0000.tar"}})
    proc = train(cfg)
    return tmp, shards, tmp / "full", proc


def test_full_run_writes_the_run_directory(reference_run):
    tmp, shards, run, proc = reference_run
    for name in ("config.yaml", "metrics.jsonl", "final/config.json", "final/model.safetensors", "loss.png", "lr.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    recs = metrics(run)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("lr", "samples_per_s", "skipped_samples"):
        assert key in steps[0]
    final_eval = [r for r in recs if "zeroshot_top1" in r]
    assert final_eval and 0 <= final_eval[-1]["zeroshot_top1"] <= 1 and final_eval[-1]["zeroshot_n"] == 16
    assert "zeroshot_top1" in proc.stdout
    import mm

    mm.load_pretrained(run / "final")  # the final directory is a save_pretrained model


def test_stop_and_resume_is_exact(reference_run):
    tmp, shards, full, _ = reference_run
    cfg = write_config(tmp, shards, "resumed")
    first = train(cfg, "train.stop_after=3")
    assert "stopped after step 3" in first.stdout + first.stderr
    assert not (tmp / "resumed" / "final").exists()
    second = train(cfg)
    assert "resumed from" in second.stdout + second.stderr
    assert_same_weights(final_weights(full), final_weights(tmp / "resumed"))


@pytest.mark.slow
def test_kill_9_during_checkpoint_write_resumes_from_previous_checkpoint(reference_run):
    tmp, shards, full, _ = reference_run
    cfg = write_config(tmp, shards, "killed", train={"steps": 8, "warmup_steps": 2, "lr": 1e-3, "checkpoint_every": 2,
                                                     "log_every": 1, "seed": 1})
    crashed = train(cfg, env={"MM_FAULT_KILL_IN_CHECKPOINT": "4"}, check=False)
    assert crashed.returncode == -signal.SIGKILL
    ckpts = tmp / "killed" / "checkpoints"
    assert (ckpts / "step_2").is_dir() and (ckpts / "step_4.tmp").is_dir() and not (ckpts / "step_4").exists()
    resumed = train(cfg)
    assert "resumed from" in resumed.stdout + resumed.stderr and "step_2" in resumed.stdout + resumed.stderr
    assert_same_weights(final_weights(full), final_weights(tmp / "killed"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_6", "step_8"]  # keep_checkpoints=2, tmp cleaned


def test_sigterm_writes_a_checkpoint_and_exits_zero(colour_shards, tmp_path):
    cfg = write_config(tmp_path, colour_shards, "term", train={"steps": 100000, "log_every": 1, "warmup_steps": 1})
    sigterm_when([sys.executable, str(ROOT / "train.py"), str(cfg)], tmp_path / "term" / "metrics.jsonl", '"loss"',
                 ROOT, timeout=120)
    ckpts = list((tmp_path / "term" / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].name.startswith("step_") and (ckpts[0] / "optimizer.pt").is_file()


def test_bad_data_is_skipped_counted_and_named(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    good = colour_samples(12)
    img = Image.new("RGB", (40, 40), (10, 200, 10))
    arr16 = (torch.arange(1600).reshape(40, 40) * 40).numpy().astype("uint16")
    rgba = Image.new("RGBA", (40, 40), (200, 0, 0, 128))
    from test_data import bomb_png

    odd_good = [("cmyk", {"jpg": jpeg_bytes(img.convert("CMYK")), "txt": b"a cmyk image"}),
                ("png16", {"png": png_bytes(Image.fromarray(arr16)), "txt": b"a 16-bit image"}),
                ("rgba", {"png": png_bytes(rgba), "txt": b"a transparent image"})]
    bad = [("corrupt", {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"x"}),
           ("truncated", {"jpg": jpeg_bytes(img)[:200], "txt": b"x"}),
           ("nocaption", {"jpg": jpeg_bytes(img)}),
           ("emptycaption", {"jpg": jpeg_bytes(img), "txt": b"   "}),
           ("latin1", {"jpg": jpeg_bytes(img), "txt": b"caf\xe9"}),
           ("bomb", {"png": bomb_png(), "txt": b"a huge image"})]
    write_tar(d / "train-0000.tar", good[:6] + bad + odd_good)
    write_tar(d / "train-0001.tar", good[6:])
    cut = write_tar(d / "train-0002.tar", colour_samples(12, start=100))
    cut.write_bytes(cut.read_bytes()[:9000])  # a shard cut off mid-file
    cfg = write_config(tmp_path, d, "badrun", train={"steps": 10, "log_every": 1, "warmup_steps": 1})
    proc = train(cfg)
    out = proc.stdout + proc.stderr
    assert "train-0002.tar is cut off" in out
    named = (tmp_path / "badrun" / "skipped_samples.rank0.txt").read_text()
    for key, reason in [("corrupt", "undecodable image"), ("truncated", "undecodable image"),
                        ("nocaption", "no caption"), ("emptycaption", "empty caption"),
                        ("latin1", "caption not UTF-8"), ("bomb", "too many pixels")]:
        assert f"train-0000.tar:{key}: {reason}" in named
    for key in ("cmyk", "png16", "rgba"):
        assert f":{key}:" not in named  # odd but valid images are used
    recs = metrics(tmp_path / "badrun")
    final = [r for r in recs if r.get("final")][0]
    assert set(final["skipped_by_reason"]) == {"undecodable image", "no caption", "empty caption",
                                               "caption not UTF-8", "too many pixels"}
    assert max(r["step"] for r in recs if "loss" in r) == 10


@pytest.mark.parametrize("override, message", [
    ("train.lerning_rate=1", "unknown config key 'train.lerning_rate'"),
    ("data.train=/nonexistent/shard-{0..3}.tar", "data.train: shard '/nonexistent/shard-0.tar' not found"),
    ("train.precision=fp8", "train.precision"),
    ("model=ViT-Q-1", "unknown model 'ViT-Q-1'"),
    ("train.steps=-1", "train.steps: must be >= 1, got -1"),
    ("train.caption_fraction=0", "train.caption_fraction: must be in (0, 1], got 0"),
])
def test_config_errors_fail_before_training(colour_shards, tmp_path, override, message, capsys):
    """`mm train` answers a bad config with one line `error: ...` naming the key, exit code 2, no traceback, and
    nothing started (in this process: the command's own return code; the processes are the next test's)."""
    from mm.cli import main

    cfg = write_config(tmp_path, colour_shards, "err")
    assert main(["train", str(cfg), override]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "err").exists()  # nothing was started


def test_a_bad_config_ends_both_entry_points_with_exit_code_2(colour_shards, tmp_path):
    """train.py (what `accelerate launch train.py` runs) and `python -m mm train` exit with the command's 2 and its
    one error line, no traceback, nothing started."""
    cfg = write_config(tmp_path, colour_shards, "err")
    for cmd in ([sys.executable, str(ROOT / "train.py")], [sys.executable, "-m", "mm", "train"]):
        proc = subprocess.run([*cmd, str(cfg), "train.steps=-1"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, (cmd, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert errors == ["error: train.steps: must be >= 1, got -1"], (cmd, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (cmd, proc.stderr[-2000:])
        assert not (tmp_path / "err").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_with_accelerate_launch(colour_shards, tmp_path):
    cfg = write_config(tmp_path, colour_shards, "ddp", train={"steps": 4, "log_every": 1, "warmup_steps": 1,
                                                              "checkpoint_every": 2})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "train.py"), str(cfg)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = metrics(tmp_path / "ddp")
    assert recs[0]["world_size"] == 2  # really two ranks, not two independent single-process runs
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]  # written once, by the main process
    final = [r for r in recs if r.get("final")][0]
    assert len(final["param_sha256"]) == 2 and len(set(final["param_sha256"])) == 1  # identical on both ranks
    ckpts = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert ckpts == ["step_2", "step_4"]
    assert {p.name for p in (tmp_path / "ddp" / "checkpoints" / "step_4").iterdir()} >= {
        "model.safetensors", "rank_0.pt", "rank_1.pt", "data_rank_0.json", "data_rank_1.json"}


def test_coca_trains_with_only_the_model_changed_and_reports_caption_metrics(colour_shards, tmp_path):
    cap = {"shards": f"{colour_shards}/test-0000.tar", "show": 2,
           "generation": {"method": "beam", "num_beams": 2, "max_new_tokens": 6}}
    cfg = write_config(tmp_path, colour_shards, "coca", model="tiny-coca", eval={"batch_size": 8, "captioning": cap})
    proc = train(cfg)
    run = tmp_path / "coca"
    recs = metrics(run)
    steps = [r for r in recs if "caption_loss" in r]
    assert len(steps) == 8 and all(r["loss"] > r["caption_loss"] > 0 for r in steps)
    final = [r for r in recs if "caption_bleu4" in r][-1]
    assert final["caption_n"] == 16 and 0 <= final["caption_bleu4"] <= 1 and final["caption_cider"] >= 0
    rows = [json.loads(line) for line in (run / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and rows[0]["references"] == ["a red square number 1000"]
    assert f"caption {rows[0]['key']}: " in proc.stdout + proc.stderr
    assert isinstance(mm.load_pretrained(run / "final"), mm.CoCa)


def test_periodic_evaluations_on_a_subset_and_caption_attributes_on_the_builtin_set(tmp_path):
    """eval.every with eval.every_max_samples: evaluations during the run read that many samples of each set, the
    final one all of them; on the built-in shapes each caption evaluation reports the fraction of captions that
    state each attribute right, as mm.data.synthetic.attribute_accuracy gives for captions.jsonl."""
    from mm.data import synthetic

    data = tmp_path / "builtin"
    synthetic.generate(data, n_train=64, n_test=24, samples_per_shard=32, verbose=False)
    test = f"{data}/test-000000.tar.gz"
    cfg = write_config(tmp_path, data, "periodic", model="tiny-coca",
                       data={"train": f"{data}/train-{{000000..000001}}.tar.gz", "batch_size": 8},
                       train={"steps": 6, "warmup_steps": 1, "lr": 1e-3, "checkpoint_every": 0, "log_every": 1},
                       eval={"batch_size": 8, "every": 2, "every_max_samples": 8, "zeroshot": {"shards": test},
                             "captioning": {"shards": test, "generation": {"num_beams": 2, "max_new_tokens": 8}}})
    train(cfg)
    run = tmp_path / "periodic"
    evals = [r for r in metrics(run) if "zeroshot_top1" in r]
    assert [(r["step"], r["zeroshot_n"], r["caption_n"]) for r in evals] == [(2, 8, 8), (4, 8, 8), (6, 24, 24)]
    rows = [json.loads(line) for line in (run / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(set(r["attributes"]) == set(synthetic.ATTRIBUTES) for r in rows)
    want = synthetic.attribute_accuracy([r["caption"] for r in rows], [r["attributes"] for r in rows])
    assert {k: evals[-1][f"caption_attr_{k}"] for k in want} == want
    assert all("caption_attr_shape" in r for r in evals)
    assert {"eval.png", "attributes.png"} <= {p.name for p in run.iterdir()}


def test_captioning_eval_needs_a_decoder(colour_shards, tmp_path):
    cfg = write_config(tmp_path, colour_shards, "nocap", eval={"captioning": {"shards": f"{colour_shards}/test-0000.tar"}})
    proc = train(cfg, check=False)
    assert proc.returncode != 0 and "eval.captioning.shards" in proc.stderr + proc.stdout


POISON = '''
"""The run's own objective, but the loss of the (1-based) steps listed in MM_POISON_STEPS is NaN."""
import os
from dataclasses import replace

from mm.train.tasks import Task, build_task


class Poisoned(Task):
    def __init__(self, inner, bad):
        self.inner, self.bad, self.name, self.step = inner, bad, inner.name, 0

    def __getattr__(self, name):  # everything else is the inner task's
        return getattr(self.inner, name)

    def forward(self, module, batch, embed_only=False, **kw):
        return self.inner.forward(module, batch, embed_only, **kw)

    def begin_step(self, step):
        self.step = step + 1
        self.inner.begin_step(step)

    def end_step(self, step):
        self.inner.end_step(step)

    def batch_terms(self, out, batch):
        return self.inner.batch_terms(out, batch)

    def local_terms(self, out, batch):
        return self.inner.local_terms(out, batch)

    def local_units(self, batch):
        return self.inner.local_units(batch)

    def combine(self, terms):
        loss = self.inner.combine(terms)
        return loss * float("nan") if self.step in self.bad else loss


def make_task(cfg, model, device):
    inner = build_task(replace(cfg, train=replace(cfg.train, objective=None)), model, None, device)
    return Poisoned(inner, {int(s) for s in os.environ["MM_POISON_STEPS"].split(",")})
'''


def test_skipped_steps_are_counted_across_a_resume(colour_shards, tmp_path):
    """Non-finite steps are skipped and counted; the counters travel in the checkpoint: a resumed run goes on
    counting the skipped steps, and the limit on non-finite steps in a row spans the resume."""
    (tmp_path / "poison.py").write_text(POISON)
    cfg = write_config(tmp_path, colour_shards, "run", train={"steps": 5, "warmup_steps": 1, "checkpoint_every": 3,
                                                              "max_bad_steps": 3, "objective": "poison:make_task"})
    env = {"MM_POISON_STEPS": "2,3", "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    train(cfg, "train.stop_after=3", env=env)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert (state["skipped_steps"], state["bad_in_row"]) == (2, 2)
    # step 4 bad as well: the third in a row, counted from before the resume
    proc = train(cfg, "train.resume=auto", env={**env, "MM_POISON_STEPS": "2,3,4"}, check=False)
    assert proc.returncode != 0
    assert "3 steps in a row had non-finite loss or gradients (last at step 4)" in proc.stdout + proc.stderr
    # step 4 fine: the run finishes, having skipped 2 steps in all
    train(cfg, "train.resume=auto", env=env)
    steps = [r for r in metrics(tmp_path / "run") if "skipped_steps" in r]
    assert [(r["step"], r["skipped_steps"]) for r in steps][-2:] == [(4, 2), (5, 2)]
