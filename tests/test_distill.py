"""Distillation: the loss against its formulas, teacher embeddings from disk equal to the teacher's own, config
errors naming their key, and a run whose teacher stays untouched and out of the student's files."""
from __future__ import annotations

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
from mm.inference.embed import embed_images, embed_texts
from mm.losses import ClipLoss, DistillLoss, similarity_kl
from mm.models import ModelOutput
from mm.train.distill import Distiller, DistillError, EmbeddingStore, _image_adapter
from mm.train.preflight import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def naive_kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sum_j p_j log(p_j / q_j) per row, mean over rows; for rows (i->t) and columns (t->i), averaged."""
    total = 0.0
    for a, b in ((t, s), (t.T, s.T)):
        p, q = torch.softmax(a, -1), torch.softmax(b, -1)
        total = total + (p * (p.log() - q.log())).sum(-1).mean()
    return total / 2


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_similarity_kl_equals_the_formula_and_vanishes_for_equal_logits():
    torch.manual_seed(0)
    t, s = torch.randn(6, 6, dtype=torch.float64) * 3, torch.randn(6, 6, dtype=torch.float64) * 3
    assert torch.allclose(similarity_kl(t, s).double(), naive_kl(t, s), atol=1e-6)
    assert similarity_kl(t, t).abs() < 1e-6
    assert similarity_kl(t, t + 5.0).abs() < 1e-5  # a constant shift leaves the distributions unchanged


def test_distill_loss_is_the_weighted_sum_and_trains_the_projection():
    torch.manual_seed(0)
    b, ds, dt = 5, 8, 12
    img = unit(b, ds).float().requires_grad_()
    txt = unit(b, ds).float().requires_grad_()
    scale = torch.tensor(7.0, requires_grad=True)
    out = ModelOutput(image_emb=img, text_emb=txt, logit_scale=scale)
    t_img, t_txt = unit(b, dt).float(), unit(b, dt).float()
    loss = DistillLoss(ClipLoss(), ds, dt, task_weight=0.5, kl_weight=2.0, feature_weight=3.0)
    assert loss.proj is not None and loss.proj.weight.shape == (dt, ds)
    r = loss(out, (t_img, t_txt, 20.0))
    kl = naive_kl(20.0 * t_img.double() @ t_txt.double().T, scale.double() * img.double() @ txt.double().T)
    def cos(a, c):
        return (1 - F.cosine_similarity(loss.proj(a), c, dim=-1)).mean()

    feat = (cos(img, t_img) + cos(txt, t_txt)) / 2
    assert torch.allclose(r["kl_loss"].double(), kl, atol=1e-5)
    assert torch.allclose(r["feature_loss"], feat, atol=1e-6)
    assert torch.allclose(r["task_loss"], ClipLoss()(out)["loss"])
    assert torch.allclose(r["loss"], 0.5 * r["task_loss"] + 2.0 * r["kl_loss"] + 3.0 * r["feature_loss"])
    r["loss"].backward()
    assert loss.proj.weight.grad.abs().sum() > 0 and scale.grad != 0  # student's scale learns the sharpness
    # equal widths: no projection; a temperature replaces both logit scales
    same = DistillLoss(ClipLoss(), ds, ds, feature_weight=1.0, feature_loss="mse", temperature=0.5)
    assert same.proj is None
    r = same(out, (img.detach(), txt.detach(), 20.0))
    assert r["feature_loss"].abs() < 1e-6
    assert r["kl_loss"].abs() < 1e-6  # same embeddings, same temperature: same distributions


def test_image_adapter_renormalises_and_resizes_for_the_teacher():
    s = mm.get_preset("micro-clip")
    assert torch.equal(_image_adapter(s, mm.get_preset("tiny-clip"))(x := torch.randn(2, 3, 32, 32)), x)
    t = mm.get_preset("tiny-clip")
    t.vision.image_mean, t.vision.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    pixels = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(s.vision.image_mean).view(3, 1, 1), torch.tensor(s.vision.image_std).view(3, 1, 1)
    student_in = (pixels - mean) / std
    assert torch.allclose(_image_adapter(s, t)(student_in), (pixels - 0.5) / 0.25, atol=1e-5)
    t.vision.image_size, t.vision.patch_size = 64, 8
    assert _image_adapter(s, t)(student_in).shape == (2, 3, 64, 64)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory, model_dir):
    """Shards, the teacher's precomputed image embeddings (by key) and caption embeddings (by text)."""
    from conftest import make_colour_shards

    tmp = tmp_path_factory.mktemp("distill")
    shards = make_colour_shards(tmp / "shards", shards=2, per_shard=8, templates=("a {} square",))
    teacher = mm.load_model(model_dir)
    embed_images(teacher, [f"{shards}/train-{{0000..0001}}.tar"], tmp / "img", workers=0, model_spec=str(model_dir))
    captions = [f"a {c} square number {i}" for i, c in enumerate(["red", "green", "blue", "yellow"] * 4)]
    embed_texts(teacher, captions, tmp / "txt", workers=0, model_spec=str(model_dir))
    return tmp, shards


def test_embeddings_from_disk_equal_the_teachers_own(teacher_files, model_dir, model):
    """Matched by shard key and by caption, the stored rows are the teacher's embeddings of those samples."""
    from mm.data.decode import SampleDecoder
    from mm.data.wds import iter_shard

    tmp, shards = teacher_files
    decode = SampleDecoder(mm.image_transform(model, train=False), image_keys=["jpg"])
    samples = [dict(decode(s), key=s["__key__"]) for s in iter_shard(f"{shards}/train-0001.tar", print)][::-1]
    batch = {"keys": [s["key"] for s in samples], "texts": [s["text"] for s in samples]}
    images = torch.stack([s["image"] for s in samples])
    tokens = mm.get_tokenizer(model)(batch["texts"])
    d = load_run_config(None, {"data.train": f"{shards}/train-0000.tar", "distill.teacher": str(model_dir)}).distill
    online = Distiller(d, mm.create_model("micro-clip"), "cpu")
    d.image_embeddings, d.text_embeddings = str(tmp / "img"), str(tmp / "txt")
    d.teacher = None
    stored = Distiller(d, mm.create_model("micro-clip"), "cpu")
    assert stored.teacher is None and stored.scale == pytest.approx(model.logit_scale.exp().item())
    for a, b in zip(online.teacher_embeddings(batch, images, tokens), stored.teacher_embeddings(batch, images, tokens)):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(DistillError, match="sample key 'nope'"):
        stored.images.lookup(["nope"])
    with pytest.raises(DistillError, match="caption 'a purple square'"):
        stored.texts.lookup(["a purple square"])
    assert len(EmbeddingStore(tmp / "img", "images")) == 16


@pytest.mark.parametrize("overrides, key", [
    ({"distill.image_embeddings": "IMG"}, "distill.teacher: required unless both"),
    ({"distill.teacher": "tiny-clip"}, "distill.teacher_pretrained: teacher 'tiny-clip' is a preset"),
    ({"distill.teacher": "nonexistent-model"}, "distill.teacher: unknown model 'nonexistent-model'"),
    ({"distill.teacher": "MODEL", "distill.feature_loss": "l1"}, "distill.feature_loss: must be cosine or mse"),
    ({"distill.teacher": "MODEL", "distill.kl_weight": 0},
     "distill.kl_weight: kl_weight and feature_weight are both 0"),
    ({"distill.teacher": "MODEL", "distill.temperature": -1}, "distill.temperature: must be > 0"),
    ({"distill.teacher": "MODEL", "distill.image_embeddings": "TXT"}, "distill.image_embeddings: TXT: holds texts"),
    ({"distill.teacher": "MODEL", "distill.text_embeddings": "TXT", "data.random_caption": True},
     "distill.text_embeddings: precomputed text embeddings"),
    ({"distill.teacher": "MODEL", "distill.text_embeddings": "SHARDS"},
     "distill.text_embeddings: SHARDS: no index.json"),
    ({"distill.teacher": "MODEL", "model": "micro-clip", "distill.teacher_pretrained": "MODEL/model.safetensors"},
     "distill.teacher_pretrained: MODEL is a model directory"),
    ({"distill.teacher": "tiny-siglip", "distill.teacher_pretrained": "MODEL/model.safetensors",
      "distill.image_embeddings": "IMG"}, "distill.image_embeddings: embedding widths differ"),
])
def test_config_errors_name_the_key(teacher_files, model_dir, overrides, key):
    tmp, shards = teacher_files
    names = {"IMG": str(tmp / "img"), "TXT": str(tmp / "txt"), "MODEL": str(model_dir), "SHARDS": str(shards)}
    ov = {"data.train": f"{shards}/train-0000.tar"}
    for k, v in overrides.items():
        for n, path in names.items():
            v = v.replace(n, path) if isinstance(v, str) else v
        ov[k] = v
    key = key.replace("TXT", names["TXT"]).replace("MODEL", names["MODEL"]).replace("SHARDS", names["SHARDS"])
    if "embedding widths" in key:  # a 64-wide teacher against the 128-wide stored rows
        ov["distill.teacher"] = "micro-clip"
        torch.save(mm.create_model("micro-clip").state_dict(), tmp / "micro.pt")
        ov["distill.teacher_pretrained"] = str(tmp / "micro.pt")
    with pytest.raises(ConfigError) as e:
        load_run_config(None, ov)
    assert key in str(e.value)


def test_temperature_is_needed_when_the_teachers_scale_is_unknown(teacher_files):
    tmp, shards = teacher_files
    index = json.loads((tmp / "txt" / "index.json").read_text())
    index["model"] = "open_clip:ViT-B-32"
    other = tmp / "txt_unknown"
    other.mkdir(exist_ok=True)
    for f in (tmp / "txt").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "index.json").write_text(json.dumps(index))
    ov = {"data.train": f"{shards}/train-0000.tar", "distill.image_embeddings": str(tmp / "img"),
          "distill.text_embeddings": str(other)}
    with pytest.raises(ConfigError, match="distill.temperature: needed"):
        load_run_config(None, ov)
    assert load_run_config(None, {**ov, "distill.temperature": 0.05}).distill.temperature == 0.05


def distill_run(tmp_path: Path, name: str, shards: Path, model_dir: Path, txt: Path, *overrides: str,
                launch: list[str] = ()):
    cfg = {"model": "micro-clip",
           "data": {"train": f"{shards}/train-{{0000..0001}}.tar", "batch_size": 4, "workers": 0, "shuffle_buffer": 4},
           "train": {"steps": 4, "warmup_steps": 1, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1},
           "distill": {"teacher": str(model_dir), "text_embeddings": str(txt), "feature_weight": 1.0},
           "output_dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, *launch, str(ROOT / "train.py"), str(path), *overrides], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_distilled_run_keeps_the_teacher_frozen_and_out_of_the_student(teacher_files, model_dir, tmp_path):
    tmp, shards = teacher_files
    before = (model_dir / "model.safetensors").read_bytes()
    proc = distill_run(tmp_path, "run", shards, model_dir, tmp / "txt")
    assert (model_dir / "model.safetensors").read_bytes() == before
    assert "distilling: teacher" in proc.stdout + proc.stderr
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "kl_loss" in r]
    assert len(steps) == 4 and all(math.isfinite(r["kl_loss"]) and r["feature_loss"] > 0 for r in steps)
    student = mm.load_pretrained(tmp_path / "run" / "final")  # the student alone: micro-clip's keys, loads strictly
    assert student.config.embed_dim == 64
    from safetensors.torch import load_file

    ck = tmp_path / "run" / "checkpoints" / "step_4"
    proj = load_file(str(ck / "distill.safetensors"))  # the 64 -> 128 projection, for resuming
    assert proj["weight"].shape == (128, 64)
    assert set(load_file(str(ck / "model.safetensors"))) == set(student.state_dict())
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    n_opt = sum(len(g["params"]) for g in opt["param_groups"])
    assert n_opt == len(list(student.parameters())) + 1  # the student's and the projection's, not the teacher's

    # stopped after step 2 and resumed: the projection comes back from the checkpoint, the result is the same
    distill_run(tmp_path, "resumed", shards, model_dir, tmp / "txt", "train.stop_after=2")
    resumed = distill_run(tmp_path, "resumed", shards, model_dir, tmp / "txt")
    assert "resumed from" in resumed.stdout + resumed.stderr
    ck2 = tmp_path / "resumed" / "checkpoints" / "step_4"
    a, b = load_file(str(ck / "model.safetensors")), load_file(str(ck2 / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(proj["weight"], load_file(str(ck2 / "distill.safetensors"))["weight"])


def test_two_process_distillation_keeps_student_and_projection_identical(teacher_files, model_dir, tmp_path):
    """Under `accelerate launch` with 2 gloo ranks, DDP averages the student's gradients and the distiller
    averages its projection's (it is outside DDP): after the run both are bit-identical on the two ranks. Without
    that sync each rank's projection would follow its own half of the data and the hashes would differ."""
    tmp, shards = teacher_files
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    distill_run(tmp_path, "ddp", shards, model_dir, tmp / "txt", launch=launch)
    recs = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["world_size"] == 2  # really two ranks
    assert [r["step"] for r in recs if "kl_loss" in r] == [1, 2, 3, 4]
    final = [r for r in recs if r.get("final")][0]
    for key in ("param_sha256", "distill_sha256"):
        assert len(final[key]) == 2 and len(set(final[key])) == 1, (key, final[key])
