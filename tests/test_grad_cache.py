"""Gradient caching (mm/train/grad_cache.py) and the tiled sigmoid loss: the full batch's gradients from a chunk's
activations, on one process and two; and training runs that equal the uncached ones step for step."""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mm
from mm.config import ConfigError
from mm.losses import CocaLoss, SigLipLoss, make_loss
from mm.models.clip import ModelOutput
from mm.train.grad_cache import GradCache, chunk_bounds
from mm.train.tasks import CocaTask, ContrastiveTask
from mm.train.preflight import load_run_config
from mm.train.trainer import run

BATCH, CHUNK = 12, 5  # three chunks: 5, 5, 2


# -- the tiled sigmoid loss -----------------------------------------------------------------------------------------
def _sigmoid_inputs(b: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, 16, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    return img, txt, scale, bias


@pytest.mark.parametrize("block", [1, 4, 7, 64])
def test_tiled_sigmoid_loss_equals_the_plain_one_in_value_and_gradient(block):
    values, grads = [], []
    for blk in (None, block):
        img, txt, scale, bias = _sigmoid_inputs(11, 11)
        loss = SigLipLoss(block=blk).contrastive(SimpleNamespace(image_emb=img, text_emb=txt, logit_scale=scale,
                                                                 logit_bias=bias))
        loss.backward()
        values.append(loss.detach())
        grads.append([t.grad for t in (img, txt, scale, bias)])
    torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=0)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)


def test_tiled_sigmoid_loss_with_a_rank_offset_equals_the_plain_one():
    """A process's rows against the world's texts (positives at column offset + i), as under 2 processes."""
    from mm.losses import _BlockedSigmoid

    img, txt, scale, bias = _sigmoid_inputs(6, 12)
    tiled = _BlockedSigmoid.apply(img, txt, scale, bias, 6, 4)
    y = -torch.ones(6, 12, dtype=torch.float64)
    y[torch.arange(6), torch.arange(6) + 6] = 1
    plain = -F.logsigmoid(y * (scale * img @ txt.T + bias)).sum() / 6
    ga = torch.autograd.grad(tiled, (img, txt, scale, bias))
    gb = torch.autograd.grad(plain, (img, txt, scale, bias))
    torch.testing.assert_close(tiled, plain, rtol=1e-12, atol=0)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)


def test_tiled_sigmoid_loss_holds_one_tile_of_logits():
    """The forward keeps only its inputs for the backward, not the (b x n) logits."""
    img, txt, scale, bias = _sigmoid_inputs(64, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        SigLipLoss(block=8).contrastive(SimpleNamespace(image_emb=img, text_emb=txt, logit_scale=scale,
                                                        logit_bias=bias))
    assert saved and max(saved) <= 64 * 16  # the embeddings; no 64 x 64 logits
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        SigLipLoss().contrastive(SimpleNamespace(image_emb=img, text_emb=txt, logit_scale=scale, logit_bias=bias))
    assert max(saved) >= 64 * 64  # the plain loss does keep them


# -- gradients: cached == full batch ---------------------------------------------------------------------------------
def _model(preset: str, patch_dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = mm.create_model(preset, vision__patch_dropout=patch_dropout).double()
    return model.train()


def _batch(model, n: int = BATCH, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size, text = model.config.vision.image_size, model.config.text
    images = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    tokens = torch.zeros(n, text.context_length, dtype=torch.long)
    for i in range(n):  # captions of different lengths: CoCa's chunks hold different numbers of caption tokens
        length = 3 + (i * 5) % (text.context_length - 4)
        tokens[i, 0] = text.vocab_size - 2
        tokens[i, 1:length] = torch.randint(1, text.vocab_size - 2, (length - 1,), generator=g)
        tokens[i, length] = text.eot_id
    return images, tokens


def _loss(kind: str, model) -> torch.nn.Module:
    if model.config.decoder is not None:
        return CocaLoss(make_loss(kind))
    return make_loss(kind, **({"block": 4} if kind == "siglip" else {}))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model, loss_fn, images, tokens, chunk: int | None) -> dict[str, torch.Tensor]:
    """The full batch's loss back-propagated through one graph. ``chunk``: the forward run chunk by chunk (the
    random draws of a chunked forward: patch dropout masks as the cached step draws them), outputs joined."""
    model.zero_grad(set_to_none=True)
    if chunk is None:
        out = model(images, tokens)
    else:
        parts = [model(images[a:b], tokens[a:b]) for a, b in chunk_bounds(images.shape[0], chunk)]
        cat = (lambda k: torch.cat([getattr(p, k) for p in parts]) if getattr(parts[0], k) is not None else None)
        # MoE: the aux loss as the cached step defines it, the chunks' aux losses weighted by their sample shares
        bounds = chunk_bounds(images.shape[0], chunk)
        aux = None if parts[0].aux_loss is None else \
            sum(p.aux_loss * (b - a) / images.shape[0] for p, (a, b) in zip(parts, bounds))
        out = ModelOutput(image_emb=cat("image_emb"), text_emb=cat("text_emb"), logit_scale=parts[0].logit_scale,
                          logit_bias=parts[0].logit_bias, caption_logits=cat("caption_logits"),
                          caption_labels=cat("caption_labels"), aux_loss=aux)
    loss_fn(out)["loss"].backward()
    return _grads(model)


def _task(loss_fn, model):
    """The training objective whose loss ``loss_fn`` (the reference, computed by mm.losses) is."""
    if isinstance(loss_fn, CocaLoss):
        return CocaTask(loss_fn, model.config.text)
    return ContrastiveTask(loss_fn, loss_fn.aux_weight)


def _batch_dict(images, tokens) -> dict:
    return {"images": images, "tokens": tokens, "keys": [f"s{i}" for i in range(len(tokens))],
            "texts": [f"caption {i}" for i in range(len(tokens))]}


def _cached(model, loss_fn, images, tokens, chunk: int = CHUNK) -> tuple[dict[str, torch.Tensor], dict]:
    model.zero_grad(set_to_none=True)
    gc = GradCache(model, model, _task(loss_fn, model), chunk, device=torch.device("cpu"), autocast=nullcontext)
    losses, _ = gc.step(_batch_dict(images, tokens))
    return _grads(model), losses


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for k in a:  # relative to the tensor's scale (elements near zero have no meaningful relative error)
        err = (a[k] - b[k]).abs().max().item()
        assert err <= rtol * b[k].abs().max().item() + 1e-12, (k, err, b[k].abs().max().item())


@pytest.mark.parametrize(("preset", "kind"), [("tiny-clip", "clip"), ("tiny-siglip", "siglip"),
                                              ("tiny-coca", "clip"), ("tiny-moe", "clip")])
def test_cached_gradients_equal_the_full_batch_gradients(preset, kind):
    model = _model(preset)
    loss_fn = _loss(kind, model)
    images, tokens = _batch(model)
    # MoE routes per chunk (expert capacity counts a chunk's tokens; the aux loss is per chunk: the module
    # docstring says why), as it routes per process under DDP: its reference is the chunked forward with one graph
    moe = preset == "tiny-moe"
    want = _reference(model, loss_fn, images, tokens, chunk=CHUNK if moe else None)
    got, losses = _cached(model, loss_fn, images, tokens)
    assert_grads_close(got, want)
    if not moe:
        with torch.no_grad():
            full = loss_fn(model(images, tokens))
        torch.testing.assert_close(losses["contrastive_loss"], full["contrastive_loss"], rtol=1e-10, atol=0)
        torch.testing.assert_close(losses["loss"], full["loss"], rtol=1e-6, atol=0)  # caption CE: fp32


def test_cached_gradients_with_a_caption_fraction_equal_one_graph_over_the_same_rows():
    """train.caption_fraction under gradient caching: the decoder trains on each chunk's first rows (3, 3 and 1
    of the chunks 5, 5, 2 at 0.5); the reference: the full batch's embeddings and those rows' captions in one graph."""
    model = _model("tiny-coca")
    loss_fn = CocaLoss(make_loss("clip"), caption_fraction=0.5)
    images, tokens = _batch(model)
    rows = torch.tensor([0, 1, 2, 5, 6, 7, 10])
    model.zero_grad(set_to_none=True)
    out, head = model(images, tokens), model(images[rows], tokens[rows])
    out.caption_logits, out.caption_labels = head.caption_logits, head.caption_labels
    want_losses = loss_fn(out)
    want_losses["loss"].backward()
    want = _grads(model)
    got, losses = _cached(model, loss_fn, images, tokens)
    assert_grads_close(got, want)
    torch.testing.assert_close(losses["caption_loss"], want_losses["caption_loss"].detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(losses["loss"], want_losses["loss"].detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("preset", ["tiny-clip", "tiny-coca"])
def test_patch_dropout_is_replayed_in_the_second_pass(preset):
    """With patch dropout on, the cached gradients equal those of the full batch's loss over the same masks; a
    reference with other masks differs (the masks matter, so the replay is what makes them equal)."""
    model = _model(preset, patch_dropout=0.5)
    loss_fn = _loss("clip", model)
    images, tokens = _batch(model)
    torch.manual_seed(7)
    want = _reference(model, loss_fn, images, tokens, chunk=CHUNK)
    torch.manual_seed(7)
    got, _ = _cached(model, loss_fn, images, tokens)
    assert_grads_close(got, want)
    torch.manual_seed(8)
    other = _reference(model, loss_fn, images, tokens, chunk=CHUNK)
    assert max((other[k] - want[k]).abs().max().item() for k in want) > 1e-3


def test_a_frozen_tower_is_not_run_again():
    """LiT: the locked image tower's first-pass embeddings are final; the second pass runs the text tower only,
    and the gradients still equal the full batch's."""
    model = _model("tiny-clip")
    for p in model.vision.parameters():
        p.requires_grad_(False)
    loss_fn = _loss("clip", model)
    images, tokens = _batch(model)
    want = _reference(model, loss_fn, images, tokens, chunk=None)
    calls = []
    hook = model.vision.register_forward_hook(lambda *a: calls.append(1))
    got, _ = _cached(model, loss_fn, images, tokens)
    hook.remove()
    assert len(calls) == len(chunk_bounds(BATCH, CHUNK))  # the first pass only
    assert_grads_close(got, want)
    assert not any(k.startswith("vision.") for k in got)


def _gc_worker(rank: int, init: str, preset: str, kind: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        model = _model(preset, patch_dropout=0.5)
        loss_fn = _loss(kind, model)
        images, tokens = _batch(model, n=2 * BATCH)
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        images, tokens = images[mine], tokens[mine]
        # the reference, DDP's convention by hand: the full world batch's loss (features gathered with their
        # gradients), each process's chunked forward with one graph, parameter gradients averaged over processes
        torch.manual_seed(100 + rank)
        want = _reference(model, loss_fn, images, tokens, chunk=CHUNK)
        for g in want.values():
            dist.all_reduce(g)
            g /= 2
        ddp = DDP(model)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + rank)
        gc = GradCache(ddp, model, _task(loss_fn, model), CHUNK, device=torch.device("cpu"), autocast=nullcontext,
                       no_sync=ddp.no_sync)
        gc.step(_batch_dict(images, tokens))
        torch.save({"want": want, "got": _grads(model)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("preset", "kind"), [pytest.param("tiny-clip", "clip", marks=pytest.mark.slow),
                                              ("tiny-siglip", "siglip"),
                                              pytest.param("tiny-coca", "clip", marks=pytest.mark.slow)])
def test_two_process_cached_gradients_equal_the_full_world_batch_gradients(preset, kind, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gc_worker, args=(str(tmp_path / "pg"), preset, kind, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for k in r0["got"]:
        assert torch.equal(r0["got"][k], r1["got"][k]), k  # DDP: the processes hold the same gradients
    assert_grads_close(r0["got"], r0["want"])


# -- training runs ---------------------------------------------------------------------------------------------------
def run_config(shards: Path, out: Path, *overrides: str):
    return load_run_config(None, [f"data.train={shards}/train-{{0000..0002}}.tar", "data.batch_size=8",
                                  "data.workers=0", "data.shuffle_buffer=8", "train.steps=4", "train.warmup_steps=1",
                                  "train.lr=0.003", "train.log_every=1", "train.checkpoint_every=0", "train.seed=1",
                                  "train.grad_clip=null", f"output_dir={out}", *overrides])


# Adam divides by the gradient's root mean square: a gradient that is zero but for rounding (the key bias: softmax
# ignores it) would turn float noise into full-size steps; a larger eps keeps the run comparisons about the math
EPS = "train.eps=1e-4"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("extra", [[], ["model=tiny-siglip", "train.loss=siglip", "train.loss_block=3"],
                                   ["model=tiny-coca"], ["train.freeze=[vision]"]],
                         ids=["clip", "siglip-tiled", "coca", "lit"])
def test_a_cached_run_equals_the_uncached_run_step_for_step(colour_shards, tmp_path, extra):
    run(run_config(colour_shards, tmp_path / "plain", EPS, *extra))
    run(run_config(colour_shards, tmp_path / "cached", EPS, *extra, "train.grad_cache_chunk=3"))
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "cached")
    assert len(a) == len(b) == 4
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=0)
    wa, wb = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("plain", "cached"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=2e-5, msg=k)
    cached = [r for r in _metrics(tmp_path / "cached") if "loss" in r]
    assert all(r["grad_cache_chunks"] == 3 for r in cached)  # 8 samples in chunks of 3
    assert all(0 < r["first_pass_share"] < 1 and 0 < r["second_pass_share"] < 1 for r in cached)


@pytest.mark.slow  # ~40 s: runs in CI's test-slow step
def test_a_cached_run_resumes_bit_for_bit(colour_shards, tmp_path):
    """bf16, gradient checkpointing, gradient accumulation and patch dropout with caching; stopped and resumed
    equals uninterrupted exactly (the chunks' random states are replayed, then the stream continues)."""
    ov = ["train.grad_cache_chunk=3", "train.precision=bf16", "train.grad_checkpointing=true", "train.grad_accum=2",
          "model.vision.patch_dropout=0.3", "train.checkpoint_every=2"]
    run(run_config(colour_shards, tmp_path / "full", *ov))
    run(run_config(colour_shards, tmp_path / "split", *ov, "train.stop_after=2"))
    run(run_config(colour_shards, tmp_path / "split", *ov))
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "full")[2:] == _losses(tmp_path / "split")[-2:]


@pytest.mark.parametrize(("override", "message"), [
    ("train.grad_cache_chunk=0", "grad_cache_chunk"),
    ("train.loss_block=4", "loss_block"),  # with the clip loss
])
def test_bad_grad_cache_settings_fail_before_work(colour_shards, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_config(colour_shards, tmp_path / "bad", override)
    assert not (tmp_path / "bad").exists()



def test_gradient_caching_with_distillation_equals_the_plain_step(tmp_path):
    """Distillation is a task like any other: its KL (in-batch, so a batch term) and feature loss are computed once
    on the cached embeddings, its projection gets its gradient there. The gradients of every student parameter and
    of the projection, and every logged term, equal the plain step's over the whole batch (teacher of another
    width: the projection exists)."""
    from mm.train.config import DistillConfig
    from mm.train.distill import Distiller
    from mm.train.executors import PlainStep
    from mm.train.tasks import DistillTask

    torch.manual_seed(3)
    teacher = mm.save_pretrained(mm.create_model("tiny-clip", embed_dim=48), tmp_path / "teacher")
    student = _model("tiny-clip")
    distiller = Distiller(DistillConfig(teacher=str(teacher), kl_weight=0.7, feature_weight=0.5, task_weight=0.9),
                          student, "cpu")
    distiller.teacher.double()
    distiller.loss.double()
    assert distiller.loss.proj is not None
    task = DistillTask(ContrastiveTask(make_loss("clip")), distiller)
    batch = _batch_dict(*_batch(student))

    def grads() -> dict[str, torch.Tensor]:
        g = _grads(student)
        g.update({f"proj.{i}": p.grad.clone() for i, p in enumerate(task.parameters())})
        return g

    runs = {}
    for name, executor in (("plain", PlainStep(student, task, autocast=nullcontext, backward=lambda x: x.backward())),
                           ("cached", GradCache(student, student, task, CHUNK, device=torch.device("cpu"),
                                                autocast=nullcontext))):
        student.zero_grad(set_to_none=True)
        for p in task.parameters():
            p.grad = None
        losses, _ = executor.step(batch)
        runs[name] = (grads(), losses)
    (want, want_losses), (got, got_losses) = runs["plain"], runs["cached"]
    assert_grads_close(got, want)
    assert any(k.startswith("proj.") for k in got) and got["proj.0"].abs().max() > 0
    assert set(got_losses) == set(want_losses) == {"contrastive_loss", "kl_loss", "feature_loss", "task_loss", "loss"}
    for k in want_losses:
        torch.testing.assert_close(got_losses[k], want_losses[k].detach(), rtol=1e-9, atol=0)
