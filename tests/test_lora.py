"""LoRA: adapters on every tower's shared blocks (fused qkv, attention output, MLP / SwiGLU, MoE experts), exact at
initialisation and when merged; adapter files in peft's layout that check their base; training that changes only
the adapters, resumes bit-for-bit, keeps two processes identical and adapts a CoCa decoder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_colour_shards
from safetensors.torch import load_file

import mm
from mm.cli.common import MODEL_ARGS
from mm.config import ConfigError
from mm.hub import AdapterError, base_sha256, load_adapter, load_model, save_adapter
from mm.layers.config import LoraConfig
from mm.layers.lora import (
    LoraError,
    LoRALinear,
    add_lora,
    has_lora,
    is_lora_param,
    lora_state_dict,
    lora_targets,
    merge_lora,
)
from mm.train.preflight import load_run_config
from mm.train.trainer import run

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["tiny-clip", "tiny-coca", "tiny-moe", "tiny-limoe"]


def batch(cfg: mm.ModelConfig, n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    tokens = torch.randint(1, 400, (n, cfg.text.context_length), generator=g)
    tokens[:, 0], tokens[:, 6], tokens[:, 7:] = 49406, 49407, 0  # start, end, padding: real captions
    return torch.randn(n, 3, size, size, generator=g), tokens


def outputs(model, images, tokens) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(images, tokens)
    extra = [out.caption_logits] if out.caption_logits is not None else []
    return [out.image_emb, out.text_emb, *extra]


def same_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether two models' outputs are equal bit for bit, output by output (as many of them: a CoCa's caption logits
    missing from one side is a difference, not a shorter comparison)."""
    assert len(a) == len(b), (len(a), len(b))
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest elementwise difference between two models' outputs (same count, same shapes: no broadcasting)."""
    assert len(a) == len(b), (len(a), len(b))
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def randomise_adapters(model, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_param(name):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def fresh(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    return mm.create_model(preset).eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_adapted_model_equals_its_base_at_init_and_merged_equals_unmerged(preset):
    model = fresh(preset)
    images, tokens = batch(model.config)
    base = outputs(model, images, tokens)
    names = add_lora(model, LoraConfig(rank=4, targets=["*.*"]))
    kinds = {n.rsplit(".", 1)[1] for n in names}
    assert {"qkv", "proj", "fc1", "fc2"} <= kinds  # fused qkv, attention output, FFN
    if preset == "tiny-moe":
        assert {"w1", "w2"} <= kinds  # expert weights
    if preset == "tiny-coca":
        assert {"q", "kv"} <= kinds and any(n.startswith("decoder.") for n in names)  # cross-attention
    assert same_outputs(outputs(model, images, tokens), base)  # exactly the base
    randomise_adapters(model)
    unmerged = outputs(model, images, tokens)
    assert max_diff(unmerged, base) > 1e-3  # the adapters do something
    merge_lora(model)
    assert not has_lora(model) and not any(is_lora_param(k) for k in model.state_dict())
    assert set(model.state_dict()) == set(fresh(preset).state_dict())  # a plain model again
    merged = outputs(model, images, tokens)
    assert max_diff(merged, unmerged) < 1e-5


def test_targets_select_towers_and_kinds():
    model = fresh("tiny-coca")
    cfg = model.config
    vision_attn = lora_targets(model, LoraConfig(targets=["vision.attn"]))
    assert len(vision_attn) == 2 * cfg.vision.transformer.depth
    assert all(n.startswith("vision.transformer.blocks.") and n.endswith((".qkv", ".proj")) for n in vision_attn)
    text_mlp = lora_targets(model, LoraConfig(targets=["text.mlp"]))
    assert len(text_mlp) == 2 * cfg.text.transformer.depth and all(n.endswith((".fc1", ".fc2")) for n in text_mlp)
    qkv = lora_targets(model, LoraConfig(targets=["decoder.qkv"]))  # self qkv + cross q, kv of the decoder
    assert {n.rsplit(".", 1)[1] for n in qkv} == {"qkv", "q", "kv"}
    both = lora_targets(model, LoraConfig(targets=["vision.attn", "*.attn"]))
    assert len(both) == len(set(both))  # overlapping targets adapt each layer once
    assert set(both) == set(lora_targets(model, LoraConfig(targets=["*.attn"])))  # ... and every layer of either


@pytest.mark.parametrize("targets, rank, message", [
    (["audio.attn"], 4, r"no stack named 'audio'.*vision, text"),
    (["vision.experts"], 4, r"'vision.experts' selects no layer"),
    (["vision.attn"], 4096, r"rank 4096 is larger than layer vision\.transformer\.blocks\.0\.attn\.qkv"),
])
def test_bad_targets_and_ranks_are_named(targets, rank, message):
    with pytest.raises(LoraError, match=message):
        lora_targets(fresh("tiny-clip"), LoraConfig(rank=rank, targets=targets))


def test_adapter_files_round_trip_in_peft_layout_and_check_their_base(tmp_path):
    model = fresh("tiny-moe")
    base_hash = base_sha256(model)
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=["*.attn", "vision.experts"]))
    randomise_adapters(model)
    d = save_adapter(model, tmp_path / "adapter", LoraConfig(rank=4, alpha=8, targets=["*.attn", "vision.experts"]),
                     base="tiny-moe", base_hash=base_hash)
    peft_cfg = json.loads((d / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 8
    assert "vision.transformer.blocks.0.attn.qkv" in peft_cfg["target_modules"]
    tensors = load_file(str(d / "adapter_model.safetensors"))
    assert "base_model.model.vision.transformer.blocks.0.attn.qkv.lora_A.weight" in tensors
    assert set(tensors) == {f"base_model.model.{k}" for k in lora_state_dict(model)}  # the adapters, no base
    images, tokens = batch(model.config)
    again = load_adapter(fresh("tiny-moe"), d)
    assert same_outputs(outputs(again, images, tokens), outputs(model, images, tokens))

    other_weights = fresh("tiny-moe", seed=5)
    with pytest.raises(AdapterError, match=r"adapter: trained on other base weights"):
        load_adapter(other_weights, d)
    assert not has_lora(other_weights)  # refused before anything changed
    other_arch = fresh("tiny-clip")
    with pytest.raises(AdapterError, match=r"adapter.*(another architecture|has shape)"):
        load_adapter(other_arch, d, check_base=False)
    assert not has_lora(other_arch)


@pytest.mark.hf
def test_peft_reads_the_adapter_onto_the_base_model(tmp_path):
    """Hugging Face peft's own loader, given the mm base model and the adapter directory, computes exactly what mm's
    adapted model computes."""
    peft = pytest.importorskip("peft", reason="peft is part of the optional hf extra (pip install 'mm[hf]')")
    model = fresh("tiny-coca")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoraConfig(rank=4, alpha=8, targets=["*.attn", "text.mlp"])
    base_hash = base_sha256(model)
    add_lora(model, lora)
    randomise_adapters(model)
    d = save_adapter(model, tmp_path / "adapter", lora, base="tiny-coca", base_hash=base_hash)
    base = mm.create_model("tiny-coca").eval()
    base.load_state_dict(base_state)
    peft.PeftModel.from_pretrained(base, str(d))  # injects its own LoRA layers into the mm modules
    assert isinstance(base.vision.transformer.blocks[0].attn.qkv, peft.tuners.lora.LoraLayer)
    images, tokens = batch(model.config)
    assert same_outputs(outputs(base, images, tokens), outputs(model, images, tokens))


def test_an_adapter_directory_is_a_model_spec(tmp_path):
    base = fresh("tiny-clip")
    base_dir = mm.save_pretrained(base, tmp_path / "base")
    add_lora(base, LoraConfig(rank=2, targets=["text.mlp"]))
    randomise_adapters(base)
    d = save_adapter(base, tmp_path / "adapter", LoraConfig(rank=2, targets=["text.mlp"]),
                     base=str(base_dir), base_hash=base_sha256(base))
    images, tokens = batch(base.config)
    via_dir = load_model(d)  # the base it records, then the adapter
    via_option = load_model(base_dir, adapter=d)
    want = outputs(base, images, tokens)
    for m in (via_dir, via_option):
        assert same_outputs(outputs(m, images, tokens), want)
    # an adapter directory with another adapter: the message names the arguments as its caller does
    with pytest.raises(AdapterError, match=r"is an adapter directory; give its base as spec and it as adapter$"):
        load_model(d, adapter=d)
    with pytest.raises(AdapterError, match=r"give its base as --model and it as --adapter$"):
        load_model(d, adapter=d, names=MODEL_ARGS)


# -- training ------------------------------------------------------------------------------------------------------
def run_config(shards: Path, out: Path, *overrides: str):
    return load_run_config(None, [f"data.train={shards}/train-{{0000..0002}}.tar", "data.batch_size=4",
                                  "data.workers=0", "data.shuffle_buffer=8", "train.steps=6", "train.warmup_steps=1",
                                  "train.lr=0.003", "train.log_every=1", "train.checkpoint_every=0", "train.seed=1",
                                  f"output_dir={out}", *overrides])


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.mark.slow  # ~35 s: runs in CI's test-slow step
def test_lora_training_changes_only_the_adapters_and_resumes_bit_for_bit(model_dir, colour_shards, tmp_path):
    """bf16, gradient checkpointing, gradient accumulation and evaluation during training, as a user combines
    them; the same run stopped at step 3 and resumed equals the uninterrupted one exactly."""
    ov = [f"train.init_from={model_dir}", "train.lora.rank=4", "train.lora.targets=[vision.attn, text.mlp]",
          "train.precision=bf16", "train.grad_checkpointing=true", "train.grad_accum=2", "train.checkpoint_every=3",
          "eval.every=3", f"eval.zeroshot.shards={colour_shards}/test-0000.tar", "eval.zeroshot.max_samples=8",
          "eval.batch_size=8"]
    results = run(run_config(colour_shards, tmp_path / "full", *ov))
    assert "zeroshot_top1" in results
    full = tmp_path / "full"
    ckpt = full / "checkpoints" / "step_6"
    held = load_file(str(ckpt / "model.safetensors"))
    assert held and all(is_lora_param(k) for k in held)  # the checkpoint holds the adapters, not the base
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(held)  # optimizer state of the adapters alone
    assert not (full / "final" / "model.safetensors").exists()  # final/ is the adapter
    trained = load_model(full / "final")  # the base it names (model_dir) + the adapter
    start = mm.load_pretrained(model_dir).state_dict()
    now = trained.state_dict()
    assert all(torch.equal(now[k], v) for k, v in start.items())  # base bit-identical
    saved = adapter_tensors(full)
    layers = lora_targets(mm.load_pretrained(model_dir), LoraConfig(targets=["vision.attn", "text.mlp"]))
    assert layers and set(saved) == {f"base_model.model.{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    lora_b = [t for k, t in saved.items() if ".lora_B." in k]  # one per targeted layer (just checked)
    assert all(t.abs().max() > 0 for t in lora_b)  # B left zero at initialisation: trained

    run(run_config(colour_shards, tmp_path / "split", *ov, "train.stop_after=3"))
    run(run_config(colour_shards, tmp_path / "split", *ov))
    a, b = adapter_tensors(full), adapter_tensors(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_coca_decoder_adapters_learn_the_captions(colour_shards, tmp_path):
    torch.manual_seed(0)
    base = mm.save_pretrained(mm.create_model("tiny-coca"), tmp_path / "coca")
    cfg = run_config(colour_shards, tmp_path / "run", f"train.init_from={base}", "train.lora.rank=8",
                     "train.lora.targets=[decoder.*, text.attn]", "train.steps=24", "train.lr=0.01",
                     "train.warmup_steps=2")
    run(cfg)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["caption_loss"] for r in recs if "caption_loss" in r]
    assert len(losses) == 24
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    adapted = load_model(tmp_path / "run" / "final")
    assert any(isinstance(m, LoRALinear) for n, m in adapted.named_modules() if n.startswith("decoder."))


@pytest.mark.parametrize("override, message", [
    ("train.lora.targets=[audio.attn]", r"train\.lora\.targets: 'audio\.attn': no stack named 'audio'"),
    ("train.lora.targets=[vision]", r"train\.lora\.targets\[0\]: must be TOWER\.KIND"),
    ("train.lora.rank=1000", r"train\.lora\.rank 1000 is larger than layer"),
    ("train.freeze=[vision]", r"train\.freeze: does not apply with train\.lora"),
])
def test_lora_config_errors_name_the_key_before_work(colour_shards, tmp_path, override, message):
    from mm.train.preflight import preflight

    with pytest.raises(ConfigError, match=message):
        cfg = run_config(colour_shards, tmp_path / "run", "train.lora.rank=4", override)
        preflight(cfg)
    assert not (tmp_path / "run").exists()


def test_unquoted_glob_targets_on_the_command_line_are_read_as_written(colour_shards, tmp_path):
    """``[*.attn, *.mlp]`` is not YAML (``*`` starts an alias); an override reads it as the list the user means."""
    cfg = run_config(colour_shards, tmp_path / "run", "train.lora.targets=[*.attn, *.mlp]")
    assert cfg.train.lora.targets == ["*.attn", "*.mlp"]


@pytest.mark.slow
def test_two_process_lora_training_keeps_ranks_identical(model_dir, tmp_path):
    import socket

    import yaml

    shards = make_colour_shards(tmp_path / "shards")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {"data": {"train": f"{shards}/train-{{0000..0002}}.tar", "batch_size": 4, "workers": 1,
                    "shuffle_buffer": 8},
           "train": {"steps": 4, "warmup_steps": 1, "lr": 3e-3, "log_every": 1, "checkpoint_every": 2, "seed": 1,
                     "init_from": str(model_dir), "lora": {"rank": 4, "targets": ["*.attn", "*.mlp"]}},
           "output_dir": str(tmp_path / "ddp")}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(ROOT / "train.py"), str(tmp_path / "ddp.yaml")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["world_size"] == 2
    final = [r for r in recs if r.get("final")][0]
    assert len(final["param_sha256"]) == 2 and len(set(final["param_sha256"])) == 1
    start = mm.load_pretrained(model_dir).state_dict()
    now = load_model(tmp_path / "ddp" / "final").state_dict()
    assert all(torch.equal(now[k], v) for k, v in start.items())
