"""LoRA's one mechanism (mm.layers.lora): an adapted layer is the same module with its class swapped for ``LoRA`` +
its class, Linear layers and MoE expert weights alike; the MoE layer holds no adapter code; adapter parameters are
found by module type, never by name; expert weights read adapted only inside the layer's forward (what FSDP2 needs);
the adapted model deep-copies, pickles, checkpoints its gradients and compiles."""
from __future__ import annotations

import copy
import io
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mm
from mm.hub import base_sha256
from mm.layers.config import LoraConfig
from mm.layers.lora import (
    LoRA,
    LoRALinear,
    WeightLoRA,
    add_lora,
    has_lora,
    is_lora_param,
    lora_parameters,
    lora_state_dict,
    lora_targets,
    lora_tensor_shapes,
    mark_only_lora_trainable,
    merge_lora,
)
from mm.layers.moe import MoE

ROOT = Path(__file__).resolve().parents[1]
ALL = LoraConfig(rank=4, alpha=8, targets=["*.*"])


def adapted(seed: int = 0, std: float = 0.05, dispatch: str | None = None):
    """tiny-moe (Linears and expert weights) with adapters everywhere, their factors random (B not zero)."""
    torch.manual_seed(seed)
    model = mm.create_model("tiny-moe").eval()
    if dispatch is not None:
        for m in model.modules():
            if isinstance(m, MoE):
                m.cfg.dispatch = dispatch
    add_lora(model, ALL)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def batch(model, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size, ctx = model.config.vision.image_size, model.config.text.context_length
    tokens = torch.randint(1, 400, (n, ctx), generator=g)
    tokens[:, 0], tokens[:, 6], tokens[:, 7:] = 49406, 49407, 0
    return torch.randn(n, 3, size, size, generator=g), tokens


def embeddings(model, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(images, tokens)
    return out.image_emb, out.text_emb


def first_moe(model) -> tuple[str, MoE]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, MoE))


def test_the_moe_layer_holds_no_adapter_code():
    source = (ROOT / "mm" / "layers" / "moe.py").read_text().lower()
    assert "lora" not in source and "adapter" not in source


def test_adapting_keeps_modules_and_names_and_merging_gives_their_classes_back():
    torch.manual_seed(0)
    model = mm.create_model("tiny-moe").eval()
    base_keys = list(model.state_dict())
    base_names = [n for n, _ in model.named_parameters()]
    qkv, (moe_name, moe) = model.vision.transformer.blocks[0].attn.qkv, first_moe(model)
    w1 = moe.w1
    add_lora(model, ALL)
    # the same objects, now of the adapted classes; their own parameters where they were
    assert model.vision.transformer.blocks[0].attn.qkv is qkv and isinstance(qkv, LoRALinear)
    assert model.get_submodule(moe_name) is moe and isinstance(moe, WeightLoRA) and isinstance(moe, MoE)
    assert moe.lora_weights() == ("w1", "w2") and moe._parameters["w1"] is w1
    keys = list(model.state_dict())
    assert [k for k in keys if k in set(base_keys)] == base_keys  # base keys unchanged, in their order
    assert set(keys) - set(base_keys) == set(lora_state_dict(model)) == set(lora_parameters(model))
    assert [n for n, _ in model.named_parameters() if n in set(base_names)] == base_names
    merge_lora(model)
    assert type(qkv) is nn.Linear and type(moe) is MoE and moe._parameters["w1"] is w1
    assert not has_lora(model) and list(model.state_dict()) == base_keys
    assert not hasattr(qkv, "lora_A") and not hasattr(moe, "lora_w1") and "_lora_calls" not in vars(moe)
    assert not moe._forward_pre_hooks and not moe._forward_hooks  # the forward marks are gone too


def test_adapter_parameters_are_found_by_module_type_not_by_name():
    model = adapted()
    # a base layer whose name looks like an adapter factor's (``.lora_B.``: what a name test took for one)
    model.vision.lora_B = nn.Linear(3, 3)
    found = lora_parameters(model)
    assert "vision.lora_B.weight" not in found and "vision.lora_B.weight" not in lora_state_dict(model)
    assert all(is_lora_param(n) for n in found)
    factors = {id(p) for m in model.modules() if isinstance(m, LoRA) for p, _ in m.lora_factors().values()}
    assert {id(p) for p in found.values()} == factors
    mark_only_lora_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(found)
    before = base_sha256(model)
    with torch.no_grad():
        model.vision.lora_B.weight.add_(1.0)
    assert base_sha256(model) != before  # part of the base, hashed with it
    zero = lora_parameters(model, zero_only=True)
    assert zero and all(n.endswith(("lora_B.weight", ".B")) for n in zero)
    assert set(zero) < set(found) and len(found) == 2 * len(zero)


def test_factor_names_and_shapes_come_from_one_place():
    torch.manual_seed(0)
    model = mm.create_model("tiny-moe")
    layers = lora_targets(model, ALL)
    want = lora_tensor_shapes(model, layers, ALL.rank)
    add_lora(model, ALL, targets=layers)
    assert want == {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    assert any(k.endswith(".ffn.lora_w1.A") for k in want) and any(k.endswith(".qkv.lora_A.weight") for k in want)


def test_expert_weights_read_adapted_only_inside_the_forward():
    model = adapted()
    name, moe = first_moe(model)
    w1 = moe._parameters["w1"]
    assert moe.w1 is w1 and model.get_parameter(f"{name}.w1") is w1  # what FSDP2 and get_parameter reach
    seen = {}

    def look(module, args):  # a pre-hook registered after the adapter's: it runs inside the forward
        seen.setdefault("w1", module.w1.detach().clone())

    moe.register_forward_pre_hook(look)
    images, tokens = batch(model)
    embeddings(model, images, tokens)
    assert torch.equal(seen["w1"], w1 + moe.lora_delta("w1")) and not torch.equal(seen["w1"], w1)
    assert moe.w1 is w1
    with pytest.raises(RuntimeError):
        moe(torch.randn(3, 5))  # a width the layer does not take: its forward fails half-way
    assert moe.w1 is w1  # and leaves no mark


def test_adapted_model_deep_copies_and_pickles():
    model = adapted()
    images, tokens = batch(model)
    want = embeddings(model, images, tokens)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)]
    for c in copies:
        assert type(first_moe(c)[1]) is type(first_moe(model)[1])
        assert all(torch.equal(a, b) for a, b in zip(embeddings(c, images, tokens), want, strict=True))
    merge_lora(copies[0])
    assert has_lora(model) and first_moe(model)[1].w1 is first_moe(model)[1]._parameters["w1"]
    assert all(torch.equal(a, b) for a, b in zip(embeddings(model, images, tokens), want, strict=True))


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    grads = []
    for checkpointing in (False, True):
        model = adapted()
        mark_only_lora_trainable(model)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        out = model(*batch(model))
        ((out.image_emb * out.text_emb).sum() + out.aux_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == set(lora_parameters(model))
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])


def test_a_compiled_adapted_block_computes_what_the_eager_one_does():
    # the padded dispatch: torch.compile's fake tensors reject the fp32 grouped_mm on CPU, adapters or not
    model = adapted(dispatch="padded")
    mark_only_lora_trainable(model)
    block = next(b for b in model.vision.transformer.blocks if isinstance(b.ffn, MoE))
    x = torch.randn(2, 17, model.config.vision.transformer.width)

    def run(fn):
        for p in block.parameters():
            p.grad = None
        y, stats = fn(x)
        (y.square().sum() + stats.aux_loss).backward()
        return y.detach(), {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    y0, g0 = run(block)
    y1, g1 = run(torch.compile(block, backend="aot_eager"))
    assert torch.allclose(y0, y1, atol=1e-6) and g0.keys() == g1.keys() and len(g0) == 8  # 4 factors x 2 layers + 2
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-6) for n in g0)


_FSDP_WORKER = r"""
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, os.environ["TESTS"])
from test_lora_mechanism import adapted, batch
from mm.layers.lora import mark_only_lora_trainable
from mm.train.fsdp import shard_model

def step(model):
    out = model(*batch(model, 4))
    loss = (out.image_emb * out.text_emb).sum() + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

torch.set_num_threads(1)
dist.init_process_group("gloo")
ref = adapted()
mark_only_lora_trainable(ref)
ref_loss, ref_grads = step(ref)
model = adapted()
mark_only_lora_trainable(model)
shard_model(model)
loss, grads = step(model)
grads = {n: g.full_tensor() for n, g in grads.items()}
assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))[:4]
assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
assert all(torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6) for n in grads)
model.float()  # FSDP2 re-reads every parameter by getattr: the expert weights must be the parameters
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes: ~20 s
def test_fsdp2_shards_an_adapted_model_and_computes_what_the_whole_one_does(tmp_path):
    """mm's FSDP2 units (one per Block) over LoRA Linears and expert weights on 2 gloo CPU ranks: the loss and every
    adapter gradient equal the unsharded model's (the trainer's train.lora + train.fsdp: tests/test_fsdp.py)."""
    script = tmp_path / "worker.py"
    script.write_text(_FSDP_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script)]
    env = {**os.environ, "TESTS": str(ROOT / "tests"), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
