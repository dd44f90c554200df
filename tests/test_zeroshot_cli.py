"""`mm zeroshot` and `mm eval`: what they print and write equals the mm.eval APIs (and plain encode_image @
classifier) computed here on the same images; unreadable images are skipped and named; bad inputs stop
with a message naming the problem before the model is loaded.

The model is a random tiny-clip, which gets colours wrong as often as right. So that accuracies are not a
trivial 0 (which a miscounting command would match), every image is labelled with its 1st, 5th or 7th
most probable class under the model itself: top-1 is exactly 1/3 and top-5 2/3, whatever the weights.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, colour_image, jpeg_bytes, png_bytes, write_tar
from PIL import Image

import mm
from mm.cli import main
from mm.eval import retrieval_eval, zero_shot_classifier, zero_shot_eval

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["a {} square", "a photo of something {}"]
CLASSES = ["red", "green", "blue", "light-yellow", "purple", "orange", "black", "white", "grey"]
# each class's folder name: case and _ differ from the class name, and must still match it
FOLDER = {"red": "Red", "green": "GREEN", "blue": "blue", "light-yellow": "Light_Yellow", "purple": "PURPLE",
          "orange": "Orange", "black": "black", "white": "White", "grey": "grey"}
RANKS = (0, 4, 6)  # image j gets the class ranked RANKS[j % 3] (0 = most probable)
BROKEN = Path("Light_Yellow", "broken.jpg")




def probabilities(model, images: list[Image.Image], classes: list[str], templates) -> torch.Tensor:
    """softmax(100 * encode_image @ zero_shot_classifier): the reference every output is compared with."""
    W = zero_shot_classifier(model, mm.get_tokenizer(model), classes, templates)
    x = torch.stack([mm.image_transform(model)(im) for im in images])
    with torch.no_grad():
        return (100 * model.encode_image(x, normalize=True) @ W).softmax(-1)


def ranked_labels(model, images: list[Image.Image]) -> list[int]:
    order = probabilities(model, images, CLASSES, TEMPLATES).argsort(dim=-1, descending=True)
    return [order[j, RANKS[j % 3]].item() for j in range(len(images))]


def reference(probs: torch.Tensor, labels: list[int], k: int) -> dict:
    top = probs.topk(min(k, probs.shape[1]))
    top5 = probs.topk(min(5, probs.shape[1])).indices
    y = torch.tensor(labels)
    hit1, n = top5[:, 0] == y, len(labels)
    return {"top": [list(zip(i, p)) for i, p in zip(top.indices.tolist(), top.values.tolist())],
            "top1": hit1.sum().item() / n, "top5": (top5 == y[:, None]).any(1).sum().item() / n,
            "per_class": {c: ((y == c).sum().item(), hit1[y == c].sum().item() / (y == c).sum().item())
                          for c in set(labels)}}


def images_of(samples: list[tuple[str, dict[str, bytes]]]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(m.get("jpg", m.get("png")))).convert("RGB") for _, m in samples]


@pytest.fixture(scope="module")
def photos(model, tmp_path_factory) -> Path:
    """12 colour squares filed into class sub-folders by ranked_labels, plus an unreadable file in Light_Yellow/
    (so that folder exists whatever the ranking)."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    images = [colour_image(c, size=40, seed=10 * i + j) for i, c in enumerate(COLOURS) for j in range(3)]
    for j, (im, label) in enumerate(zip(images, ranked_labels(model, images))):
        (root / FOLDER[CLASSES[label]]).mkdir(parents=True, exist_ok=True)
        im.save(root / FOLDER[CLASSES[label]] / f"{j:02d}.png")
    (root / "Light_Yellow").mkdir(exist_ok=True)
    (root / "Light_Yellow" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def ranked_shards(model, tmp_path_factory) -> tuple[Path, list[tuple[str, dict[str, bytes]]]]:
    """2 shards, 21 samples labelled by ranked_labels (one more with an undecodable image), and info.json."""
    d = tmp_path_factory.mktemp("ranked")
    samples = [(f"z{i:03d}", {"png": png_bytes(colour_image(COLOURS[i % 4], seed=200 + i))}) for i in range(21)]
    for (_, m), label in zip(samples, ranked_labels(model, images_of(samples))):
        m["cls"] = str(label).encode()
    write_tar(d / "zs-0.tar", samples[:11] + [("z999", {"jpg": b"garbage", "cls": b"0"})])
    write_tar(d / "zs-1.tar", samples[11:])
    (d / "info.json").write_text(json.dumps({"classes": CLASSES, "templates": TEMPLATES}))
    return d, samples


def folder_reference(model, root: Path, classes: list[str], label_of_folder: dict[str, int], templates, k: int):
    """{path: top-k} and accuracies for the images under root, in the command's order (sorted paths)."""
    paths = sorted(root.rglob("*.png"))
    probs = probabilities(model, [Image.open(p).convert("RGB") for p in paths], classes, templates)
    ref = reference(probs, [label_of_folder[p.parent.name] for p in paths], k)
    return {str(p): top for p, top in zip(paths, ref["top"])}, ref


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mm.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_folder_cli_accuracy_csv_and_skipped_image(model_dir, model, photos, tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    out = tmp_path / "preds.csv"
    proc = run_cli("zeroshot", "--model", str(model_dir), "--classes", ",".join(CLASSES), "--templates",
                   str(tmp_path / "t.txt"), "-k", "3", "--workers", "0", "--batch-size", "5", "--out", str(out),
                   str(photos))
    assert proc.returncode == 0, proc.stderr
    by_path, ref = folder_reference(model, photos, CLASSES, {FOLDER[c]: i for i, c in enumerate(CLASSES)},
                                    TEMPLATES, 3)
    assert (ref["top1"], ref["top5"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))  # by construction

    # (1) printed accuracy and per-class table equal the reference
    lines = proc.stdout.splitlines()
    assert lines[0] == "top-1 33.33%  top-5 66.67%  (12 labelled images)"
    rows = {line.rsplit(None, 2)[0]: line.split()[-2:] for line in lines[2:]}
    assert rows == {CLASSES[c]: [str(n), f"{100 * acc:.2f}%"] for c, (n, acc) in ref["per_class"].items()}

    # (2) CSV rows: top-3 classes and probabilities of every readable image
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["image"] for r in table] == list(by_path)
    for r in table:
        assert r["label"] == next(c for c in CLASSES if FOLDER[c] == Path(r["image"]).parent.name)
        expected = by_path[r["image"]]
        assert [r[f"class_{i}"] for i in (1, 2, 3)] == [CLASSES[c] for c, _ in expected]
        assert [float(r[f"prob_{i}"]) for i in (1, 2, 3)] == pytest.approx([p for _, p in expected], abs=1e-5)

    # (3) the broken file is named and counted, not fatal
    assert f"skipped {photos / BROKEN}: undecodable image" in proc.stderr
    assert "1 skipped, named above" in proc.stderr


def test_folder_classes_from_subfolders_json(model_dir, model, photos, tmp_path, capsys):
    """No --classes: the sub-folder names are the classes (``_`` read as a space), OpenAI's templates;
    two loader processes."""
    out = tmp_path / "preds.json"
    assert main(["zeroshot", "--model", str(model_dir), "-k", "2", "--workers", "2", "--out", str(out),
                 str(photos)]) == 0
    got = json.loads(out.read_text())
    folders = sorted(d.name for d in photos.iterdir() if d.is_dir())
    classes = [f.replace("_", " ") for f in folders]
    assert got["classes"] == classes and "Light Yellow" in classes
    by_path, ref = folder_reference(model, photos, classes, {f: i for i, f in enumerate(folders)}, None, 2)
    assert [p["image"] for p in got["predictions"]] == list(by_path)
    for p in got["predictions"]:
        assert p["label"] == Path(p["image"]).parent.name.replace("_", " ")
        assert [t["class"] for t in p["top"]] == [classes[c] for c, _ in by_path[p["image"]]]
        assert [t["prob"] for t in p["top"]] == pytest.approx([q for _, q in by_path[p["image"]]], abs=1e-5)
    assert got["accuracy"]["zeroshot_top1"] == pytest.approx(ref["top1"], abs=1e-12)
    assert got["accuracy"]["zeroshot_top5"] == pytest.approx(ref["top5"], abs=1e-12)
    assert {c: (r["n"], r["top1"]) for c, r in got["accuracy"]["per_class"].items()} == \
        {classes[c]: pytest.approx(v) for c, v in ref["per_class"].items()}
    assert len(got["skipped"]) == 1 and got["skipped"][0].startswith(f"{photos / BROKEN}: undecodable image")
    assert f"skipped {photos / BROKEN}" in capsys.readouterr().err


def test_shards_with_labels(model_dir, model, ranked_shards, capsys):
    """Classes and templates from info.json; the corrupt sample is skipped and named; per-image lines and
    accuracy equal the reference."""
    d, samples = ranked_shards
    assert main(["zeroshot", "--model", str(model_dir), "--workers", "0", "--batch-size", "4", "-k", "2",
                 str(d / "zs-{0..1}.tar")]) == 0
    out = capsys.readouterr()
    ref = reference(probabilities(model, images_of(samples), CLASSES, TEMPLATES),
                    [int(m["cls"]) for _, m in samples], 2)
    lines = out.out.splitlines()
    assert len(lines) == len(samples) + 2 + len(ref["per_class"])
    for (key, _), line, top in zip(samples, lines, ref["top"]):
        fields = line.split("\t")
        assert fields[0] == key
        assert [f.rsplit(" ", 1)[0] for f in fields[1:]] == [CLASSES[c] for c, _ in top]
        assert [float(f.rsplit(" ", 1)[1]) for f in fields[1:]] == pytest.approx([p for _, p in top], abs=6e-5)
    assert lines[len(samples)] == "top-1 33.33%  top-5 66.67%  (21 labelled images)"
    assert f"skipped {d / 'zs-0.tar'}:z999: undecodable image" in out.err


def test_eval_json_equals_api(model_dir, model, ranked_shards, tmp_path, capsys):
    d, zs = ranked_shards
    # retrieval shards: two captions per image in json, as Flickr-style sets have
    rs = [(f"r{i:03d}", {"jpg": jpeg_bytes(colour_image(c, seed=100 + i)),
                         "json": json.dumps({"captions": [f"a {c} square", f"noise number {i}"]}).encode()})
          for i, c in enumerate(COLOURS * 3)]
    write_tar(tmp_path / "ret-0.tar", rs)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--zeroshot", str(d / "zs-{0..1}.tar"), "--retrieval",
                 str(tmp_path / "ret-0.tar"), "--workers", "0", "--batch-size", "5", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed

    tok = mm.get_tokenizer(model)
    x = torch.stack([mm.image_transform(model)(im) for im in images_of(zs)])
    W = zero_shot_classifier(model, tok, CLASSES, TEMPLATES)
    expected = zero_shot_eval(model, W, [(x, torch.tensor([int(m["cls"]) for _, m in zs]))])
    xr = torch.stack([mm.image_transform(model)(im) for im in images_of(rs)])
    expected.update(retrieval_eval(model, tok, [(xr, [json.loads(m["json"])["captions"] for _, m in rs])]))
    keys = ["zeroshot_top1", "zeroshot_top5"] + [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert {k: printed[k] for k in keys} == pytest.approx({k: expected[k] for k in keys}, abs=1e-12)
    assert (printed["zeroshot_n"], printed["zeroshot_top1"]) == (21, pytest.approx(1 / 3))
    assert 0 < printed["t2i_r5"] < 1  # recall too is more than a formality


def test_unlabelled_shards_and_files(model_dir, ranked_shards, photos, capsys):
    """--label-key none and loose image files: predictions only, no accuracy."""
    d, samples = ranked_shards
    assert main(["zeroshot", "--model", str(model_dir), "--workers", "0", "--label-key", "none",
                 str(d / "zs-1.tar")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [key for key, _ in samples[11:]]
    image = next(photos.rglob("*.png"))
    assert main(["zeroshot", "--model", str(model_dir), "--workers", "0", "--classes", "red,blue", "-k", "1",
                 str(image)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{image}\t") and line.split("\t")[1].split()[0] in ("red", "blue")


@pytest.mark.parametrize("argv,message", [
    (["zeroshot", "--classes", "a,b", "{tmp}/nope"], "no such image file or folder: {tmp}/nope"),
    (["zeroshot", "--classes", "red,green", "{tmp}/pets"], "folder {tmp}/pets/cat: 'cat' is not one of the classes"),
    (["zeroshot", "{tmp}/pets/cat"], "no class names: give --classes, or a folder"),
    (["zeroshot", "{shards}/train-0000.tar"], "shards: no class names: give --classes, or put"),
    (["zeroshot", "--classes", "{tmp}/classes.txt", "{tmp}/pets"], "--classes '{tmp}/classes.txt': no such file"),
    (["zeroshot", "--templates", "a photo", "{tmp}/pets"], "--templates 'a photo': no such file"),
    (["zeroshot", "{tmp}/pets", "{shards}/train-0000.tar"], "not both"),
    (["zeroshot", "--out", "{tmp}/p.txt", "{tmp}/pets"], "--out {tmp}/p.txt: must end in .csv or .json"),
    (["zeroshot", "-k", "0", "{tmp}/pets"], "-k must be >= 1"),
    (["eval"], "nothing to evaluate"),
    (["eval", "--zeroshot", "{tmp}/x-{{0..1}}.tar"], "--zeroshot: shard '{tmp}/x-0.tar' not found"),
    (["eval", "--zeroshot", "{shards}/test-0000.tar"], "--zeroshot: no class names: give --classes"),
    (["eval", "--retrieval", "{shards}/test-0000.tar", "--max-samples", "0"], "--max-samples must be >= 1"),
])
def test_bad_inputs_fail_before_loading_the_model(argv, message, colour_shards, tmp_path, capsys):
    for name in ("red", "cat"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        colour_image("red").save(tmp_path / "pets" / name / "0.png")
    (colour_shards / "info.json").unlink()
    fill = {"tmp": tmp_path, "shards": colour_shards}
    # the model does not exist either: each input error must be found first
    code = main([argv[0], "--model", str(tmp_path / "no_model"), *[a.format(**fill) for a in argv[1:]]])
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert out.err.startswith("error: ") and message.format(**fill) in out.err


def test_model_and_label_errors(model_dir, colour_shards, tmp_path, capsys):
    assert main(["zeroshot", "--model", str(tmp_path / "no_model"), "--classes", "a,b",
                 str(colour_shards / "test-0000.tar")]) == 2
    assert f"unknown model '{tmp_path / 'no_model'}'" in capsys.readouterr().err
    # labels 0..3 in the shards but only two classes: an error naming a sample, not a wrong accuracy
    assert main(["zeroshot", "--model", str(model_dir), "--workers", "0", "--classes", "red,green",
                 str(colour_shards / "test-0000.tar")]) == 2
    assert "s01002: label 2 is not a class index (there are 2 classes)" in capsys.readouterr().err
