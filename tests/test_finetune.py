"""``mm finetune`` on the trainer: the classification task computes what the classifier does, and a fine-tuning run
stopped by SIGTERM and run again ends bit for bit where an uninterrupted run does (losses, weights, WiSE-FT)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_colour_shards
from safetensors.torch import load_file

import mm
from mm.layers.config import LoraConfig
from mm.train.classifier import Classifier, zero_shot_head
from mm.train.tasks import ClassifyTask

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize("preset", ["tiny-clip", "tiny-coca"])
def test_the_task_computes_the_classifier_and_its_cross_entropy(preset):
    """The task runs the model's forward (what DDP wraps) on the images alone: its logits, loss and gradients are
    the Classifier's (``head(encode_image(x, normalize=True))``) bit for bit, random layers included."""
    torch.manual_seed(0)
    model = mm.create_model(preset, vision__patch_dropout=0.25).train()
    head = zero_shot_head(model, CLASSES, ["a {} square"])
    task = ClassifyTask(head, CLASSES, label_smoothing=0.1, lr_mult=10.0)
    batch = {"images": torch.randn(6, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3, 0, 1])}
    torch.manual_seed(1)
    out = task.forward(model, batch)
    losses = task.losses(out, batch)
    losses["loss"].backward()
    got = [p.grad.clone() for p in (*model.vision.parameters(), *head.parameters())]
    model.zero_grad()
    head.zero_grad()
    torch.manual_seed(1)  # the same patch-dropout draws
    logits = Classifier(model, head)(batch["images"])
    loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=0.1)
    loss.backward()
    assert torch.equal(out.logits, logits) and torch.equal(losses["loss"], loss)
    assert all(torch.equal(g, p.grad) for g, p in zip(got, (*model.vision.parameters(), *head.parameters())))
    assert losses["batch_top1"].item() == (logits.argmax(1) == batch["labels"]).float().mean().item()
    # the head's optimizer groups: lr x lr_mult, its weight decayed and its bias not (the model's rule)
    groups = task.param_groups(1e-3, 0.1)
    assert [(g["params"], g["weight_decay"], g["lr"], g["lr_scale"]) for g in groups] == [
        ([head.weight], 0.1, 1e-3 * 10, 10.0), ([head.bias], 0.0, 1e-3 * 10, 10.0)]
    with pytest.raises(ValueError, match="training label 7 is not a class index"):
        task.forward(model, {**batch, "labels": torch.tensor([0, 1, 7, 3, 0, 1])})


def test_a_fine_tuning_run_refuses_the_image_text_runs_model_and_objective_keys(model_dir, colour_shards, tmp_path):
    """A RunConfig with a finetune section (what mm finetune runs) takes its model, adapters and evaluation from that
    section: the image-text run's keys for them are refused before any work, naming the key."""
    from mm.config import ConfigError
    from mm.train.finetune import FinetuneConfig, run, run_config

    def config():
        return run_config(FinetuneConfig(steps=1), model=str(model_dir), train=f"{colour_shards}/train-0000.tar",
                          test=f"{colour_shards}/test-0000.tar", out=tmp_path / "ft", classes=CLASSES)

    for key, value in (("model", "tiny-clip"), ("train.objective", "mm.train.tasks:build_task"),
                       ("train.lora", LoraConfig(rank=4)), ("train.freeze", ["text"])):
        cfg = config()
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, name, value)
        with pytest.raises(ConfigError, match=f"^{key}: does not apply to a fine-tuning run"):
            run(cfg)
    cfg = config()
    cfg.finetune.test = f"{colour_shards}/test-9999.tar"
    with pytest.raises(ConfigError, match="finetune.test: shard .*test-9999.tar' not found"):
        run(cfg)
    assert not (tmp_path / "ft").exists()


# -- stop and resume -------------------------------------------------------------------------------------------
def finetune_cmd(model_dir: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mm", "finetune", "--model", str(model_dir),
            "--train", f"{shards}/train-{{0000..0002}}.tar", "--test", f"{shards}/test-0000.tar",
            "--steps", "12", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "3", "--precision", "bf16",
            "--workers", "2", "--log-every", "1", "--checkpoint-every", "4", "--wise-alpha", "0,0.5,1",
            "--save-alpha", "0.5", "--seed", "3", "--out", str(out), *extra]


def step_losses(run: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, batch accuracy) of every step record, in the order written (a resumed run appends)."""
    out: dict[int, tuple[float, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = (r["loss"], r["batch_top1"])
    return out


def tensors(d: Path) -> dict[str, torch.Tensor]:
    return {f"{f.name}:{k}": v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def stop_by_signal(cmd: list[str], out: Path) -> str:
    """Run ``cmd``, send SIGTERM as soon as its first step is logged; returns its output (it must exit 0)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = out / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and '"loss"' in log.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    return output


# slow (make test-slow): in bf16, which CPUs without native bf16 emulate (~20x slower than fp32): 12 small steps
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_finetune_stopped_by_sigterm_and_run_again_equals_an_uninterrupted_run(variant, tmp_path):
    """SIGTERM mid-run: a checkpoint at the next step, exit 0; the same command continues from it (the data
    position, the RNG of patch dropout, the optimizer, the head, bf16) and ends with the uninterrupted run's losses
    at every step, its fine-tuned classifier and WiSE-FT interpolation bit for bit, and its test accuracies."""
    torch.manual_seed(0)
    model_dir = mm.save_pretrained(mm.create_model("tiny-clip", vision__patch_dropout=0.25), tmp_path / "model")
    shards = make_colour_shards(tmp_path / "shards")
    extra = ("--lora", "--lora-rank", "4", "--lora-dropout", "0.1") if variant == "lora" else ()
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    subprocess.run(finetune_cmd(model_dir, shards, full, *extra), cwd=ROOT, check=True, capture_output=True)
    output = stop_by_signal(finetune_cmd(model_dir, shards, stopped, *extra), stopped)
    assert "stopped by signal" in output and not (stopped / "finetuned").exists(), output[-3000:]
    at = int(output.split("stopped by signal at step ")[1].split(";")[0])
    assert 0 < at < 12 and (stopped / "checkpoints" / f"step_{at}" / "classifier.safetensors").is_file()
    again = subprocess.run(finetune_cmd(model_dir, shards, stopped, *extra), cwd=ROOT, check=True,
                           capture_output=True, text=True)
    assert f"resumed from {stopped / 'checkpoints' / f'step_{at}'} at step {at}" in again.stdout
    assert step_losses(stopped) == step_losses(full) and sorted(step_losses(full)) == list(range(1, 13))
    for d in ("finetuned", "wise-0.5"):
        a, b = tensors(full / d), tensors(stopped / d)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), d
    wise = [json.loads((run / "results.json").read_text())["wise"] for run in (full, stopped)]
    assert wise[0] == wise[1]
