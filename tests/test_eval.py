"""Zero-shot classifier / accuracy and retrieval recall, against open_clip and brute-force references."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mm
from mm.eval import (
    load_names,
    predict,
    retrieval_eval,
    zero_shot_classifier,
    zero_shot_eval,
)

CLASSES = ["cat", "dog", "golden retriever", "café", "airplane", "tree frog", "x"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{}", "art of a {} in a museum."]


class FixedEmbed(nn.Module):
    """Test double for the model INPUT: image b is ``images[b, 0, 0, 0]``, an index into a fixed table, and
    token row m's first entry indexes a text table. Records whether it was called in eval mode."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("image_table", image_table)
        self.register_buffer("text_table", text_table if text_table is not None else image_table)
        self.modes: list[bool] = []

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.modes.append(self.training)
        emb = self.image_table[images[:, 0, 0, 0].long()]
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = self.text_table[tokens[:, 0]]
        return F.normalize(emb, dim=-1) if normalize else emb


def _index_images(idx) -> torch.Tensor:
    return torch.as_tensor(idx, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)


def _split(n: int, sizes: list[int]) -> list[slice]:
    out, s, i = [], 0, 0
    while s < n:
        e = min(n, s + sizes[i % len(sizes)])
        out.append(slice(s, e))
        s, i = e, i + 1
    return out


# ---------------------------------------------------------------- zero_shot_classifier

def _small_open_clip():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=64, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=32, width=64, heads=2, layers=2))
    return model.eval(), open_clip.tokenizer.SimpleTokenizer(context_length=32)


# batch sizes that split classes mid-way (5 texts across 4 templates; 37 across 80)
@pytest.mark.parametrize("templates,batch_size", [("strings", 256), ("strings", 5), ("openai", 256),
                                                  ("openai", 37)])
def test_classifier_equals_open_clip(templates, batch_size):
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    model, tok = _small_open_clip()
    tmpl = TEMPLATES if templates == "strings" else OPENAI_IMAGENET_TEMPLATES
    ref = build_zero_shot_classifier(model, tok, CLASSES, tmpl, num_classes_per_batch=3)
    ours = zero_shot_classifier(model, tok, CLASSES, None if templates == "openai" else tmpl,
                                batch_size=batch_size)
    assert ours.shape == (64, len(CLASSES)) and not ours.requires_grad
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # and the classes stay distinguishable: a per-class mix-up would still pass a norm check
    assert not torch.allclose(ours[:, 0], ours[:, 1], atol=1e-3)


def test_classifier_mm_tiny_clip_batched_and_mode_restored():
    from open_clip.zero_shot_classifier import build_zero_shot_classifier_legacy

    torch.manual_seed(0)
    model = mm.create_model("tiny-clip").train()
    tok = mm.get_tokenizer(model)
    calls: list[tuple[int, bool]] = []
    encode = model.encode_text

    def spy(tokens, normalize=False):
        calls.append((tokens.shape[0], model.training))
        return encode(tokens, normalize=normalize)

    model.encode_text = spy
    ours = zero_shot_classifier(model, tok, CLASSES, TEMPLATES, batch_size=10)
    n_texts = len(CLASSES) * len(TEMPLATES)  # 28 texts -> 10 + 10 + 8, not one forward per class
    assert [n for n, _ in calls] == [10, 10, 8]
    assert not any(training for _, training in calls)
    assert model.training  # restored
    assert sum(n for n, _ in calls) == n_texts
    model.encode_text = encode
    model.eval()
    ref = build_zero_shot_classifier_legacy(model, tok, CLASSES, TEMPLATES)  # one class at a time
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.norm(dim=0), torch.ones(len(CLASSES)))


def test_classifier_callable_and_format_templates_agree():
    model = FixedEmbed(torch.randn(100, 8))
    vocab = {}

    def tok(texts):  # each distinct text gets its own row of the text table
        return torch.tensor([[vocab.setdefault(t, len(vocab))] for t in texts])

    a = zero_shot_classifier(model, tok, ["a", "b"], ["x {} y", "{}!"])
    b = zero_shot_classifier(model, tok, ["a", "b"], [lambda c: f"x {c} y", lambda c: f"{c}!"])
    torch.testing.assert_close(a, b)
    table = F.normalize(model.text_table, dim=-1)  # brute force: mean of the two normalised rows
    for c, name in enumerate(["a", "b"]):
        want = F.normalize(table[vocab[f"x {name} y"]] + table[vocab[f"{name}!"]], dim=0)
        torch.testing.assert_close(a[:, c], want)


# ---------------------------------------------------------------- zero_shot_eval / predict

def _brute_force_accuracy(emb, W, labels):
    n_classes = len(W[0])
    k = min(5, n_classes)
    per = {}
    for e, y in zip(emb.tolist(), labels.tolist()):
        scores = [sum(e[d] * W[d][c] for d in range(len(e))) for c in range(n_classes)]
        rank = sum(s > scores[y] for s in scores)  # classes scoring strictly higher than the truth
        n, h1, h5 = per.get(y, (0, 0, 0))
        per[y] = (n + 1, h1 + (rank == 0), h5 + (rank < k))
    n = sum(v[0] for v in per.values())
    return (sum(v[1] for v in per.values()) / n, sum(v[2] for v in per.values()) / n, n,
            {c: {"n": v[0], "top1": v[1] / v[0], "top5": v[2] / v[0]} for c, v in per.items()})


@pytest.mark.parametrize("n_classes", [3, 5, 12])
def test_zero_shot_eval_against_brute_force(n_classes):
    g = torch.Generator().manual_seed(n_classes)
    n, dim = 97, 16
    emb = torch.randn(n, dim, generator=g)
    W = F.normalize(torch.randn(dim, n_classes, generator=g), dim=0)
    # labels leave the last class out, so per_class must skip it
    labels = torch.randint(0, n_classes - 1, (n,), generator=g)
    model = FixedEmbed(emb).train()
    batches = [(_index_images(torch.arange(n)[s]), labels[s]) for s in _split(n, [7, 1, 20, 13])]
    got = zero_shot_eval(model, W, batches)
    top1, top5, count, per = _brute_force_accuracy(F.normalize(emb, dim=-1), W.tolist(), labels)
    assert got["n"] == count == n
    assert got["zeroshot_top1"] == pytest.approx(top1)
    assert got["zeroshot_top5"] == pytest.approx(top5)
    assert set(got["per_class"]) == set(per) and n_classes - 1 not in got["per_class"]
    for c in per:
        assert got["per_class"][c] == pytest.approx(per[c])
    if n_classes <= 5:
        assert got["zeroshot_top5"] == 1.0  # top-min(5, C) covers every class
    else:
        assert 0 < got["zeroshot_top1"] < got["zeroshot_top5"] < 1
    assert model.modes and not any(model.modes) and model.training


def test_zero_shot_eval_known_answers():
    W = torch.eye(6)  # class c's embedding is basis vector c
    labels = torch.arange(60) % 6
    perfect = FixedEmbed(torch.eye(6)[labels] + 0.01 * torch.randn(60, 6))
    shifted = FixedEmbed(torch.eye(6)[(labels + 1) % 6] + 0.5 * torch.eye(6)[labels])  # truth ranks 2nd
    batches = [(_index_images(torch.arange(60)[s]), labels[s]) for s in _split(60, [25])]
    assert zero_shot_eval(perfect, W, batches)["zeroshot_top1"] == 1.0
    res = zero_shot_eval(shifted, W, batches)
    assert res["zeroshot_top1"] == 0.0 and res["zeroshot_top5"] == 1.0
    assert all(v == {"n": 10, "top1": 0.0, "top5": 1.0} for v in res["per_class"].values())
    with pytest.raises(ValueError, match="no samples"):
        zero_shot_eval(perfect, W, [])


def test_predict_against_softmax():
    g = torch.Generator().manual_seed(1)
    emb, W = torch.randn(9, 8, generator=g), F.normalize(torch.randn(8, 4, generator=g), dim=0)
    model = FixedEmbed(emb)
    probs, idx = predict(model, W, _index_images(torch.arange(9)), k=5)
    full = (100 * F.normalize(emb, dim=-1) @ W).softmax(-1)
    assert probs.shape == idx.shape == (9, 4)  # k capped at n_classes
    torch.testing.assert_close(probs, full.sort(dim=-1, descending=True).values)
    assert torch.equal(idx, full.argsort(dim=-1, descending=True))
    probs2, idx2 = predict(model, W, _index_images(torch.arange(9)), k=1)
    assert torch.equal(idx2[:, 0], full.argmax(-1)) and probs2.shape == (9, 1)


# ---------------------------------------------------------------- retrieval_eval

def _brute_force_recall(S: list[list[float]], owner: list[int], ks) -> dict[str, float]:
    n_img, n_txt = len(S), len(owner)
    out = {}
    for k in ks:
        hits = 0
        for i in range(n_img):
            order = sorted(range(n_txt), key=lambda m: -S[i][m])
            hits += any(owner[m] == i for m in order[:k])
        out[f"i2t_r{k}"] = hits / n_img
    for k in ks:
        hits = 0
        for m in range(n_txt):
            order = sorted(range(n_img), key=lambda i: -S[i][m])
            hits += owner[m] in order[:k]
        out[f"t2i_r{k}"] = hits / n_txt
    return out


def _retrieval_data(n_img: int, dim: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    img = torch.randn(n_img, dim, generator=g)
    n_caps = [rng.randint(1, 5) for _ in range(n_img)]
    owner = [i for i, c in enumerate(n_caps) for _ in range(c)]
    txt = img[owner] + noise * torch.randn(len(owner), dim, generator=g)  # captions near their image
    captions, m = [], 0
    for c in n_caps:
        captions.append([f"t{m + j}" for j in range(c)])
        m += c
    return img, txt, owner, captions


def _text_tok(texts):  # "t17" -> row 17 of the text table
    return torch.tensor([[int(t[1:])] for t in texts])


@pytest.mark.parametrize("ks", [(1, 5, 10), (1, 2, 3, 100)])
def test_retrieval_against_brute_force(ks):
    n_img = 40
    img, txt, owner, captions = _retrieval_data(n_img, 8, noise=1.5, seed=len(ks))
    model = FixedEmbed(img, txt).train()
    ids = torch.arange(n_img)
    S = (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T).tolist()
    want = _brute_force_recall(S, owner, ks)
    results = []
    for chunk in (1, 3, 16, 40, 1000):
        batches = [(_index_images(ids[s]), captions[s]) for s in _split(n_img, [9, 1, 17])]
        results.append(retrieval_eval(model, _text_tok, batches, ks=ks, chunk_size=chunk, text_batch_size=7))
    assert all(r == results[0] for r in results)  # chunking changes nothing
    got = results[0]
    assert set(got) == set(want) | {"n_images", "n_texts"}
    assert got["n_images"] == n_img and got["n_texts"] == len(owner)
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    # noisy enough that the metrics are neither trivial nor saturated
    assert 0 < got["i2t_r1"] < 1 and 0 < got["t2i_r1"] < 1 and got["t2i_r1"] <= got[f"t2i_r{ks[1]}"]
    if 100 in ks:
        assert got["i2t_r100"] == got["t2i_r100"] == 1.0  # k beyond the gallery
    assert model.modes and not any(model.modes) and model.training


def test_retrieval_any_caption_counts_for_i2t():
    # Image 0 has two captions: one far away, one identical to it. Only ANY-caption semantics gives a hit.
    img = torch.eye(3)
    txt = torch.stack([-torch.eye(3)[0], torch.eye(3)[0], torch.eye(3)[1], torch.eye(3)[2]])
    batches = [(_index_images([0, 1, 2]), [["t0", "t1"], ["t2"], "t3"])]  # a bare string = one caption
    got = retrieval_eval(FixedEmbed(img, txt), _text_tok, batches, ks=(1,))
    assert got == {"i2t_r1": 1.0, "t2i_r1": 0.75, "n_images": 3, "n_texts": 4}
    with pytest.raises(ValueError, match="image 1"):
        retrieval_eval(FixedEmbed(img, txt), _text_tok, [(_index_images([0, 1]), [["t0"], []])])


def test_retrieval_real_model_runs():
    torch.manual_seed(0)
    model = mm.create_model("tiny-clip")
    size = model.config.vision.image_size
    images = torch.randn(6, 3, size, size)
    caps = [[f"a photo of thing {i}", f"thing number {i}"] for i in range(6)]
    got = retrieval_eval(model, mm.get_tokenizer(model), [(images[:4], caps[:4]), (images[4:], caps[4:])],
                         chunk_size=4)
    assert got["n_images"] == 6 and got["n_texts"] == 12 and got["t2i_r10"] == 1.0  # 10 > 6 images
    with torch.no_grad():  # the same model embedding everything in one call, scored by brute force
        img = model.eval().encode_image(images, normalize=True)
        txt = model.encode_text(mm.get_tokenizer(model)([c for cs in caps for c in cs]), normalize=True)
    want = _brute_force_recall((img @ txt.T).tolist(), [i for i in range(6) for _ in range(2)], (1, 5, 10))
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


# ---------------------------------------------------------------- load_names

def test_load_names(tmp_path):
    assert load_names(["a", "b"], "classnames") == ["a", "b"]
    txt = tmp_path / "c.txt"
    txt.write_text("cat\n\n  dog \r\ngolden retriever\n\n")
    assert load_names(txt, "classnames") == ["cat", "dog", "golden retriever"]
    assert load_names(str(txt), "classnames") == ["cat", "dog", "golden retriever"]
    (tmp_path / "l.json").write_text(json.dumps(["x", "y"]))
    assert load_names(tmp_path / "l.json", "classnames") == ["x", "y"]
    (tmp_path / "d.json").write_text(json.dumps({"classes": ["p", "q"], "templates": ["a {}."]}))
    assert load_names(tmp_path / "d.json", "classnames") == ["p", "q"]
    assert load_names(tmp_path / "d.json", "templates") == ["a {}."]
    fn = lambda c: c  # noqa: E731
    assert load_names(["{} x", fn], "templates") == ["{} x", fn]


def test_load_names_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt") as e:
        load_names(missing, "classnames")
    assert "classnames" in str(e.value)
    (tmp_path / "d.json").write_text(json.dumps({"classes": ["p"]}))
    with pytest.raises(ValueError, match=r"templates.*d\.json.*'templates'"):
        load_names(tmp_path / "d.json", "templates")
    with pytest.raises(ValueError, match=r"templates: item 1 .*no '\{\}'"):
        load_names(["a {}", "a photo"], "templates")
    with pytest.raises(ValueError, match="classnames.*empty"):
        load_names([], "classnames")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="bad.json"):
        load_names(tmp_path / "bad.json", "classnames")


def test_default_templates_are_openai():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    model = FixedEmbed(torch.randn(5, 4))
    seen: list[str] = []

    def tok(texts):
        seen.extend(texts)
        return torch.zeros(len(texts), 1, dtype=torch.long)

    zero_shot_classifier(model, tok, ["cat"])
    assert seen == [t("cat") for t in OPENAI_IMAGENET_TEMPLATES] and len(seen) == 80
