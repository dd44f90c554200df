"""Optimizer parameter groups, the learning-rate schedule and the gradient norm."""
from __future__ import annotations

import math

import pytest
import torch

import mm
from mm.train.optim import (
    grad_norm,
    lr_factor,
    make_optimizer,
    make_scheduler,
    param_groups,
)


def test_no_weight_decay_on_norms_biases_embeddings_and_logit_scale():
    model = mm.create_model("tiny-siglip", vision__pool="attn")
    decay, keep = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"logit_scale", "logit_bias", "text.token_embedding.weight", "text.pos_embed", "vision.pos_embed",
            "vision.cls_token", "vision.attn_pool.query", "vision.norm.weight", "vision.norm.bias",
            "text.transformer.blocks.0.attn.qkv.bias"} <= kept
    assert {"vision.patch_embed.weight", "text.transformer.blocks.0.attn.qkv.weight",
            "text.transformer.blocks.0.ffn.fc1.weight", "vision.proj.weight", "text.proj.weight"} <= decayed
    assert len(kept) + len(decayed) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0


def test_warmup_then_cosine():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, 10, 100, min_ratio=0.1) == pytest.approx(0.1)
    opt = make_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.1, (0.9, 0.98), 1e-6, torch.device("cpu"))
    sched = make_scheduler(opt, 4, 20, 1e-3, 0.0)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3)
    assert lrs[12] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))


def test_grad_norm_equals_the_clip_grad_norm_total():
    torch.manual_seed(0)
    model = mm.create_model("tiny-clip")
    out = model(torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (2, 32)))
    mm.ClipLoss()(out)["loss"].backward()
    ref = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    torch.testing.assert_close(grad_norm(model.parameters()), ref)
