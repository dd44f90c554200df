"""The SigLIP 2 recipe (train.objectives): each objective against an independent computation, the data workers'
views and decoder sequences, the schedule, and whole runs (bad regions, resume, gradient caching, DDP)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import mm
from conftest import sigterm_when, two_gloo_ranks
from mm.config import ConfigError
from mm.data.locca import DecoderPrompts, LocTokens
from mm.data.regions import crop_box, dequantize, parse_regions, quantize
from mm.data.scenes import generate_scenes
from mm.data.transforms import TrainTransform
from mm.data.views import ViewsDecoder, ViewsSpec
from mm.models import ImageView
from mm.tokenizer import get_tokenizer
from mm.train.config import MaskedObjective, ObjectivesConfig, SelfDistillObjective, TeacherSettings
from mm.train.preflight import load_run_config
from mm.train.tasks import ContrastiveTask, Siglip2Task
from mm.train.tasks.ema import ema_momentum
from mm.train.tasks.siglip2 import distill_ce

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model=tiny-siglip2", "model.vision.image_size=32", "model.vision.transformer.depth=2",
         "model.text.transformer.depth=2"]


def small_model(**over) -> mm.models.ImageTextModel:
    torch.manual_seed(0)
    return mm.create_model("tiny-siglip2", vision__image_size=32, vision__transformer__depth=2,
                           text__transformer__depth=2, **over)


# -- box tokens -----------------------------------------------------------------------------------------------

def test_box_tokens_round_trip_within_half_a_bin():
    bins, w, h = 32, 64.0, 48.0
    rng = random.Random(0)
    for _ in range(500):
        x0, x1 = sorted(rng.uniform(0, w) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, h) for _ in range(2))
        q = quantize((x0, y0, x1, y1), w, h, bins)
        assert all(0 <= b < bins for b in q)
        back = dequantize(q, w, h, bins)
        for v, u, side in zip((x0, y0, x1, y1), back, (w, h, w, h)):
            assert abs(v - u) <= side / (2 * bins) + 1e-9
        assert quantize(back, w, h, bins) == q  # bin centres quantise to themselves
    assert quantize((0, 0, w, h), w, h, bins) == (0, 0, bins - 1, bins - 1)  # the far edge is the last bin
    loc = LocTokens.of(small_model().config)
    assert (loc.base, loc.bins) == (49408, 32)
    ids = loc.encode((3.0, 5.0, 40.0, 60.0), 64, 64)
    assert ids == [49408 + b for b in quantize((3.0, 5.0, 40.0, 60.0), 64, 64, 32)]
    assert loc.decode(ids, 64, 64) == dequantize([i - 49408 for i in ids], 64, 64, 32)
    with pytest.raises(ValueError, match="decoder.loc_bins"):
        LocTokens.of(mm.create_model("tiny-coca").config)


def test_loc_bins_must_leave_the_special_tokens_alone():
    with pytest.raises(ConfigError, match="decoder.loc_bins"):
        mm.create_model("tiny-siglip2", text__vocab_size=49408)


# -- the three decoder prompts ----------------------------------------------------------------------------------

def test_the_three_decoder_prompts_train_on_their_targets_only():
    """The model's caption labels are exactly each task's targets: the caption and eot; the four box tokens and eot;
    the region caption and eot; never a prompt token."""
    model = small_model()
    tok = get_tokenizer(model)
    prompts = DecoderPrompts(tok, LocTokens.of(model.config), model.config.text.context_length)
    box = (4.0, 8.0, 20.0, 30.0)
    rows = [prompts.caption("a big red star"), prompts.referring("the red star", box, 32, 32),
            prompts.grounded(box, 32, 32, "the tiny yellow cross")]
    tokens, targets = prompts.batch(rows)
    out = model(torch.randn(3, 3, 32, 32), tok(["x", "y", "z"]), decoder_tokens=tokens, decoder_targets=targets)
    loc = [49408 + b for b in quantize(box, 32, 32, 32)]
    eot = tok.eot_id
    expected = [*tok.encode("a big red star"), eot, *loc, eot, *tok.encode("the tiny yellow cross"), eot]
    assert out.caption_labels.tolist() == expected
    assert out.caption_logits.shape == (len(expected), model.config.text.vocab_size)
    # the prompts themselves: what the referring / grounded sequences start with
    assert tokens[1, : len(prompts.referring_prompt("the red star"))].tolist() == \
        [tok.sot_id, *tok.encode("locate:"), *tok.encode("the red star")]
    assert tokens[2, :7].tolist() == [tok.sot_id, *tok.encode("describe:"), *loc]


def test_decoder_sequences_match_a_teacher_forced_recomputation():
    model = small_model()
    tok = get_tokenizer(model)
    prompts = DecoderPrompts(tok, LocTokens.of(model.config), model.config.text.context_length)
    rows = [prompts.referring("the red star", (1, 2, 30, 31), 32, 32), prompts.caption("a star")]
    tokens, targets = prompts.batch(rows)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images, tok(["a", "b"]), decoder_tokens=tokens, decoder_targets=targets)
        image_tokens = model.vision(images).tokens
        got = []
        for i, (ids, tgt) in enumerate(rows):
            logits = model.next_token_logits(torch.tensor([ids]), image_tokens[i:i + 1])[0]
            got += [logits[p - 1] for p in range(1, len(ids)) if tgt[p]]
    assert torch.allclose(out.caption_logits, torch.stack(got), atol=1e-4)


# -- the data workers' views --------------------------------------------------------------------------------------

def _scene_sample(info: dict, size: int = 48) -> dict:
    img = Image.new("RGB", (size, size), (90, 120, 150))
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return {"jpg": buf.getvalue(), "txt": b"a scene", "json": json.dumps(info).encode(), "__key__": "k",
            "__url__": "u"}


def test_views_decoder_makes_crops_masks_and_sequences_and_reports_bad_regions():
    model = small_model()
    tok = get_tokenizer(model)
    prompts = DecoderPrompts(tok, LocTokens.of(model.config), model.config.text.context_length)
    t = TrainTransform(32, model.config.vision.image_mean, model.config.vision.image_std, scale=(1.0, 1.0))
    spec = ViewsSpec(local_views=3, local_scale=(0.1, 0.3), grid=4, mask_ratio=0.5,
                     decoder_tasks=(("referring", 1.0),))
    dec = ViewsDecoder(t, spec, prompts, image_keys=["jpg"])
    info = {"regions": [{"box": [0, 0, 24, 24], "caption": "the red circle"},
                        {"box": [30, 10, 20, 40], "caption": "bad: x1 < x0"},
                        {"box": [10, 10, 60, 20], "caption": "outside"},
                        {"box": [1, 1, 5, 5], "caption": " "}]}
    a = dec(_scene_sample(info), random.Random(7))
    b = dec(_scene_sample(info), random.Random(7))
    assert all(torch.equal(a[k], b[k]) for k in ("image", "local_images", "patch_mask", "decoder_tokens"))
    assert a["local_images"].shape == (3, 3, 32, 32) and a["patch_mask"].shape == (16,)
    assert int(a["patch_mask"].sum()) == 8
    problems = [p for _, p in a["__problems__"]]
    assert len(problems) == 3 and problems[0].startswith("region 1: x1 < x0")
    assert "outside the 48x48 image" in problems[1] and "empty caption" in problems[2]
    # the one valid region, its box through the (whole-image) crop at 32 px: quantised into the sequence
    box = crop_box((0, 0, 24, 24), (0, 0, 48, 48), 32, 32)
    expected = [*prompts.referring_prompt("the red circle"), *LocTokens.of(model.config).encode(box, 32, 32), tok.eot_id]
    assert a["decoder_tokens"][: len(expected)].tolist() == expected
    # no visible region: the caption task instead
    c = dec(_scene_sample({"regions": []}), random.Random(7))
    assert c["decoder_tokens"][: 4].tolist() == [tok.sot_id, *tok.encode("a scene"), tok.eot_id]


def test_parse_regions_names_each_problem():
    good, problems = parse_regions({"regions": [{"box": [1, 2, 3, 4], "caption": "a"}, "x",
                                                {"box": [1, 2, 3], "caption": "a"}, {"box": [3, 2, 1, 4], "caption": "a"},
                                                {"box": [0, 0, 9, 4], "caption": "a"}, {"box": [0, 0, 2, 2]}]},
                                   8, 8)
    assert [r.box for r in good] == [(1.0, 2.0, 3.0, 4.0)]
    assert [p.split(":")[0] for p in problems] == [f"region {i}" for i in (1, 2, 3, 4, 5)]
    assert "x1 < x0" in problems[2] and "outside the 8x8 image" in problems[3] and "empty caption" in problems[4]


# -- self-distillation, masked prediction, the EMA teacher -----------------------------------------------------------

def _task(model, steps=10, sd_start=0.0, mk_start=0.0):
    o = ObjectivesConfig(self_distill=SelfDistillObjective(start=sd_start, local_views=2, prototypes=16),
                         masked=MaskedObjective(start=mk_start, prototypes=16),
                         teacher=TeacherSettings(momentum=0.9, momentum_end=0.99, head_hidden=32, head_bottleneck=8))
    loss = mm.losses.make_loss("siglip")
    return Siglip2Task(ContrastiveTask(loss), o, model, steps)


def _batch(model, b=3):
    g = torch.Generator().manual_seed(1)
    grid = model.config.vision.grid
    mask = torch.zeros(b, grid * grid, dtype=torch.bool)
    mask[:, ::3] = True
    return {"images": torch.randn(b, 3, 32, 32, generator=g), "tokens": get_tokenizer(model)(["a", "b", "c"][:b]),
            "local_images": torch.randn(b, 2, 3, 32, 32, generator=g), "patch_mask": mask, "keys": list("abc")[:b]}


def test_self_distillation_and_masked_losses_equal_their_formulas():
    model = small_model()
    task = _task(model)
    batch = _batch(model)
    out = task.forward(model, batch)
    terms = task.local_terms(out, batch)
    heads, teacher = task.heads, task.teacher.module
    with torch.no_grad():
        t_out = teacher["vision"](batch["images"])
    s_local = model.vision(batch["local_images"].flatten(0, 1)).emb
    s_mask = model.vision(batch["images"], batch["patch_mask"], task.mask_token).tokens
    tt, ts = 0.04, 0.1

    def ce(s_logits, t_logits):  # written out: -sum p_teacher * log p_student, mean over rows
        p = torch.exp(t_logits / tt) / torch.exp(t_logits / tt).sum(-1, keepdim=True)
        logq = s_logits / ts - torch.logsumexp(s_logits / ts, -1, keepdim=True)
        return -(p * logq).sum(-1).mean()

    t_glob = teacher["heads"]["global"](t_out.emb).repeat_interleave(2, 0)  # centres start at 0
    assert torch.allclose(terms["self_distill_loss"], ce(heads["global"](s_local), t_glob), atol=1e-5)
    m = batch["patch_mask"]
    want = ce(heads["patch"](s_mask[m]), teacher["heads"]["patch"](t_out.tokens[m]))
    assert torch.allclose(terms["masked_loss"], want, atol=1e-5)


def test_masked_loss_reads_only_the_masked_positions():
    """Changing what the student sees at unmasked patches cannot reach the loss through those positions: the loss's
    gradient with respect to the student's unmasked patch features is exactly zero."""
    model = small_model()
    task = _task(model)
    batch = _batch(model)
    out = task.forward(model, batch)
    feats = out.views["masked"].tokens
    feats.retain_grad()
    task.local_terms(out, batch)["masked_loss"].backward()
    m = batch["patch_mask"]
    assert feats.grad[~m].abs().max() == 0 and feats.grad[m].abs().max() > 0
    # and the mask token replaced exactly the masked patches' embeddings
    x, _ = model.vision.embed(batch["images"], m, task.mask_token)
    plain, _ = model.vision.embed(batch["images"])
    same = (x == plain).all(-1)
    assert torch.equal(same, ~m)


def test_ema_teacher_follows_the_formula_after_each_step():
    model = small_model()
    task = _task(model, steps=10, sd_start=0.2, mk_start=0.4)
    assert task.teacher is None  # made when the first of the two starts: step 2
    task.begin_step(2)
    assert task.teacher is not None and task.active == {"decoder": False, "self_distill": True, "masked": False}
    before = {k: v.clone() for k, v in task.teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in model.vision.parameters():
            p.add_(0.01)
    student = {k: v.clone() for k, v in task.teacher.student.state_dict().items()}
    task.end_step(3)
    m = ema_momentum(1, 8, 0.9, 0.99)  # one step into the teacher's 8 (steps 2..10)
    after = task.teacher.module.state_dict()
    for k in before:
        if before[k].is_floating_point():
            assert torch.allclose(after[k], m * before[k] + (1 - m) * student[k], atol=1e-7), k


def test_centres_follow_the_teachers_outputs():
    model = small_model()
    task = _task(model)
    batch = _batch(model)
    task.begin_step(0)
    out = task.forward(model, batch)
    task.local_terms(out, batch)
    with torch.no_grad():
        t_out = task.teacher.module["vision"](batch["images"])
        want_g = 0.1 * task.teacher.module["heads"]["global"](t_out.emb).mean(0)
        want_p = 0.1 * task.teacher.module["heads"]["patch"](t_out.tokens[batch["patch_mask"]]).mean(0)
    task.end_step(1)
    assert torch.allclose(task.centers["global"], want_g, atol=1e-6)
    assert torch.allclose(task.centers["patch"], want_p, atol=1e-6)


def test_views_run_in_the_same_forward_as_the_batch():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, get_tokenizer(model)(["a", "b"]), views={"v": ImageView(x.flip(0))})
    assert torch.allclose(out.views["v"].emb, model.vision(x.flip(0)).emb)


# -- configs ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scenes")
    generate_scenes(d, n_train=48, n_test=16, image_size=32, samples_per_shard=16, verbose=False)
    return d


@pytest.mark.parametrize("model, override, key", [
    ("tiny-clip", "train.objectives.decoder.weight=1", "train.objectives.decoder"),
    ("tiny-coca", "train.objectives.decoder.referring=0.5", "train.objectives.decoder.referring"),
    ("tiny-coca", "train.objectives.masked.ratio=0.5", "train.objectives.masked"),
    ("tiny-limoe", "train.objectives.self_distill.weight=1", "train.objectives.self_distill"),
    ("tiny-siglip2", "train.objectives.masked.ratio=1.5", "train.objectives.masked.ratio"),
])
def test_objectives_the_model_cannot_run_fail_before_work(scenes, tmp_path, model, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_run_config(None, [f"model={model}", f"data.train={scenes}/train-000000.tar.gz", override,
                               f"output_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


# -- whole runs -----------------------------------------------------------------------------------------------------

def _config(tmp_path: Path, scenes: Path, out: str, steps: int = 6, **train) -> Path:
    cfg = {"model": "tiny-siglip2",
           "data": {"train": f"{scenes}/train-{{000000..000002}}.tar.gz", "batch_size": 6, "workers": 2,
                    "shuffle_buffer": 8, "crop_scale": [0.6, 1.0]},
           "train": {"steps": steps, "warmup_steps": 1, "lr": 1e-3, "loss": "siglip", "checkpoint_every": 0,
                     "log_every": 1, "seed": 3,
                     "objectives": {"decoder": {}, "self_distill": {"start": 0.5, "prototypes": 32},
                                    "masked": {"start": 0.5, "prototypes": 32},
                                    "teacher": {"momentum": 0.9, "momentum_end": 0.99, "head_hidden": 32,
                                                "head_bottleneck": 16}},
                     **train},
           "output_dir": str(tmp_path / out)}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, *overrides: str, env=None) -> subprocess.CompletedProcess:
    small = [o.replace("model=tiny-siglip2", "") for o in SMALL[1:]]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(config), *small, *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.slow
def test_recipe_stops_on_sigterm_and_resumes_exactly(scenes, tmp_path):
    """bf16, the objectives switching on at step 3 (teacher made then), a SIGTERM after step 4: the resumed run's
    every loss term and its final weights, teacher and heads equal an uninterrupted run's bit for bit."""
    full = _config(tmp_path, scenes, "full", precision="bf16")
    _train(full)
    recs = [r for r in _records(tmp_path / "full") if "loss" in r]
    assert "self_distill_loss" not in recs[2] and "self_distill_loss" in recs[3] and "masked_loss" in recs[3]
    assert all("caption_loss" in r for r in recs)

    cfg = _config(tmp_path, scenes, "split", steps=6, precision="bf16", checkpoint_every=0)
    sigterm_when([sys.executable, str(ROOT / "train.py"), str(cfg), *SMALL[1:]], tmp_path / "split" / "metrics.jsonl",
                 '"step": 4', ROOT)
    _train(cfg)
    a = {r["step"]: r for r in recs}
    b = {r["step"]: r for r in _records(tmp_path / "split") if "loss" in r}
    for step, rec in a.items():
        for k in ("loss", "contrastive_loss", "caption_loss", "self_distill_loss", "masked_loss"):
            assert rec.get(k) == b[step].get(k), (step, k)
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_recipe_with_gradient_caching_equals_the_plain_step(scenes, tmp_path):
    """The sigmoid loss over the whole batch, the decoder / self-distillation / masked terms per chunk: the same
    losses (to float rounding) as one pass over the batch."""
    _train(_config(tmp_path, scenes, "plain", steps=4))
    _train(_config(tmp_path, scenes, "cached", steps=4, grad_cache_chunk=2))
    a = [r for r in _records(tmp_path / "plain") if "loss" in r]
    b = [r for r in _records(tmp_path / "cached") if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss", "contrastive_loss", "caption_loss", "self_distill_loss", "masked_loss"):
            assert (k in ra) == (k in rb)
            if k in ra:
                assert abs(ra[k] - rb[k]) <= 2e-4 * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])


@pytest.mark.slow
def test_recipe_under_ddp_keeps_both_ranks_identical(scenes, tmp_path):
    cmd = two_gloo_ranks(str(ROOT / "train.py"), str(_config(tmp_path, scenes, "ddp", steps=4)), *SMALL[1:])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = _records(tmp_path / "ddp")
    assert recs[0]["world_size"] == 2
    final = [r for r in recs if r.get("final")][0]
    assert len(final["param_sha256"]) == 2 and len(set(final["param_sha256"])) == 1
    # the task's own parameters (heads, mask token) are outside DDP: averaged by hand, identical too
    task_hashes = [v for k, v in final.items() if k.endswith("_sha256") and k != "param_sha256"]
    assert task_hashes and all(len(set(h)) == 1 for h in task_hashes)
    assert any("masked_loss" in r for r in recs)


def test_a_bad_region_is_named_counted_and_the_sample_trains(scenes, tmp_path):
    """A shard whose regions break the rules: each is named in the skip log and counted; the samples train."""
    import tarfile

    src = scenes / "train-000000.tar.gz"
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    with tarfile.open(src) as tin, tarfile.open(bad_dir / "train-000000.tar", "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".json") and m.name.startswith("000001"):
                info = json.loads(data)
                info["regions"][0]["box"] = [20, 3, 10, 9]  # x1 < x0
                info["regions"].append({"box": [0, 0, 99, 99], "caption": "too big"})
                data = json.dumps(info).encode()
                m.size = len(data)
            import io

            tout.addfile(m, io.BytesIO(data))
    cfg = _config(tmp_path, scenes, "badrun", steps=3)
    _train(cfg, f"data.train={bad_dir}/train-000000.tar", "data.workers=0",
           "train.objectives.decoder.caption=0", "train.objectives.decoder.grounded=0")
    log = (tmp_path / "badrun" / "skipped_samples.rank0.txt").read_text()
    assert "000001: region 0: x1 < x0" in log and "000001: region" in log and "outside the 32x32 image" in log
    final = [r for r in _records(tmp_path / "badrun") if r.get("final")][0]
    assert final["skipped_by_reason"].get("bad region", 0) >= 2
