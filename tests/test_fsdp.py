"""train.fsdp under `accelerate launch` with 2 gloo CPU processes: the sharded run trains what the DDP run trains,
evaluates and saves the whole model, and a stopped-and-resumed sharded run ends where an uninterrupted one does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _free_port, final_weights, metrics, write_config

import mm
from mm.config import ConfigError
from mm.train.preflight import load_run_config
from mm.train.trainer import build_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # long end-to-end runs: `make test-slow`


def launch(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "train.py"), str(config), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_fsdp_trains_like_ddp_evaluates_and_resumes(colour_shards, tmp_path):
    sections = {"train": {"steps": 4, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1, "grad_accum": 2},
                "eval": {"batch_size": 8, "zeroshot": {"shards": f"{colour_shards}/test-0000.tar"}}}
    ddp = write_config(tmp_path, colour_shards, "ddp", **sections)
    fsdp_sections = {**sections, "train": {**sections["train"], "fsdp": True}}
    sharded = write_config(tmp_path, colour_shards, "fsdp", **fsdp_sections)
    launch(ddp)
    proc = launch(sharded)
    assert "2 process(es) (FSDP)" in proc.stdout + proc.stderr
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert a[0]["world_size"] == b[0]["world_size"] == 2  # really two ranks
    # same data, same initial weights, 2 micro-batches per step, gradients averaged either way (all-reduce vs
    # reduce-scatter: the sums' rounding differs, Adam amplifies it where a gradient is ~0, so a tenth of an
    # lr = 1e-3 step is allowed)
    loss_a, loss_b = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
    assert len(loss_a) == len(loss_b) == 4 and loss_b == pytest.approx(loss_a, rel=1e-4)
    wa, wb = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    assert wa.keys() == wb.keys()  # the whole model, gathered: not a shard
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    eval_a, eval_b = ([r for r in recs if "zeroshot_top1" in r][-1] for recs in (a, b))
    assert eval_b["zeroshot_n"] == 16 and eval_b["zeroshot_top1"] == eval_a["zeroshot_top1"]
    final = next(r for r in b if r.get("final"))
    assert len(final["param_sha256"]) == 1  # one whole copy, on the main process
    assert isinstance(mm.load_pretrained(tmp_path / "fsdp" / "final"), mm.CLIP)

    # stopped after step 2 (checkpoint gathered from the shards) and resumed into a fresh sharded model
    resumed = write_config(tmp_path, colour_shards, "fsdp_resumed", **fsdp_sections)
    launch(resumed, "train.stop_after=2")
    proc = launch(resumed)
    assert "resumed from" in proc.stdout + proc.stderr
    wr = final_weights(tmp_path / "fsdp_resumed")
    assert max((wr[k] - wb[k]).abs().max().item() for k in wb) == 0.0

    # a checkpoint written by the sharded run cannot be resumed unsharded (its optimizer state is keyed by name)
    mixed = write_config(tmp_path, colour_shards, "fsdp_resumed", **sections)
    cmd = [sys.executable, str(ROOT / "train.py"), str(mixed), "train.steps=6"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "written with a sharded model" in proc.stdout + proc.stderr


@pytest.mark.parametrize("overrides, message", [
    ({"train.fsdp": True, "train.precision": "fp16"}, "fp32 or bf16"),
])
def test_fsdp_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, {"data.train": "x-{0000..0001}.tar", **overrides})
    assert message in str(e.value)


def test_fsdp_coca_trains_like_ddp_and_captions(colour_shards, tmp_path):
    """The captioning decoder's blocks shard too; the captioning evaluation runs on the gathered copy."""
    sections = {"model": "tiny-coca", "train": {"steps": 2, "warmup_steps": 1, "log_every": 1},
                "eval": {"batch_size": 8, "captioning": {"shards": f"{colour_shards}/test-0000.tar", "show": 1,
                                                         "generation": {"method": "greedy", "max_new_tokens": 5}}}}
    launch(write_config(tmp_path, colour_shards, "coca_ddp", **sections))
    sharded = {**sections, "train": {**sections["train"], "fsdp": True}}
    launch(write_config(tmp_path, colour_shards, "coca_fsdp", **sharded))
    a, b = metrics(tmp_path / "coca_ddp"), metrics(tmp_path / "coca_fsdp")
    for key in ("loss", "caption_loss"):
        assert [r[key] for r in b if key in r] == pytest.approx([r[key] for r in a if key in r], rel=1e-4)
    cap_a, cap_b = ([r for r in recs if "caption_bleu4" in r][-1] for recs in (a, b))
    assert cap_b["caption_n"] == 16 and cap_b["caption_bleu4"] == pytest.approx(cap_a["caption_bleu4"], abs=1e-6)
    wa, wb = final_weights(tmp_path / "coca_ddp"), final_weights(tmp_path / "coca_fsdp")
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_fsdp_with_a_frozen_tower_equals_ddp(colour_shards, tmp_path):
    """LiT (train.freeze: [vision]) sharded: frozen units hold no gradients, and the frozen weights stay exact."""
    sections = {"train": {"steps": 2, "warmup_steps": 1, "log_every": 1, "freeze": ["vision"]}}
    ddp = write_config(tmp_path, colour_shards, "lit_ddp", **sections)
    launch(ddp)
    launch(write_config(tmp_path, colour_shards, "lit_fsdp", train={**sections["train"], "fsdp": True}))
    wa, wb = final_weights(tmp_path / "lit_ddp"), final_weights(tmp_path / "lit_fsdp")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    start = build_model(load_run_config(str(ddp))).state_dict()  # the initial weights, as every rank built them
    frozen = [k for k in wa if k.startswith("vision.")]
    assert frozen and all(torch.equal(wb[k], start[k]) for k in frozen)  # the frozen tower is untouched
    assert all(not torch.equal(wb[k], start[k]) for k in wb if k.startswith("text.") and wb[k].ndim == 2)


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-coca"])
def test_gradient_caching_under_fsdp_trains_like_ddp(model, colour_shards, tmp_path):
    """train.grad_cache_chunk with train.fsdp: the graph-free first pass (the model's `embed`, registered with FSDP2
    as a forward method so it gathers the shards as forward does) and the chunked second pass give what gradient
    caching gives under DDP, step for step (the tolerances of the FSDP-vs-DDP test above)."""
    sections = {"model": model, "train": {"steps": 4, "warmup_steps": 1, "log_every": 1, "grad_cache_chunk": 2}}
    ddp = write_config(tmp_path, colour_shards, "ddp", **sections)
    sharded = write_config(tmp_path, colour_shards, "fsdp", **{**sections, "train": {**sections["train"],
                                                                                     "fsdp": True}})
    launch(ddp)
    proc = launch(sharded)
    assert "(FSDP)" in proc.stdout + proc.stderr and "gradient caching in chunks of 2" in proc.stdout + proc.stderr
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert a[0]["world_size"] == b[0]["world_size"] == 2
    loss_a, loss_b = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
    assert len(loss_a) == len(loss_b) == 4 and loss_b == pytest.approx(loss_a, rel=1e-4)
    assert all(r["grad_cache_chunks"] == 2 for r in b if "loss" in r)
    wa, wb = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_distillation_under_fsdp_trains_like_ddp_and_resumes(colour_shards, tmp_path):
    """Distillation's projection (the objective's own parameter: replicated, its gradient averaged by the task, its
    optimizer state saved under "task") trains under FSDP as under DDP; a sharded run stopped and resumed ends
    where the uninterrupted one does (teacher of another width: the projection exists)."""
    from safetensors.torch import load_file

    torch.manual_seed(5)
    teacher = mm.save_pretrained(mm.create_model("tiny-clip", embed_dim=48), tmp_path / "teacher")
    sections = {"train": {"steps": 4, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1},
                "distill": {"teacher": str(teacher), "kl_weight": 1.0, "feature_weight": 0.5}}
    fsdp_sections = {**sections, "train": {**sections["train"], "fsdp": True}}
    launch(write_config(tmp_path, colour_shards, "ddp", **sections))
    proc = launch(write_config(tmp_path, colour_shards, "fsdp", **fsdp_sections))
    assert "2 process(es) (FSDP)" in proc.stdout + proc.stderr and "distilling" in proc.stdout + proc.stderr
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    for key in ("loss", "kl_loss", "feature_loss"):
        va, vb = [r[key] for r in a if key in r], [r[key] for r in b if key in r]
        assert len(va) == len(vb) == 4 and vb == pytest.approx(va, rel=1e-4), key
    wa, wb = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    pa, pb = (load_file(str(tmp_path / run / "checkpoints" / "step_4" / "distill.safetensors")) for run in ("ddp", "fsdp"))
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-4
    final = next(r for r in b if r.get("final"))
    assert len(set(final["distill_sha256"])) == 1  # the projection identical on both ranks
    resumed = write_config(tmp_path, colour_shards, "fsdp_resumed", **fsdp_sections)
    launch(resumed, "train.stop_after=2")
    assert "resumed from" in (lambda p: p.stdout + p.stderr)(launch(resumed))
    wr = final_weights(tmp_path / "fsdp_resumed")
    assert max((wr[k] - wb[k]).abs().max().item() for k in wb) == 0.0
    pr = load_file(str(tmp_path / "fsdp_resumed" / "checkpoints" / "step_4" / "distill.safetensors"))
    assert all(torch.equal(pr[k], pb[k]) for k in pb)


def test_lora_under_fsdp_trains_like_ddp_and_resumes(colour_shards, tmp_path):
    """train.lora with train.fsdp: the adapters sharded with their layers train as under DDP; checkpoints hold
    them whole (gathered) with their optimizer state, a stopped run resumes exactly, and final/ is the adapter
    directory (the same files as DDP's, to the FSDP-vs-DDP tolerance), naming the same base hash."""
    import json

    from safetensors.torch import load_file

    torch.manual_seed(7)
    base = mm.save_pretrained(mm.create_model("tiny-clip"), tmp_path / "base")
    sections = {"train": {"steps": 4, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1, "lr": 1e-2,
                          "init_from": str(base), "lora": {"rank": 4, "targets": ["*.attn", "*.mlp"]}}}
    fsdp_sections = {"train": {**sections["train"], "fsdp": True}}
    launch(write_config(tmp_path, colour_shards, "ddp", **sections))
    proc = launch(write_config(tmp_path, colour_shards, "fsdp", **fsdp_sections))
    assert "(FSDP)" in proc.stdout + proc.stderr and "LoRA rank 4" in proc.stdout + proc.stderr
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    loss_a, loss_b = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
    assert len(loss_a) == len(loss_b) == 4 and loss_b == pytest.approx(loss_a, rel=1e-4)
    fa, fb = (load_file(str(tmp_path / run / "final" / "adapter_model.safetensors")) for run in ("ddp", "fsdp"))
    assert fa.keys() == fb.keys() and fa and max((fa[k] - fb[k]).abs().max().item() for k in fa) < 1e-4
    assert any(k.endswith("lora_B.weight") and fb[k].abs().max() > 0 for k in fb)  # the adapters trained
    meta = [json.loads((tmp_path / run / "final" / "adapter_config.json").read_text()) for run in ("ddp", "fsdp")]
    assert meta[0] == meta[1]
    resumed = write_config(tmp_path, colour_shards, "fsdp_resumed", **fsdp_sections)
    launch(resumed, "train.stop_after=2")
    assert "resumed from" in (lambda p: p.stdout + p.stderr)(launch(resumed))
    fr = load_file(str(tmp_path / "fsdp_resumed" / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(fr[k], fb[k]) for k in fb)


def test_compiled_fsdp_trains_like_eager_fsdp(colour_shards, tmp_path):
    """train.compile with train.fsdp: the sharded model compiled (inductor; FSDP2's hooks stay eager) trains what
    the eager sharded model trains, to the kernels' rounding."""
    sections = {"train": {"steps": 3, "warmup_steps": 1, "log_every": 1, "fsdp": True}}
    launch(write_config(tmp_path, colour_shards, "eager", **sections))
    launch(write_config(tmp_path, colour_shards, "compiled", **{"train": {**sections["train"], "compile": True}}))
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    loss_a, loss_b = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
    assert len(loss_a) == len(loss_b) == 3 and loss_b == pytest.approx(loss_a, rel=1e-4)
    wa, wb = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
