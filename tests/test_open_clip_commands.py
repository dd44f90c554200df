"""The use commands on open_clip models, run as users run them (``python -m mm ...`` subprocesses), against
open_clip's own ``encode_image`` / ``encode_text`` on the same inputs (open_clip's ``image_transform`` and
tokenizer): a model mm runs through open_clip (a reduced ResNet, random weights) and a native SigLIP 2 (a reduced
``ViT-B-16-SigLIP2``: timm trunk, Hugging Face tokenizer, open_clip's SigLIP preprocessing), each saved with
``mm.save_pretrained``. Also: what needs mm's own blocks refuses a model run through open_clip with one line
naming what mm does not build (training, fine-tuning, init_from, export, int8, FSDP, MoE overrides), a teacher
run through open_clip distils, and ``mm models --open-clip`` says how mm runs each open_clip model.

The SigLIP 2 model needs transformers (its tokenizer): its tests are marked ``hf`` (``make test-hf``) and skip,
naming why, without it.
"""
from __future__ import annotations

import copy
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import COLOURS, colour_image, make_colour_shards, write_tar
from PIL import Image

import mm
from mm.cli import main as mm_main
from mm.hub.wrapped import WrappedModelError, is_wrapped
from mm.inference.embed import load_index

open_clip = pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
NEEDS_TRANSFORMERS = "needs the optional transformers extra: pip install 'mm[hf]'"
ATOL = 1e-5
TEMPLATES = ["a photo of a {}.", "a {} square"]
TEXTS = ["a red square", "Something BLUE, seen from afar", "yellow", "a green square number 7", "café naïve"]
# a reduced open_clip ResNet (ModifiedResNet image tower): mm runs it through open_clip
RESNET = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# open_clip's preprocessing of SigLIP 2 (its pretrained config for ViT-B-16-SigLIP2:webli)
VOCAB = 300  # the small SigLIP tokenizer's (whole words for the captions here, so they fit 16 tokens)
SIGLIP_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                     "resize_mode": "squash"}


# -- the models and open_clip's references ---------------------------------------------------------------
@dataclass
class Case:
    """An mm model directory and, for the same weights, open_clip's own model, preprocessing and tokenizer."""

    name: str
    model_dir: Path
    open_clip_model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenize: Callable[[list[str]], torch.Tensor]

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        """open_clip's normalised image embeddings."""
        x = torch.stack([self.preprocess(im) for im in images])
        return self.open_clip_model.encode_image(x, normalize=True).numpy()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        return self.open_clip_model.encode_text(self.tokenize(texts), normalize=True).numpy()

    def classifier(self, classes: list[str], templates: list[str]) -> np.ndarray:
        """CLIP's zero-shot weights [D, C]: mean of the normalised template embeddings of each class, renormalised."""
        emb = self.texts([t.format(c) for c in classes for t in templates]).reshape(len(classes), len(templates), -1)
        mean = emb.mean(axis=1)
        return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).T


def resnet_case(root: Path) -> Case:
    """open_clip's ResNet through ``mm.create_model`` (random weights, run wrapped), saved; the reference is
    open_clip's own CLIP built from the same config dict, holding the same weights."""
    torch.manual_seed(0)
    model = mm.create_model(RESNET)
    assert is_wrapped(model)
    mm.save_pretrained(model, root / "resnet")
    reference = open_clip.CLIP(**RESNET)
    reference.load_state_dict({k.removeprefix("model."): v for k, v in model.state_dict().items()}, strict=True)
    return Case("resnet", root / "resnet", reference.eval(), open_clip.image_transform(64, is_train=False),
                lambda texts: open_clip.tokenize(texts, context_length=16))


def siglip_tokenizer(d: Path) -> Path:
    """A small tokenizer directory shaped as SigLIP's (SentencePiece-style pieces, ``<pad>`` 0, ``</s>`` 1 after
    the text), built offline; BPE, so that the captions here are whole words and fit 16 tokens."""
    import tokenizers as tk
    from transformers import PreTrainedTokenizerFast

    numbers = " ".join(str(i) for i in range(1000, 1020))  # the shards' captions differ only in their number
    corpus = [" ".join(TEXTS), "a photo of a red green blue yellow square", "something seen from afar", numbers] * 4
    raw = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    raw.normalizer = tk.normalizers.NFKC()
    raw.pre_tokenizer = tk.pre_tokenizers.Metaspace()
    raw.decoder = tk.decoders.Metaspace()
    raw.train_from_iterator(corpus, tk.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "</s>", "<unk>"]))
    raw.post_processor = tk.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", raw.token_to_id("</s>"))])
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                            model_max_length=512).save_pretrained(d)
    return d


def siglip_case(root: Path) -> Case:
    """open_clip's ViT-B-16-SigLIP2 with its text tower reduced and its timm trunk swapped for a reduced one,
    weights perturbed (no zero biases or unit norms left), SigLIP's preprocessing; mm builds it natively."""
    pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    import timm

    tok = siglip_tokenizer(root / "siglip_tokenizer")
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16-SigLIP2"))
    cfg["embed_dim"] = 64
    cfg["text_cfg"].update(width=48, heads=2, layers=2, context_length=16, vocab_size=VOCAB, hf_tokenizer_name=str(tok))
    torch.manual_seed(0)
    reference = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    reference.visual.trunk = timm.create_model(cfg["vision_cfg"]["timm_model_name"], num_classes=0, global_pool="map",
                                               depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8)
    cfg["vision_cfg"]["image_size"] = 32
    reference.visual.preprocess_cfg = dict(SIGLIP_PREPROCESS)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.eval()
    model = mm.hub.from_open_clip(reference, cfg)
    assert not is_wrapped(model) and model.config.text.tokenizer == f"hf:{tok}"
    mm.save_pretrained(model, root / "siglip")
    hf = open_clip.tokenizer.HFTokenizer(str(tok), context_length=16, **cfg["text_cfg"]["tokenizer_kwargs"])
    return Case("siglip", root / "siglip", reference, open_clip.image_transform(32, is_train=False, **SIGLIP_PREPROCESS),
                hf)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> Case:
    return resnet_case(tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="module")
def siglip(tmp_path_factory) -> Case:
    return siglip_case(tmp_path_factory.mktemp("siglip2"))


@pytest.fixture(scope="module", params=["resnet", pytest.param("siglip", marks=pytest.mark.hf)])
def case(request) -> Case:
    return request.getfixturevalue(request.param)


# -- inputs ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 PNG colour squares and oblongs of several sizes (so resize modes matter) in class sub-folders."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    sizes = [(40, 40), (56, 36), (30, 50)]
    for i, c in enumerate(COLOURS):
        (root / c).mkdir(parents=True)
        for j, size in enumerate(sizes):
            colour_image(c, 48, seed=10 * i + j).resize(size, Image.BILINEAR).save(root / c / f"{j}.png")
    return root


def photo_list(root: Path) -> list[tuple[str, Image.Image]]:
    """(id relative to root, image) for every photo, in sorted id order (as `mm embed` orders them)."""
    return [(p.relative_to(root).as_posix(), Image.open(p).convert("RGB")) for p in sorted(root.rglob("*.png"))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """3 training shards and a test shard of 16 labelled, captioned colour squares, info.json with 4 classes."""
    return make_colour_shards(tmp_path_factory.mktemp("shards") / "shards", templates=tuple(TEMPLATES))


def shard_samples(path: Path) -> list[tuple[Image.Image, str, int]]:
    """(image, caption, label) of every sample of a shard, in order, read with tarfile and PIL."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), s["txt"].decode(), int(s["cls"]))
            for s in members.values()]


def run_mm(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mm", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, check=False,
                          text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_one_line_error(proc_or_rc, err: str, *needles: str) -> None:
    """Exit code 2, one ``error: ...`` line on stderr containing every needle, no traceback."""
    rc = proc_or_rc if isinstance(proc_or_rc, int) else proc_or_rc.returncode
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def report(case: Case, what: str, diff: float) -> None:
    """Assert ``diff`` (mm's output vs open_clip's) is within ATOL and show it (pytest -rP)."""
    print(f"{case.name}: {what}: max |mm - open_clip| = {diff:.2e}")
    assert diff < ATOL, (case.name, what, diff)


# -- the use commands: equal to open_clip's encoders ---------------------------------------------------------
def test_zeroshot_equals_open_clip(case, photos, tmp_path):
    out = tmp_path / "predictions.json"
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    run_mm("zeroshot", "--model", case.model_dir, photos, "--templates", tmp_path / "templates.txt", "-k", "4",
           "--batch-size", "5", "--workers", "0", "--out", out)
    got = json.loads(out.read_text())
    classes = got["classes"]
    assert sorted(classes) == sorted(COLOURS)  # the class sub-folders
    items = photo_list(photos)
    probs = torch.from_numpy(100 * case.images([im for _, im in items]) @ case.classifier(classes, TEMPLATES))
    probs = probs.double().softmax(-1).numpy()
    preds = {Path(p["image"]).relative_to(photos).as_posix(): p for p in got["predictions"]}
    assert sorted(preds) == [i for i, _ in items]
    diffs = []
    for (name, _), ref in zip(items, probs):
        top = preds[name]["top"]
        assert top[0]["class"] == classes[int(ref.argmax())]  # the prediction itself: exactly open_clip's
        diffs.append(max_diff([t["prob"] for t in top], [ref[classes.index(t["class"])] for t in top]))
        assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
    report(case, "zeroshot probabilities", max(diffs))
    labels = np.array([classes.index(n.split("/")[0]) for n, _ in items])
    assert got["accuracy"]["zeroshot_top1"] == pytest.approx((probs.argmax(1) == labels).mean())


def check_topk(case: Case, what: str, scores: list[float], ids: list[str], reference: dict[str, float],
               k: int) -> None:
    """The results are the k best by open_clip's scores, best first, each with open_clip's score (ties within
    ATOL may come in either order)."""
    assert len(ids) == len(set(ids)) == min(k, len(reference))
    report(case, what, max_diff(scores, [reference[i] for i in ids]))
    assert all(a >= b - ATOL for a, b in itertools.pairwise(scores))
    rest = [v for i, v in reference.items() if i not in ids]
    assert not rest or min(scores) >= max(rest) - ATOL


@pytest.mark.slow
def test_embed_images_and_search_texts_equal_open_clip(case, photos, tmp_path):
    out = tmp_path / "emb"
    run_mm("embed", "--model", case.model_dir, "--images", photos, "--out", out, "--batch-size", "5",
           "--chunk-size", "8", "--workers", "0")
    emb, ids = load_index(out)
    items = photo_list(photos)
    ref = case.images([im for _, im in items])
    assert ids == [i for i, _ in items] and emb.shape == ref.shape
    report(case, "embed --images", max_diff(emb, ref))
    queries = ["a red square", "Something BLUE"]
    proc = run_mm("search", "--index", out, *queries, "-k", "5", "--json")
    lines = proc.stdout.splitlines()
    assert len(lines) == len(queries)
    for line, row in zip(lines, case.texts(queries) @ ref.T):
        results = json.loads(line)["results"]
        check_topk(case, "search (text queries) scores", [r["score"] for r in results], [r["id"] for r in results],
                   dict(zip(ids, row)), 5)


@pytest.mark.slow
def test_embed_texts_and_search_an_image_equal_open_clip(case, photos, tmp_path):
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "emb"
    run_mm("embed", "--model", case.model_dir, "--texts", tmp_path / "texts.txt", "--out", out, "--batch-size", "2")
    emb, ids = load_index(out)
    ref = case.texts(TEXTS)
    assert [i.split(": ", 1)[1] for i in ids] == TEXTS
    report(case, "embed --texts", max_diff(emb, ref))
    query = photos / "blue" / "1.png"
    proc = run_mm("search", "--index", out, "--image", query, "-k", "3", "--json")
    results = json.loads(proc.stdout)["results"]
    row = case.images([Image.open(query).convert("RGB")])[0] @ ref.T
    check_topk(case, "search (image query) scores", [r["score"] for r in results], [r["id"] for r in results],
               dict(zip(ids, row)), 3)


def test_eval_equals_open_clip(case, shards, tmp_path):
    run_mm("eval", "--model", case.model_dir, "--zeroshot", shards / "test-0000.tar", "--retrieval",
           shards / "test-0000.tar", "--batch-size", "6", "--workers", "0", "--out", tmp_path / "r.json")
    got = json.loads((tmp_path / "r.json").read_text())
    samples = shard_samples(shards / "test-0000.tar")
    img = case.images([s[0] for s in samples])
    labels = np.array([s[2] for s in samples])
    logits = img @ case.classifier(COLOURS, TEMPLATES)
    rank = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(1)  # classes scored above the label
    txt = case.texts([s[1] for s in samples])
    assert (txt @ txt.T - np.eye(len(txt))).max() < 1 - 1e-4  # distinct captions: no ties to rank either way
    sim = img @ txt.T
    diag = np.diag(sim)
    i2t, t2i = (sim > diag[:, None]).sum(1), (sim > diag[None, :]).sum(0)  # others ranked above the pair
    expected = {"zeroshot_top1": (rank < 1).mean(), "zeroshot_top5": (rank < 5).mean(), "zeroshot_n": len(labels),
                **{f"i2t_r{k}": (i2t < k).mean() for k in (1, 5, 10)}, **{f"t2i_r{k}": (t2i < k).mean() for k in (1, 5, 10)}}
    assert got == pytest.approx(expected)


def shard_members(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of every sample of a shard, in order (what conftest's ``write_tar`` writes back)."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return list(members.items())


def clip_benchmark_layout(d: Path, parts: list[list[tuple[str, dict[str, bytes]]]], **files: str) -> Path:
    """clip_benchmark's webdataset layout (``clip_benchmark_export_wds``): ``test/0.tar ..`` with
    ``test/nshards.txt``, and the text ``files`` beside them (classnames.txt, ...)."""
    (d / "test").mkdir(parents=True)
    for i, part in enumerate(parts):
        write_tar(d / "test" / f"{i}.tar", part)
    (d / "test" / "nshards.txt").write_text(f"{len(parts)}\n")
    for name, text in files.items():
        (d / f"{name}.txt").write_text(text)
    return d


def test_benchmark_equals_open_clip(case, shards, tmp_path):
    """`mm benchmark` on the test shard in clip_benchmark's layout, as a classification set (13 of its 16 images
    in two shards, each labelled with the colour open_clip's zero-shot classifier ranks 1st, 2nd or 3rd for it, so
    that acc1 is neither 0 nor 1) and as a retrieval set (every other image with a second caption: image -> text
    is a hit on ANY of its captions): clip_benchmark's result files, holding clip_benchmark's metrics of open_clip's
    own embeddings. 4 classes: acc5 is NaN, as clip_benchmark has it."""
    members = shard_members(shards / "test-0000.tar")
    samples = shard_samples(shards / "test-0000.tar")
    img = case.images([s[0] for s in samples])
    n_cls = 13
    logits = img[:n_cls] @ case.classifier(COLOURS, TEMPLATES)
    labels = np.array([np.argsort(-row)[i % 3] for i, row in enumerate(logits)])
    cls_dir = clip_benchmark_layout(
        tmp_path / "colours", [[(k, {**m, "cls": str(y).encode()}) for (k, m), y in zip(part, ys)]
                               for part, ys in ((members[:8], labels[:8]), (members[8:n_cls], labels[8:]))],
        classnames="\n".join(COLOURS) + "\n",
        zeroshot_classification_templates="\n".join(t.replace("{}", "{c}") for t in TEMPLATES) + "\n")
    captions = [[s[1]] + ([f"{s[1]} seen from afar"] if i % 2 == 0 else []) for i, s in enumerate(samples)]
    ret_dir = clip_benchmark_layout(
        tmp_path / "colour_captions", [[(k, {"jpg": m["jpg"], "txt": "\n".join(c).encode()})
                                        for (k, m), c in zip(members, captions)]], dataset_type="retrieval\n")
    out = tmp_path / "out"
    run_mm("benchmark", "--model", case.model_dir, "--dataset", cls_dir, ret_dir, "--batch-size", "5",
           "--workers", "0", "--device", "cpu", "--output", out)

    # classification: the position of each label among open_clip's zero-shot logits (no ties to rank either way)
    rank = (logits > logits[np.arange(n_cls), labels][:, None]).sum(1)
    recalls = [(rank[labels == c] == 0).mean() for c in np.unique(labels)]
    classification = {"acc1": (rank == 0).mean(), "acc5": math.nan, "mean_per_class_recall": np.mean(recalls)}
    assert len(COLOURS) < 5 and 0 < classification["acc1"] < 1
    # retrieval: an image's best caption is a hit if fewer than k captions score above it; a caption if fewer
    # than k images score above its own
    texts = [c for cs in captions for c in cs]
    owner = np.array([i for i, cs in enumerate(captions) for _ in cs])
    txt = case.texts(texts)
    assert (txt @ txt.T - np.eye(len(txt))).max() < 1 - 1e-4  # distinct captions: no ties to rank either way
    sim = img @ txt.T  # (images, captions)
    best_own = np.array([sim[i, owner == i].max() for i in range(len(samples))])
    i2t = (sim > best_own[:, None]).sum(1)
    t2i = (sim > sim[owner, np.arange(len(texts))][None, :]).sum(0)
    retrieval = {**{f"image_retrieval_recall@{k}": (t2i < k).mean() for k in (1, 5, 10)},
                 **{f"text_retrieval_recall@{k}": (i2t < k).mean() for k in (1, 5, 10)}}

    model = str(case.model_dir)
    expected = {}
    for d, task, metrics in ((cls_dir, "zeroshot_classification", classification),
                             (ret_dir, "zeroshot_retrieval", retrieval)):
        # clip_benchmark's default --output, "/" -> "_" in the names
        name = "{dataset}_{pretrained}_{model}_{language}_{task}.json".format(
            dataset=d.name, pretrained="", model=model.replace("/", "_"), language="en", task=task)
        expected[name] = {"dataset": f"wds/{d.name}", "model": model, "pretrained": "", "task": task,
                          "metrics": metrics, "language": "en"}
    assert sorted(p.name for p in out.glob("*.json")) == sorted(expected)
    for name, ref in expected.items():
        got = json.loads((out / name).read_text())
        assert {k: v for k, v in got.items() if k != "metrics"} == {k: v for k, v in ref.items() if k != "metrics"}
        assert got["metrics"] == pytest.approx(ref["metrics"], abs=1e-9, nan_ok=True), (case.name, name)
        print(f"{case.name}: {ref['task']}: {got['metrics']}")


def test_probe_equals_open_clip_features(case, shards, tmp_path):
    from mm.eval.probe import linear_probe

    wds = [1e-3, 1e-1]
    proc = run_mm("probe", "--model", case.model_dir, "--train", f"{shards}/train-{{0000..0002}}.tar", "--test",
                  shards / "test-0000.tar", "--weight-decays", ",".join(map(str, wds)), "--max-iter", "100",
                  "--workers", "0", "--json")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    train = [s for i in range(3) for s in shard_samples(shards / f"train-{i:04d}.tar")]
    test = shard_samples(shards / "test-0000.tar")
    feats = [(torch.from_numpy(case.images([s[0] for s in part])), torch.tensor([s[2] for s in part]))
             for part in (train, test)]
    ref = linear_probe(*feats[0], *feats[1], 4, weight_decays=wds, val_fraction=0.2, seed=0, max_iter=100)
    assert (got["n_train"], got["n_test"]) == (len(train), len(test))
    assert [(v["weight_decay"], v["top1"]) for v in got["val"]] == [(v["weight_decay"], v["top1"]) for v in ref["val"]]
    assert (got["weight_decay"], got["probe_top1"], got["probe_top5"]) == pytest.approx(
        (ref["weight_decay"], ref["probe_top1"], ref["probe_top5"]))


def test_caption_refuses_a_model_without_decoder(case, photos):
    proc = run_mm("caption", "--model", case.model_dir, photos, ok=False)
    assert_one_line_error(proc, proc.stderr, "no captioning decoder", "CoCa")
    assert proc.stdout == ""


# -- what needs mm's own blocks refuses a model run through open_clip -----------------------------------------
RESNET_REASON = "a ResNet image tower"  # what mm does not build of RESNET (NotNative's message)


def test_library_refusals_name_what_mm_does_not_build(resnet, shards, tmp_path):
    from mm.inference.export import ExportError, export_model
    from mm.train.adapt import load_init_weights
    from mm.train.finetune import FinetuneConfig, run, run_config
    from mm.train.fsdp import shard_model

    model = mm.load_pretrained(resnet.model_dir)
    refusals = [
        (WrappedModelError, "int8 quantization", lambda: mm.quantize(model, "int8")),
        (WrappedModelError, "int8-weight quantization", lambda: mm.quantize(model, "int8-weight")),
        (ExportError, "export (torch-export)", lambda: export_model(model, tmp_path / "x", "torch-export")),
        (WrappedModelError, "FSDP (train.fsdp: one unit per mm Block)", lambda: shard_model(model)),
        (WrappedModelError, "fine-tuning (mm finetune)", lambda: run(run_config(
            FinetuneConfig(steps=1), model=str(resnet.model_dir), train=str(shards / "train-0000.tar"),
            test=str(shards / "test-0000.tar"), out=tmp_path / "ft", classes=COLOURS))),
        (WrappedModelError, f"train.init_from {resnet.model_dir}",
         lambda: load_init_weights(mm.create_model("tiny-clip"), str(resnet.model_dir))),
    ]
    for error, what, call in refusals:
        with pytest.raises(error) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{what} needs a model built with mm's own blocks") and RESNET_REASON in msg, msg
        assert "\n" not in msg
    assert not (tmp_path / "x").exists() and not (tmp_path / "ft").exists()  # refused before any work
    with pytest.raises(mm.hub.ConversionError, match=r"runs through open_clip \(mm does not build its towers\); its "
                                                     r"weights are open_clip's own \(model\.model\)$"):
        mm.hub.to_hf_clip(model, tmp_path / "hf")  # mm convert says "use --to-open-clip" (test below)
    # MoE upcycling / any architecture override: only a model mm builds takes one
    with pytest.raises(mm.models.NotNative, match=RESNET_REASON):
        mm.create_model(RESNET, vision__transformer__moe__num_experts=4)


def write_run_config(tmp_path: Path, shards: Path, **sections) -> Path:
    cfg = {"model": "tiny-clip", "output_dir": str(tmp_path / "run"),
           "data": {"train": f"{shards}/train-{{0000..0002}}.tar", "batch_size": 4, "workers": 0, "shuffle_buffer": 8},
           "train": {"steps": 2, "warmup_steps": 1, "lr": 1e-3, "checkpoint_every": 0, "log_every": 1}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) and key != "model" else value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("overrides, what", [
    (["model=RN50"], "model: training needs"),  # open_clip's registry name
    (["model=RN50", "model.vision.transformer.moe.num_experts=4"], "model: training needs"),  # MoE upcycling
    (["model=RESNET_JSON"], "model: training needs"),  # a config file in open_clip's format
    (["train.init_from=RESNET_DIR"], "train.init_from: starting from its weights needs"),
    (["train.init_from=open_clip:RN50"], "train.init_from: starting from its weights needs"),
    (["model=null", "train.init_from=RESNET_DIR"], "model: training needs"),
    (["model=null", "train.init_from=open_clip:RN50"], "model: training needs"),
    (["train.fsdp=true", "model=RN50"], "model: training needs"),
])
def test_train_refuses_a_model_run_through_open_clip(overrides, what, resnet, shards, tmp_path, capsys):
    (tmp_path / "resnet.json").write_text(json.dumps(RESNET))
    overrides = [o.replace("RESNET_JSON", str(tmp_path / "resnet.json")).replace("RESNET_DIR", str(resnet.model_dir))
                 for o in overrides]
    rc = mm_main(["train", str(write_run_config(tmp_path, shards)), *overrides])
    assert_one_line_error(rc, capsys.readouterr().err, what, "needs a model built with mm's own blocks",
                          RESNET_REASON, "runs this one through open_clip")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_commands_refuse_with_one_line(resnet, shards, photos, tmp_path, capsys):
    """finetune / export / embed --quantize through the CLI's guard: exit 2, one line, nothing written."""
    d = str(resnet.model_dir)
    cases = [
        (["finetune", "--model", d, "--train", str(shards / "train-0000.tar"), "--test",
          str(shards / "test-0000.tar"), "--out", str(tmp_path / "ft")], "fine-tuning (mm finetune) needs"),
        (["finetune", "--model", "open_clip:RN50", "--train", str(shards / "train-0000.tar"), "--test",
          str(shards / "test-0000.tar"), "--out", str(tmp_path / "ft")], "fine-tuning (mm finetune) needs"),
        (["export", "--model", d, "--to", "torch-export", "--out", str(tmp_path / "x")], "export (torch-export) needs"),
        (["embed", "--model", d, "--images", str(photos), "--out", str(tmp_path / "e"), "--quantize", "int8",
          "--workers", "0"], "int8 quantization needs"),
    ]
    for argv, what in cases:
        rc = mm_main(argv)
        assert_one_line_error(rc, capsys.readouterr().err, what, RESNET_REASON)
    assert not any((tmp_path / n).exists() for n in ("ft", "x", "e"))
    rc = mm_main(["convert", "--model", d, "--to-hf", str(tmp_path / "hf")])
    assert_one_line_error(rc, capsys.readouterr().err, "runs through open_clip", "use --to-open-clip")
    assert not (tmp_path / "hf").exists()


def test_unavailable_tokenizer_is_one_line(resnet, tmp_path, capsys):
    """A model whose Hugging Face tokenizer cannot be found: the commands that tokenize say so in one line."""
    d = tmp_path / "model"
    shutil.copytree(resnet.model_dir, d)
    meta = json.loads((d / "config.json").read_text())
    meta["wrapped"]["text"]["tokenizer"] = f"hf:{tmp_path / 'no_such_tokenizer'}"
    (d / "config.json").write_text(json.dumps(meta))
    (tmp_path / "t.txt").write_text("a red square\n")
    rc = mm_main(["embed", "--model", str(d), "--texts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "e")])
    assert_one_line_error(rc, capsys.readouterr().err, "no_such_tokenizer")


# -- a teacher run through open_clip distils ---------------------------------------------------------------
@pytest.mark.parametrize("teacher", ["resnet", "open_clip:RN50", pytest.param("siglip", marks=pytest.mark.hf)])
def test_teachers_run_through_open_clip_pass_the_preflight(teacher, request, shards, tmp_path):
    from mm.train.preflight import load_run_config

    cfg = write_run_config(tmp_path, shards)
    if teacher in ("resnet", "siglip"):
        teacher = str(request.getfixturevalue(teacher).model_dir)
    run = load_run_config(cfg, [f"distill.teacher={teacher}"])
    assert run.distill.teacher == teacher


@pytest.mark.parametrize("which", ["resnet", pytest.param("siglip", marks=pytest.mark.hf)])
def test_distiller_sees_open_clips_embeddings(which, request, photos):
    """The distiller's teacher embeddings of a student's batch are open_clip's own: the student's images
    re-normalised for the teacher, the captions re-tokenized by the teacher's tokenizer (SigLIP's: another
    tokenizer at the same context length as the student's)."""
    from mm.losses import ClipLoss
    from mm.train.config import DistillConfig
    from mm.train.distill import Distiller

    teacher: Case = request.getfixturevalue(which)
    size = mm.load_pretrained(teacher.model_dir).config.vision.image_size
    student = mm.create_model("tiny-clip", vision__image_size=size, text__context_length=16)
    distiller = Distiller(DistillConfig(teacher=str(teacher.model_dir)), student, "cpu")
    pictures = [im for _, im in photo_list(photos)]
    images = torch.stack([mm.image_transform(student)(im) for im in pictures])
    tokens = mm.get_tokenizer(student)(TEXTS)
    img, txt = distiller.teacher_embeddings({"texts": TEXTS}, images, tokens)
    s_mean, s_std = (torch.tensor(v).view(3, 1, 1) for v in (student.config.vision.image_mean,
                                                               student.config.vision.image_std))
    t_mean, t_std = (torch.tensor(v).view(3, 1, 1) for v in (teacher.preprocess.transforms[-1].mean,
                                                               teacher.preprocess.transforms[-1].std))
    with torch.no_grad():  # the same pixels, in the teacher's normalisation
        ref_img = teacher.open_clip_model.encode_image((images * s_std + s_mean - t_mean) / t_std, normalize=True)
    report(teacher, "distillation teacher images", max_diff(img, ref_img))
    report(teacher, "distillation teacher texts", max_diff(txt, teacher.texts(TEXTS)))


def test_training_with_a_teacher_run_through_open_clip(resnet, shards, tmp_path):
    run_mm("train", write_run_config(tmp_path, shards), f"distill.teacher={resnet.model_dir}")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "kl_loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["kl_loss"]) and r["kl_loss"] > 0 for r in steps)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


# -- mm models --open-clip -----------------------------------------------------------------------------------
def listed(out: str) -> dict[str, tuple[str, str]]:
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    return {r[0]: (r[1], r[2] if len(r) > 2 else "") for r in rows}


def test_models_lists_open_clip_models_and_how_mm_runs_them(capsys):
    names = ["ViT-B-32", "ViT-B-16-SigLIP2", "convnext_base", "RN50"]
    assert mm_main(["models", "--open-clip", *names]) == 0
    rows = listed(capsys.readouterr().out)
    assert sorted(rows) == sorted(names)
    for name in ("ViT-B-32", "ViT-B-16-SigLIP2"):
        cfg = open_clip.get_model_config(name)
        kind, note = rows[name]
        assert kind == "native" and f"embed {cfg['embed_dim']}" in note
        assert f"text {cfg['text_cfg']['layers']}x{cfg['text_cfg']['width']}" in note
    assert f"image 224px/32 vision 12x{open_clip.get_model_config('ViT-B-32')['vision_cfg']['width']}" in rows["ViT-B-32"][1]
    assert rows["convnext_base"][0] == "open_clip" and "convnext_base" in rows["convnext_base"][1]
    assert rows["RN50"][0] == "open_clip" and "ResNet" in rows["RN50"][1]


def test_models_lists_open_clips_pretrained_weights(capsys):
    assert mm_main(["models", "--pretrained", "RN50", "ViT-B-32"]) == 0
    rows = listed(capsys.readouterr().out)
    expected = [f"open_clip:{n}:{t}" for n, t in open_clip.list_pretrained() if n in ("RN50", "ViT-B-32")]
    assert list(rows) == expected
    assert {rows[e][0] for e in expected if ":RN50:" in e} == {"open_clip"}
    assert {rows[e][0] for e in expected if ":ViT-B-32:" in e} == {"native"}


def test_models_without_flags_lists_mm_presets(capsys):
    from mm.models.presets import list_models as mm_presets

    assert mm_main(["models"]) == 0
    assert list(listed(capsys.readouterr().out)) == mm_presets()
    assert mm_main(["models", "--open-clip", "no-such-model*"]) == 2
    assert "no open_clip model matches no-such-model*" in capsys.readouterr().err
