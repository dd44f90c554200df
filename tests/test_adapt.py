"""Adapting models: runs started from pretrained weights (train.init_from), frozen towers (bit-identical, out of
the optimizer, in eval mode), per-tower and layer-wise learning rates; linear probes; fine-tuning from the
zero-shot head with WiSE-FT interpolation (exact endpoints)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import colour_samples
from PIL import Image

import mm
from mm.cli import main
from mm.config import ConfigError
from mm.eval.probe import accuracy, fit_logistic, linear_probe
from mm.eval.zeroshot import predict, zero_shot_classifier
from mm.hub import load_config
from mm.train import adapt
from mm.train.classifier import Classifier, load_classifier, zero_shot_head
from mm.train.finetune import (
    FinetuneConfig,
    classifier_eval,
    finetune,
    snapshot,
    train_batches,
    trainable_names,
    wise_interpolate,
)
from mm.train.optim import lr_factor, make_optimizer, make_scheduler
from mm.train.preflight import load_run_config
from mm.train.trainer import build_model, run

CLASSES = ["red", "green", "blue", "yellow"]
TEMPLATES = ["a {} square", "a photo of something {}"]


def state(model_or_dir) -> dict[str, torch.Tensor]:
    model = mm.load_pretrained(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_config(shards: Path, out: Path, *overrides: str):
    return load_run_config(None, [f"data.train={shards}/train-{{0000..0002}}.tar", "data.batch_size=4",
                                  "data.workers=0", "data.shuffle_buffer=8", "train.steps=6", "train.warmup_steps=1",
                                  "train.lr=0.001", "train.log_every=1", "train.checkpoint_every=0", "train.seed=1",
                                  f"output_dir={out}", *overrides])


def test_init_from_a_directory_takes_its_weights_and_architecture(model_dir, colour_shards, tmp_path):
    cfg = run_config(colour_shards, tmp_path / "run", f"train.init_from={model_dir}")
    assert cfg.model_config() == load_config(model_dir)  # `model` unset: the directory's architecture
    model = build_model(cfg)
    adapt.prepare(model, cfg)
    expected = state(model_dir)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_init_from_an_open_clip_weights_file_needs_the_model_and_converts_exactly(model_dir, colour_shards, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in mm.to_open_clip(mm.load_pretrained(model_dir)).items()}
    path = tmp_path / "open_clip.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ConfigError, match=r"model: .*train\.init_from .* weights file"):
        run_config(colour_shards, tmp_path / "run", f"train.init_from={path}")
    cfg = run_config(colour_shards, tmp_path / "run", f"train.init_from={path}", "model=tiny-clip")
    model = build_model(cfg)
    adapt.prepare(model, cfg)
    expected = state(model_dir)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_frozen_tower_is_bit_identical_out_of_the_optimizer_and_resume_takes_precedence(model_dir, colour_shards,
                                                                                        tmp_path):
    """LiT: the image tower (with patch dropout and drop-path configured) and the logit scale locked, the text
    tower trained with layer-wise decay, evaluated during the run; then the same run stopped and resumed."""
    ov = [f"train.init_from={model_dir}", "train.freeze=[vision, logit_scale]", "train.layer_decay=0.8",
          "model.vision.patch_dropout=0.5", "model.vision.transformer.drop_path=0.2", "eval.every=3",
          f"eval.zeroshot.shards={colour_shards}/test-0000.tar", "eval.zeroshot.max_samples=8", "eval.batch_size=8"]
    run(run_config(colour_shards, tmp_path / "full", *ov))
    start, final = state(model_dir), state(tmp_path / "full" / "final")
    frozen = [k for k in start if k.startswith("vision.") or k == "logit_scale"]
    assert frozen and all(torch.equal(final[k], start[k]) for k in frozen)
    text = [k for k in start if k.startswith("text.")]
    assert all(not torch.equal(final[k], start[k]) for k in text if "blocks" in k and "weight" in k)
    opt = torch.load(tmp_path / "full" / "checkpoints" / "step_6" / "optimizer.pt", weights_only=True)
    in_opt = sum(len(g["params"]) for g in opt["param_groups"])
    assert in_opt == len(text) == len(opt["state"])  # the optimizer holds (and has state for) the text tower only

    run(run_config(colour_shards, tmp_path / "split", *ov, "train.stop_after=3"))
    assert not (tmp_path / "split" / "final").exists()
    run(run_config(colour_shards, tmp_path / "split", *ov))  # resumes its own step-3 checkpoint, not init_from
    resumed = state(tmp_path / "split" / "final")
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_frozen_modules_stay_in_eval_mode():
    torch.manual_seed(0)
    model = mm.create_model("tiny-clip", vision__patch_dropout=0.5, vision__transformer__drop_path=0.3,
                            text__transformer__drop_path=0.3)
    frozen = adapt.freeze(model, ["vision"])
    assert frozen == ["vision"]
    images = torch.randn(2, 3, 32, 32)
    tokens = mm.get_tokenizer(model)(["a red square", "a blue square"])
    model.eval()
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(images), model.encode_text(tokens)
    model.train()
    adapt.set_train_mode(model, frozen)  # once, at the start of a run
    assert not any(m.training for m in model.vision.modules()) and all(m.training for m in model.text.modules())
    # evaluation and generation switch everything to eval and back: each module gets its own mode back
    from mm.utils.nn import eval_mode

    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert not any(m.training for m in model.vision.modules()) and all(m.training for m in model.text.modules())
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ref_img)  # no patch dropout / drop-path
        assert not torch.equal(model.encode_text(tokens), ref_txt)  # the trained tower still drops paths

    coca = mm.create_model("tiny-coca")  # everything but the decoder's cross-attention (SmallCap): ! keeps trainable
    adapt.freeze(coca, ["*", "!decoder.*.cross_attn.*", "!decoder.*.norm_cross.*"])
    assert {n for n, p in coca.named_parameters() if p.requires_grad} == \
        {n for n, _ in coca.named_parameters() if ".cross_attn." in n or ".norm_cross." in n} != set()

    part = mm.create_model("tiny-clip")
    assert adapt.freeze(part, ["vision.transformer.blocks.0.*"]) == ["vision.transformer.blocks.0"]
    assert [n for n, p in part.named_parameters() if not p.requires_grad] == \
        [n for n, _ in part.named_parameters() if n.startswith("vision.transformer.blocks.0.")]


def test_frozen_moe_tower_routes_as_at_inference():
    torch.manual_seed(0)
    model = mm.create_model("tiny-moe", text__transformer__moe__capacity_factor=0.5,
                            text__transformer__moe__router_jitter=0.2)
    tokens = mm.get_tokenizer(model)(["a red square on the left", "a blue circle", "three green stars"])
    model.eval()
    with torch.no_grad():
        ref = model.encode_text(tokens)
    adapt.set_train_mode(model, adapt.freeze(model, ["text"]))
    moes = [m for n, m in model.named_modules() if type(m).__name__ == "MoE"]
    assert any(m.training for m in moes) and not any(m.training for m in model.text.modules())
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), ref)  # eval capacity, no router jitter


def test_layer_decay_and_tower_lr_multipliers():
    model = mm.create_model("tiny-coca")
    d, lr = 0.7, 1e-3
    mult = {"text": 0.5, "text.proj.*": 2.0}  # the last entry selecting a parameter wins
    scales = adapt.lr_scales(model, mult, d)
    c = model.config
    Lv, Lt, Ld = c.vision.transformer.depth, c.text.transformer.depth, c.decoder.transformer.depth
    expected = {"logit_scale": 1.0, "vision.patch_embed.weight": d ** (Lv + 1), "vision.cls_token": d ** (Lv + 1),
                "vision.pos_embed": d ** (Lv + 1), "vision.proj.weight": 1.0, "vision.attn_pool.query": 1.0,
                "text.token_embedding.weight": 0.5 * d ** (Lt + 1), "text.norm.weight": 0.5, "text.proj.weight": 2.0,
                "decoder.head.weight": 1.0}
    for i in range(Lv):
        expected[f"vision.transformer.blocks.{i}.attn.qkv.weight"] = d ** (Lv - i)
    for i in range(Lt):
        expected[f"text.transformer.blocks.{i}.ffn.fc1.bias"] = 0.5 * d ** (Lt - i)
    for i in range(Ld):  # CoCa's decoder: layer i = blocks 2i (self-attention) and 2i + 1 (cross-attention)
        expected[f"decoder.transformer.blocks.{2 * i}.ffn.fc2.weight"] = d ** (Ld - i)
        expected[f"decoder.transformer.blocks.{2 * i + 1}.ffn.fc2.weight"] = d ** (Ld - i)
    for name, s in expected.items():
        assert scales[name] == pytest.approx(s, rel=1e-12), name
    opt = make_optimizer(model, lr, 0.1, (0.9, 0.98), 1e-6, torch.device("cpu"), scales)
    sched = make_scheduler(opt, 2, 10, lr, 0.0)
    for _ in range(4):
        opt.step()
        sched.step()
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert group[id(p)]["lr"] == pytest.approx(lr * scales[name] * lr_factor(4, 2, 10), rel=1e-9), name
    assert opt.param_groups[0]["lr_scale"] == 1.0


@pytest.mark.parametrize("override, message", [
    ("train.freeze=[visoin]", "train.freeze: 'visoin' matches no parameter"),
    ("train.freeze=['*']", "train.freeze: ['*'] freezes every parameter"),
    ("train.freeze=['*', '!vision', '*']", "freezes every parameter"),
    ("train.freeze=['*', '!nope.*']", "train.freeze: '!nope.*' matches no parameter"),
    ("train.lr_mult={text: 0}", "train.lr_mult.text: must be a number > 0"),
    ("train.lr_mult={txet.*: 0.5}", "train.lr_mult: 'txet.*' matches no parameter"),
    ("train.layer_decay=1.5", "train.layer_decay: must be in (0, 1]"),
    ("train.init_from=/nonexistent/model", "train.init_from: '/nonexistent/model' does not exist"),
])
def test_adaptation_config_errors_name_the_key(colour_shards, tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        run_config(colour_shards, tmp_path / "run", "model=tiny-clip", override)
    assert message in str(e.value)


# -- linear probe ----------------------------------------------------------------------------------
def blobs(n: int, seed: int, d: int = 8, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=torch.Generator().manual_seed(99)) * 1.5
    y = torch.randint(0, c, (n,), generator=g)
    return torch.nn.functional.normalize(means[y] + torch.randn(n, d, generator=g), dim=-1), y


def test_logistic_regression_reaches_the_regularised_optimum():
    x, y = blobs(300, 0)
    W, b = fit_logistic(x, y, 3, 1e-2)
    Wr, br = W.clone().requires_grad_(), b.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x.double() @ Wr + br, y) + 0.5e-2 * Wr.pow(2).sum()
    gW, gb = torch.autograd.grad(loss, [Wr, br])
    assert max(gW.abs().max().item(), gb.abs().max().item()) < 1e-6  # stationary point of a strictly convex loss
    W2, b2 = fit_logistic(x, y, 3, 1e-2, init=(torch.randn(8, 3, dtype=torch.float64), torch.zeros(3).double()))
    assert torch.allclose(W, W2, atol=1e-5) and torch.allclose(b, b2, atol=1e-5)  # the unique minimum


def test_probe_chooses_weight_decay_on_validation_then_refits_on_all_training_data():
    (x, y), (tx, ty) = blobs(400, 1), blobs(200, 2)
    wds = [1e-4, 1e-2, 1e0, 1e2]
    r = linear_probe(x, y, tx, ty, 3, weight_decays=wds, val_fraction=0.25, seed=3)
    best = max(r["val"], key=lambda v: (v["top1"], v["weight_decay"]))  # ties: the stronger regularisation
    assert r["weight_decay"] == best["weight_decay"] and r["weight_decay"] < 1e2  # 1e2 flattens the probe
    assert r["val"][0]["top1"] < best["top1"]
    W, b = fit_logistic(x, y, 3, r["weight_decay"])
    assert torch.allclose(r["W"], W, atol=1e-4) and torch.allclose(r["b"], b, atol=1e-4)
    assert r["probe_top1"] == accuracy(tx, ty, r["W"], r["b"])["top1"] > 0.8
    assert (r["n_train"], r["n_val"], r["n_test"]) == (400, 100, 200)


def features_of(model, samples) -> tuple[torch.Tensor, torch.Tensor]:
    pre = mm.image_transform(model)
    x = torch.stack([pre(Image.open(io.BytesIO(m["jpg"])).convert("RGB")) for _, m in samples])
    with torch.no_grad():
        emb = model.encode_image(x, normalize=True)
    return emb, torch.tensor([int(m["cls"]) for _, m in samples])


def test_probe_command_equals_the_api_on_independently_read_images(model, model_dir, colour_shards, capsys):
    rc = main(["probe", "--model", str(model_dir), "--train", f"{colour_shards}/train-{{0000..0002}}.tar",
               "--test", f"{colour_shards}/test-0000.tar", "--max-train", "40", "--workers", "0", "--json",
               "--weight-decays", "1e-4,1e-2,1"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train = features_of(model, colour_samples(48)[:40])
    test = features_of(model, colour_samples(16, start=1000))
    ref = linear_probe(*train, *test, 4, weight_decays=[1e-4, 1e-2, 1])
    assert (got["n_train"], got["n_test"], got["classes"]) == (40, 16, CLASSES)
    assert got["weight_decay"] == ref["weight_decay"]
    assert got["probe_top1"] == pytest.approx(ref["probe_top1"]) and got["probe_top5"] == pytest.approx(ref["probe_top5"])


# -- fine-tuning and WiSE-FT ---------------------------------------------------------------------
def test_zero_shot_head_reproduces_zero_shot_predictions_exactly(model):
    pre = mm.image_transform(model)
    images = torch.stack([pre(Image.open(io.BytesIO(m["jpg"])).convert("RGB"))
                          for _, m in colour_samples(16, start=1000)])
    images = torch.cat([images, torch.randn(32, *images.shape[1:])])  # and noise, so the classes vary
    W = zero_shot_classifier(model, mm.get_tokenizer(model), CLASSES, TEMPLATES)
    _, zs_top = predict(model, W, images, k=4)
    clf = Classifier(model, zero_shot_head(model, CLASSES, TEMPLATES)).eval()
    with torch.no_grad():
        logits = clf(images)
        zs_logits = model.encode_image(images, normalize=True) @ W
    assert len(set(zs_top[:, 0].tolist())) > 1
    assert torch.equal(logits.argmax(1), zs_top[:, 0])  # zero-shot classification's predictions
    assert torch.equal(logits.topk(4).indices, zs_logits.topk(4).indices)  # the whole ranking
    assert torch.allclose(logits, model.logit_scale.exp() * zs_logits, atol=1e-5)


def test_wise_interpolation_reproduces_both_endpoints_exactly(model_dir, colour_shards):
    model = mm.load_pretrained(model_dir)
    clf = Classifier(model, zero_shot_head(model, CLASSES, TEMPLATES))
    names = trainable_names(clf)
    assert names == [n for n, _ in clf.named_parameters() if n.startswith(("model.vision.", "head."))]
    before = snapshot(clf, [n for n, _ in clf.named_parameters()])
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        zs_out = clf.eval()(images)
    cfg = FinetuneConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=1, workers=0, shuffle_buffer=8)
    finetune(clf, train_batches(model, [f"{colour_shards}/train-{i:04d}.tar" for i in range(3)], cfg), cfg,
             device=torch.device("cpu"))
    after = snapshot(clf, [n for n, _ in clf.named_parameters()])
    assert all(torch.equal(after[n], before[n]) for n in after if n not in names)  # the text tower is untouched
    assert all(not torch.equal(after[n], before[n]) for n in names if n.endswith("weight"))
    with torch.no_grad():
        ft_out = clf(images)
    zs, ft = {n: before[n] for n in names}, {n: after[n] for n in names}
    for alpha, endpoint, out in ((0.0, zs, zs_out), (1.0, ft, ft_out)):
        mixed = wise_interpolate(zs, ft, alpha)
        assert all(torch.equal(mixed[n], endpoint[n]) for n in names)
        clf.load_state_dict(mixed, strict=False)
        with torch.no_grad():
            assert torch.equal(clf(images), out)
    half = wise_interpolate(zs, ft, 0.5)
    assert all(torch.allclose(half[n], (zs[n] + ft[n]) / 2, atol=1e-7) for n in names)


def test_finetune_command_reports_wise_accuracies_and_saves_models(model, model_dir, colour_shards, tmp_path, capsys):
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", str(model_dir), "--train", f"{colour_shards}/train-{{0000..0002}}.tar",
               "--test", f"{colour_shards}/test-0000.tar", "--templates", TEMPLATES[0], "--steps", "4",
               "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "1", "--workers", "0", "--log-every", "2",
               "--wise-alpha", "0,0.5,1", "--save-alpha", "0.5", "--out", str(out), "--json"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["alpha"] for r in got["wise"]] == [0.0, 0.5, 1.0] and all(r["n"] == 16 for r in got["wise"])
    x, y = features_of(model, colour_samples(16, start=1000))
    W = zero_shot_classifier(model, mm.get_tokenizer(model), CLASSES, TEMPLATES[:1])
    assert got["wise"][0]["top1"] == ((x @ W).argmax(1) == y).float().mean().item()  # alpha 0: zero-shot
    ft, classes = load_classifier(out / "finetuned")
    assert classes == CLASSES
    from mm.eval.probe import labelled_batches

    batches = labelled_batches(ft.model, [f"{colour_shards}/test-0000.tar"])
    assert classifier_eval(ft, batches, device=torch.device("cpu"))["top1"] == got["wise"][2]["top1"]
    start, tuned = state(model_dir), state(ft.model)
    assert all(torch.equal(tuned[k], start[k]) for k in start if not k.startswith("vision."))
    assert all(not torch.equal(tuned[k], start[k]) for k in start if k.startswith("vision.") and start[k].ndim == 2)
    wise, _ = load_classifier(out / "wise-0.5")
    zs_clf = Classifier(model, zero_shot_head(model, CLASSES, TEMPLATES[:1]))
    names = trainable_names(zs_clf)
    expected = wise_interpolate(snapshot(zs_clf, names), snapshot(ft, names), 0.5)
    assert all(torch.equal(snapshot(wise, names)[n], expected[n]) for n in names)
    # the trainer's metrics.jsonl: a step record every --log-every 2 steps (beside its start, WiSE-FT and final ones)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]


def test_finetune_command_rejects_bad_options_before_loading(model_dir, colour_shards, tmp_path, capsys):
    rc = main(["finetune", "--model", str(model_dir), "--train", f"{colour_shards}/train-0000.tar", "--test",
               f"{colour_shards}/test-0000.tar", "--lr", "0", "--out", str(tmp_path / "ft")])
    assert rc == 2 and "lr: must be > 0" in capsys.readouterr().err and not (tmp_path / "ft").exists()


# -- fine-tuning in several processes ------------------------------------------------------------------------
FT_STEPS, FT_BATCH = 3, 8


def _ft_batches(n_classes: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"images": torch.randn(FT_BATCH, 3, 32, 32, generator=g),
             "labels": torch.randint(0, n_classes, (FT_BATCH,), generator=g)} for _ in range(FT_STEPS)]


def _ft_classifier(model_dir: str) -> Classifier:
    model = mm.load_pretrained(model_dir)
    return Classifier(model, zero_shot_head(model, CLASSES, TEMPLATES))


FT_CFG = {"steps": FT_STEPS, "batch_size": FT_BATCH, "lr": 1e-3, "warmup_steps": 1, "workers": 0, "log_every": 1}


def _ft_worker(rank: int, init: str, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from mm.train.finetune import _ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        clf = _ft_classifier(model_dir)
        half = FT_BATCH // 2
        mine = ({k: v[rank * half:(rank + 1) * half] for k, v in b.items()} for b in _ft_batches(len(CLASSES)))
        records = finetune(clf, mine, FinetuneConfig(**FT_CFG), device=torch.device("cpu"),
                           wrap=_ddp(torch.device("cpu")))
        torch.save({"state": snapshot(clf, trainable_names(clf)), "records": records}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_finetune_equals_one_process_on_the_whole_batch(model_dir, tmp_path):
    """DDP over 2 gloo processes, each given half of every batch, trains the same weights as one process given
    the whole batches (mean cross-entropy: the ranks' average gradient is the whole batch's), and the logged loss
    and accuracy are the whole batch's."""
    import torch.multiprocessing as mp

    mp.spawn(_ft_worker, args=(str(tmp_path / "pg"), str(model_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    clf = _ft_classifier(str(model_dir))
    before = snapshot(clf, trainable_names(clf))
    records = finetune(clf, iter(_ft_batches(len(CLASSES))), FinetuneConfig(**FT_CFG), device=torch.device("cpu"))
    one = snapshot(clf, trainable_names(clf))
    for n in one:
        assert torch.equal(ranks[0]["state"][n], ranks[1]["state"][n]), n  # DDP keeps the ranks identical
        # Adam divides by sqrt(v): where a gradient is ~0 the two reduction orders' rounding can move a weight by
        # a fraction of one step (lr = 1e-3), so the tolerance is a tenth of a step; training moved far more
        torch.testing.assert_close(ranks[0]["state"][n], one[n], rtol=0, atol=1e-4)
    assert max((one[n] - before[n]).abs().max().item() for n in one) > 2e-3  # it trained: ~lr per step
    for r2, r1 in zip(ranks[0]["records"], records):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4) and r2["batch_top1"] == r1["batch_top1"]


def test_finetune_command_under_accelerate_launch(model_dir, colour_shards, tmp_path):
    """`accelerate launch` with 2 CPU processes: 2 ranks really form, their fine-tuned weights are identical,
    the main process alone writes, and the accuracy it reports is that of the model it saved."""
    import os
    import socket
    import subprocess
    import sys

    from mm.eval.probe import labelled_batches

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ft2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "mm.cli", "finetune", "--model", str(model_dir),
           "--train", f"{colour_shards}/train-{{0000..0002}}.tar",
           "--test", f"{colour_shards}/test-0000.tar", "--templates", TEMPLATES[0], "--steps", "3", "--batch-size", "4",
           "--lr", "1e-3", "--warmup-steps", "1", "--workers", "0", "--log-every", "1", "--wise-alpha", "0,1",
           "--out", str(out), "--json"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["world_size"] == 2  # one process printed; two ranks trained
    result = json.loads((out / "results.json").read_text())
    assert len(result["param_sha256"]) == 2 and len(set(result["param_sha256"])) == 1
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # the trainer's step records
    ft, _ = load_classifier(out / "finetuned")
    batches = labelled_batches(ft.model, [f"{colour_shards}/test-0000.tar"])
    assert classifier_eval(ft, batches, device=torch.device("cpu"))["top1"] == result["wise"][1]["top1"]
