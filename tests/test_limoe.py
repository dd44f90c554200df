"""Mixture-of-Experts models end to end: two-tower MoE and one-tower LIMoE train, share their experts
across modalities, compute LIMoE's entropy losses by their formulas, keep routing through save / load and
bf16, and train on 2 processes with routing statistics logged and plotted."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import mm
from mm.config import ConfigError
from mm.layers import MoE, MoEConfig, text_valid_mask
from mm.layers.moe import expert_capacity

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square", "a green circle", "two blue triangles", "a yellow star on black",
            "an orange ring", "a purple cross", "three white dots", "a grey line"]


def _batch(model: mm.CLIP, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    return torch.randn(n, 3, size, size, generator=g), mm.get_tokenizer(model)(CAPTIONS[:n])


def _train(model: mm.CLIP, images: torch.Tensor, tokens: torch.Tensor, steps: int) -> tuple[list[float], list]:
    """AdamW steps on one fixed batch; the loss of every step and the router stats of the first."""
    loss_fn = mm.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses, first_stats = [], None
    for _ in range(steps):
        out = model(images, tokens)
        loss = loss_fn(out)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        first_stats = first_stats or out.router_stats
    return losses, first_stats


def _experts_used(stats: dict[str, list]) -> dict[str, list[int]]:
    return {tower: [int((s.load > 0).sum()) for s in layers] for tower, layers in stats.items()}


# ----------------------------------------------------------------------------------------------------
# Training and sharing
# ----------------------------------------------------------------------------------------------------

def test_tiny_moe_trains_and_routes_tokens_to_several_experts():
    torch.manual_seed(0)
    model = mm.create_model("tiny-moe")
    images, tokens = _batch(model)
    losses, stats = _train(model, images, tokens, steps=8)
    assert losses[-1] < 0.7 * losses[0], losses
    used = _experts_used(stats)
    assert len(used["vision"]) == 3 and len(used["text"]) == 2  # MoE in every second block
    assert all(n > 1 for layers in used.values() for n in layers), used


def test_limoe_trains_with_one_stack_whose_experts_serve_both_modalities():
    torch.manual_seed(0)
    model = mm.create_model("tiny-limoe")
    assert isinstance(model, mm.LIMoE) and model.vision.transformer is None and model.text.transformer is None
    experts = [n for n, _ in model.named_parameters() if n.endswith(".w1")]
    assert experts and all(n.startswith("transformer.blocks.") for n in experts)  # one set of experts
    images, tokens = _batch(model)

    moes = [b.ffn for b in model.transformer.blocks if b.is_moe]

    def moe_grads(loss: torch.Tensor) -> list[tuple[float, float]]:
        """Gradient size reaching each MoE layer's router and experts."""
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [(m.router.weight.grad.abs().sum().item(), m.w1.grad.abs().sum().item()) for m in moes]

    from_images = moe_grads(model.encode_image(images).square().sum())
    assert model.text.token_embedding.weight.grad is None  # an image-only loss
    from_texts = moe_grads(model.encode_text(tokens).square().sum())
    assert model.vision.patch_embed.weight.grad is None  # a text-only loss
    # the same router and expert tensors of every MoE layer learn from either modality
    assert len(moes) == 3 and all(min(g) > 0 for g in from_images + from_texts), (from_images, from_texts)

    losses, stats = _train(model, images, tokens, steps=8)
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(stats) == {"vision", "text"} and all(len(v) == 3 for v in stats.values())
    assert all(n > 1 for layers in _experts_used(stats).values() for n in layers)


def test_limoe_embeddings_are_each_modality_alone_and_feed_the_contrastive_loss():
    torch.manual_seed(0)
    model = mm.create_model("tiny-limoe").eval()  # eval capacity unlimited: routing is per token
    images, tokens = _batch(model, 4)
    out = model(images, tokens)
    img, txt = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    # stacked in one call, an image still sees only its patches and a text only its tokens
    torch.testing.assert_close(out.image_emb, img, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.text_emb, txt, atol=1e-6, rtol=0)
    logits = out.logit_scale * img @ txt.T
    labels = torch.arange(4)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    losses = mm.ClipLoss()(out)
    torch.testing.assert_close(losses["contrastive_loss"], ref)
    torch.testing.assert_close(losses["loss"], ref + out.aux_loss)


@pytest.mark.parametrize("causal, calls_per_layer", [(False, 1), (True, 2)])
def test_limoe_routes_both_modalities_in_one_call_unless_text_is_causal(causal, calls_per_layer):
    model = mm.create_model("tiny-limoe", text__causal=causal)
    calls = []
    for blk in model.transformer.blocks:
        if blk.is_moe:
            blk.ffn.register_forward_hook(lambda mod, args, result: calls.append(result[1]))
    images, tokens = _batch(model, 2)
    out = model(images, tokens)
    assert len(calls) == 3 * calls_per_layer
    assert [len(s.groups) for s in calls] == [2 // calls_per_layer] * len(calls)
    # each modality's statistics count its own tokens: 2 images x 65 tokens; texts up to their end token
    n_text = int(text_valid_mask(tokens, eot_id=model.config.text.eot_id, pad_id=model.config.text.pad_id).sum())
    for modality, n in (("vision", 2 * 65), ("text", n_text)):
        for s in out.router_stats[modality]:
            assert (s.load * n).round().sum().item() == n  # top-1: one assignment per token


# ----------------------------------------------------------------------------------------------------
# LIMoE's entropy losses
# ----------------------------------------------------------------------------------------------------

def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum(-1)


def _reference_losses(moe: MoE, x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """LIMoE's per-group losses, straight from the router probabilities: x (n, d), groups (n, G) bool."""
    cfg = moe.cfg
    probs = (x @ moe.router.weight.T).softmax(-1)
    total, per_group = 0.0, []
    for g in range(groups.shape[1]):
        p = probs[groups[:, g]]
        local, glob = _entropy(p).mean(), _entropy(p.mean(0))
        tau = cfg.global_entropy_threshold
        glob_term = -glob if tau is None else torch.clamp(tau - glob, min=0)
        loss = cfg.local_entropy_weight * local + cfg.global_entropy_weight * glob_term
        per_group.append({"local": local, "global": glob, "loss": loss})
        total = total + loss
    return total, per_group


def _moe(**cfg) -> MoE:
    torch.manual_seed(5)
    return MoE(6, 12, MoEConfig(num_experts=4, top_k=2, capacity_factor=None, **cfg))


def test_entropy_losses_equal_the_formula_per_group_and_enter_aux_loss():
    moe = _moe(local_entropy_weight=0.3, global_entropy_weight=0.7)
    x = torch.randn(2, 9, 6)
    groups = torch.zeros(2, 9, 2, dtype=torch.bool)
    groups[0, :7, 0] = True  # row 0: 7 tokens of group 0, then padding
    groups[1, :4, 1] = True  # row 1: 4 tokens of group 1
    y, stats = moe(x, groups)
    real = groups.any(-1)
    xr, gr = x[real], groups[real]
    ref, per_group = _reference_losses(moe, xr, gr)
    torch.testing.assert_close(stats.entropy_loss, ref)
    for s, r, g in zip(stats.groups, per_group, gr.T):
        torch.testing.assert_close(s.entropy, r["local"].detach())
        torch.testing.assert_close(s.global_entropy, r["global"].detach())
        torch.testing.assert_close(s.entropy_loss, r["loss"])
        expert = (xr[g] @ moe.router.weight.T).topk(2, -1).indices
        torch.testing.assert_close(s.load, torch.bincount(expert.flatten(), minlength=4) / expert.numel())
    # load balancing and z-loss stay over the whole call (all groups routed together)
    probs = (xr @ moe.router.weight.T).softmax(-1)
    expert = probs.topk(2, -1).indices
    lb = 4 * (torch.bincount(expert.flatten(), minlength=4) / expert.numel() * probs.mean(0)).sum()
    z = torch.logsumexp(xr @ moe.router.weight.T, -1).pow(2).mean()
    torch.testing.assert_close(stats.aux_loss, 0.01 * lb + 0.001 * z + ref)
    assert torch.all(y[~real] == 0)
    # the losses train the router: same gradient as the formula's
    got = torch.autograd.grad(stats.entropy_loss, moe.router.weight, retain_graph=True)[0]
    want = torch.autograd.grad(ref, moe.router.weight)[0]
    torch.testing.assert_close(got, want)


def test_without_groups_the_call_is_one_group():
    moe = _moe(local_entropy_weight=0.2, global_entropy_weight=0.5)
    x = torch.randn(3, 5, 6)
    _, stats = moe(x)
    ref, (r,) = _reference_losses(moe, x.reshape(-1, 6), torch.ones(15, 1, dtype=torch.bool))
    assert stats.groups is None
    torch.testing.assert_close(stats.entropy_loss, ref)
    torch.testing.assert_close(stats.global_entropy, r["global"].detach())


def test_global_entropy_threshold_switches_the_term_off_once_reached():
    x = torch.randn(20, 6)
    h = _entropy((x @ _moe().router.weight.T).softmax(-1).mean(0)).item()  # the batch's global entropy
    for tau in (h - 0.05, h + 0.05):
        moe = _moe(global_entropy_weight=1.0, global_entropy_threshold=tau)
        _, stats = moe(x)
        torch.testing.assert_close(stats.entropy_loss, _reference_losses(moe, x, torch.ones(20, 1, dtype=torch.bool))[0])
        if tau < h:  # reached: no loss and no gradient
            assert stats.entropy_loss.item() == 0.0
            assert torch.autograd.grad(stats.entropy_loss, moe.router.weight)[0].abs().max() == 0
        else:
            assert stats.entropy_loss.item() == pytest.approx(tau - h, abs=1e-5)
    with pytest.raises(ConfigError, match=r"one_tower\.moe\.global_entropy_threshold: must be in \[0, log"):
        mm.create_model("tiny-limoe", one_tower__moe__global_entropy_threshold=4)  # experts, not nats


@pytest.mark.parametrize("top_k", [1, 2])
def test_batch_priority_routing_gives_slots_to_the_most_confident_tokens(top_k):
    torch.manual_seed(6)
    e, n, d = 4, 30, 6
    moe = MoE(d, 10, MoEConfig(num_experts=e, top_k=top_k, capacity_factor=0.5, batch_priority=True)).train()
    x = torch.randn(n, d)
    y, stats = moe(x)
    probs = (x @ moe.router.weight.T).softmax(-1)
    gate, expert = probs.topk(top_k, -1)
    gate = gate / gate.sum(-1, keepdim=True) if top_k > 1 else gate
    cap = expert_capacity(n, e, top_k, 0.5)
    fill, ref, dropped = [0] * e, torch.zeros_like(x), 0
    for c in range(top_k):  # token loop: first choices first, each choice by descending top probability
        for i in probs.amax(-1).argsort(descending=True).tolist():
            ex = int(expert[i, c])
            if fill[ex] >= cap:
                dropped += 1
                continue
            fill[ex] += 1
            ref[i] += gate[i, c] * (moe.act(x[i] @ moe.w1[ex] + moe.b1[ex]) @ moe.w2[ex] + moe.b2[ex])
    assert dropped > 0
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    assert stats.dropped_fraction.item() == pytest.approx(dropped / (top_k * n))
    moe.cfg = dataclasses.replace(moe.cfg, batch_priority=False)  # batch order drops other tokens
    assert not torch.allclose(moe(x)[0], y)


@pytest.mark.parametrize("overrides, message", [
    ({"vision__transformer__depth": 2}, r"vision\.transformer: must be null in a one-tower model"),
    ({"text__pos_embed": "rope"}, r"text\.pos_embed: a one-tower model needs learned positions"),
    ({"one_tower__moe__local_entropy_weight": -1}, r"one_tower\.moe\.local_entropy_weight: must be >= 0"),
])
def test_one_tower_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        mm.create_model("tiny-limoe", **overrides)


def test_two_tower_config_needs_its_stacks():
    with pytest.raises(ConfigError, match=r"text\.transformer: required"):
        mm.create_model("tiny-clip", text__transformer=None)


# ----------------------------------------------------------------------------------------------------
# Persistence and precision
# ----------------------------------------------------------------------------------------------------

def _capture_moe_calls(model: torch.nn.Module) -> tuple[list, list]:
    """(name, args, stats) of every MoE call in the next forwards; returns (records, hook handles)."""
    records, handles = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, MoE):
            handles.append(mod.register_forward_hook(
                lambda m, args, result, name=name: records.append((name, args, result[1]))))
    return records, handles


def _assert_same_routing(a, b) -> None:
    assert torch.equal(a.load, b.load) and torch.equal(a.dropped_fraction, b.dropped_fraction)
    assert a.entropy.item() == b.entropy.item()  # same fp32 router probabilities, bit for bit


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-limoe"])
def test_moe_models_keep_routing_through_save_load_and_bf16(name, tmp_path):
    torch.manual_seed(0)
    model = mm.create_model(name).eval()
    with torch.no_grad():  # weights bf16 holds exactly: converting then changes no weight, only dtypes
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    images, tokens = _batch(model, 4)
    with torch.no_grad():
        out = model(images, tokens)

        mm.save_pretrained(model, tmp_path / "m")
        loaded = mm.load_pretrained(tmp_path / "m").eval()
        again = loaded(images, tokens)
        assert torch.equal(again.image_emb, out.image_emb) and torch.equal(again.text_emb, out.text_emb)
        for tower, layers in out.router_stats.items():
            for a, b in zip(layers, again.router_stats[tower], strict=True):
                _assert_same_routing(a, b)

        # bf16 weights, and fp32 weights under bf16 autocast: every MoE layer routes its input exactly as
        # the fp32 model routes that same input (the router runs in fp32 on fp32 copies)
        fp32_moes = dict(model.named_modules())
        half = copy.deepcopy(model).to(torch.bfloat16)
        for runner, run in ((half, lambda: half(images.bfloat16(), tokens)),
                            (model, lambda: torch.autocast("cpu", dtype=torch.bfloat16)(model)(images, tokens))):
            calls, handles = _capture_moe_calls(runner)
            low = run()
            for h in handles:
                h.remove()
            assert len(calls) == {"tiny-moe": 5, "tiny-limoe": 3}[name]  # LIMoE: one call per layer
            for mod_name, (x, *valid), stats in calls:
                _, ref = fp32_moes[mod_name](x.float(), *valid)
                _assert_same_routing(stats, ref)
            assert F.cosine_similarity(low.image_emb.float(), out.image_emb).min() > 0.98
            assert F.cosine_similarity(low.text_emb.float(), out.text_emb).min() > 0.98


# ----------------------------------------------------------------------------------------------------
# Training runs (subprocesses, as users run them)
# ----------------------------------------------------------------------------------------------------

def _write_config(tmp_path: Path, shards: Path, out: str, model: str, zeroshot: bool = False) -> Path:
    cfg = {
        "model": model,
        "data": {"train": f"{shards}/train-{{0000..0002}}.tar", "batch_size": 4, "workers": 1, "shuffle_buffer": 8},
        "train": {"steps": 4, "warmup_steps": 1, "lr": 1e-3, "checkpoint_every": 0, "log_every": 2, "seed": 1},
        "eval": {"batch_size": 8, **({"zeroshot": {"shards": f"{shards}/test-0000.tar"}} if zeroshot else {})},
        "output_dir": str(tmp_path / out),
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_routing_logged(run: Path, towers: dict[str, list[int]]) -> None:
    recs = [r for r in _metrics(run) if any(k.startswith("moe/") for k in r)]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        assert {k.rsplit("/", 1)[0] for k in r if k.startswith("moe/")} == {
            f"moe/{t}/{b}" for t, blocks in towers.items() for b in blocks}
        for t, blocks in towers.items():
            for b in blocks:
                load = r[f"moe/{t}/{b}/load"]
                assert len(load) == 8 and min(load) >= 0 and sum(load) == pytest.approx(1, abs=1e-3)
                assert 0 <= r[f"moe/{t}/{b}/dropped"] <= 1 and 0 < r[f"moe/{t}/{b}/entropy"] <= math.log(8) + 1e-6
    png = (run / "experts.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_process_moe_training_keeps_ranks_identical_and_logs_routing(colour_shards, tmp_path):
    cfg = _write_config(tmp_path, colour_shards, "ddp", "tiny-moe")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "train.py"), str(cfg)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = _metrics(tmp_path / "ddp")
    assert recs[0]["world_size"] == 2
    final = next(r for r in recs if r.get("final"))
    assert len(final["param_sha256"]) == 2 and len(set(final["param_sha256"])) == 1
    _assert_routing_logged(tmp_path / "ddp", {"vision": [1, 3, 5], "text": [1, 3]})


def test_limoe_trains_and_evaluates_with_only_the_model_changed(colour_shards, tmp_path):
    cfg = _write_config(tmp_path, colour_shards, "limoe", "tiny-limoe", zeroshot=True)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "limoe"
    recs = _metrics(run)
    assert all(r["aux_loss"] > 0 for r in recs if "loss" in r)
    assert any("zeroshot_top1" in r for r in recs)  # the zero-shot classifier encodes texts alone
    _assert_routing_logged(run, {"vision": [1, 3, 5], "text": [1, 3, 5]})
    assert isinstance(mm.load_pretrained(run / "final"), mm.LIMoE)
