"""`mm benchmark` (mm/eval/benchmark.py, mm/cli/benchmark.py): clip_benchmark's metrics on tiny datasets in its
webdataset layout, built here, equal a reference computed here from the model's own embeddings (dense similarity,
argmax / top-k, per-class recall); clip_benchmark's result files; resuming a suite; bad inputs.

The model is a random tiny-clip. So that accuracies are neither 0 nor 1 (which a miscounting command could match),
each image is labelled with the class ranked 1st, 2nd, 4th or 7th for it by the model itself.

The last test (marker ``benchmark_peer``, not in the default run) runs clip_benchmark 1.6.2 itself on the same
data and model and compares every metric.
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import png_bytes, write_wds
from PIL import Image

import mm
from mm.cli import main
from mm.eval.benchmark import ModelRef

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
TEMPLATES = ["a photo of a {c}.", "a {c} square"]
RANKS = (0, 1, 3, 6)


def random_images(n: int, seed: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, 3)
        arr = np.clip(base[None, None] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@torch.no_grad()
def image_emb(model, images: list[bytes]) -> torch.Tensor:
    """Unit image embeddings of encoded images, decoded with PIL and preprocessed by the model's eval transform."""
    tf = mm.image_transform(model)
    x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    return F.normalize(model.encode_image(x), dim=-1)


@torch.no_grad()
def text_emb(model, texts: list[str]) -> torch.Tensor:
    return F.normalize(model.encode_text(mm.get_tokenizer(model)(texts)), dim=-1)


def class_logits(model, images: list[bytes], classes: list[str], templates: list[str]) -> torch.Tensor:
    """CLIP's classifier written out: per class the renormalised mean of its unit template embeddings."""
    W = torch.stack([F.normalize(text_emb(model, [t.format(c=c) for t in templates]).mean(0), dim=0)
                     for c in classes], dim=1)
    return 100 * image_emb(model, images) @ W


def reference_classification(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    order = logits.argsort(dim=1, descending=True)
    rank = (order == labels[:, None]).float().argmax(dim=1)  # position of the true class
    recalls = [(rank[labels == c] == 0).double().mean().item() for c in labels.unique()]
    return {"acc1": (rank == 0).double().mean().item(),
            "acc5": (rank < 5).double().mean().item() if logits.shape[1] >= 5 else math.nan,
            "mean_per_class_recall": sum(recalls) / len(recalls)}


def reference_retrieval(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    sim = txt @ img.T  # (texts, images)
    out = {}
    for k in (1, 5, 10):
        t2i = (sim.argsort(dim=1, descending=True)[:, :k] == owner[:, None]).any(dim=1)
        top_texts = sim.T.argsort(dim=1, descending=True)[:, :k]  # (images, k) text indices
        i2t = (owner[top_texts] == torch.arange(img.shape[0])[:, None]).any(dim=1)
        out[f"image_retrieval_recall@{k}"] = t2i.double().mean().item()
        out[f"text_retrieval_recall@{k}"] = i2t.double().mean().item()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, model):
    """Under one root: cifar (8 classes, png + jpg), cifar3 (3 classes: acc5 is NaN), flickr (3 captions or 2 per
    image), each labelled by the model's own ranks; and the reference metrics of each."""
    root = tmp_path_factory.mktemp("wds")
    ref = {}
    for name, classes, n, seed in (("cifar", CLASSES, 28, 1), ("cifar3", CLASSES[:3], 12, 2)):
        imgs = random_images(n, seed)
        enc = [png_bytes(im) if i % 2 else jpeg(im) for i, im in enumerate(imgs)]
        logits = class_logits(model, enc, classes, TEMPLATES)
        order = logits.argsort(dim=1, descending=True)
        labels = torch.stack([order[i, RANKS[i % len(RANKS)] % len(classes)] for i in range(n)])
        samples = [{"png" if i % 2 else "jpg": b, "cls": str(int(y)).encode()} for i, (b, y) in enumerate(zip(enc, labels))]
        write_wds(root / name, samples, classes=classes, templates=TEMPLATES)
        ref[name] = reference_classification(logits, labels)
    imgs = [png_bytes(im) for im in random_images(14, 3)]
    caps = [[f"a picture number {i}", f"colour noise {i + 100}", f"{i} squares"][: 2 + i % 2] for i in range(14)]
    write_wds(root / "flickr", [{"png": b, "txt": "\n".join(c).encode()}
                                for b, c in zip(imgs, caps)], shards=3, dataset_type="retrieval")
    owner = torch.tensor([i for i, c in enumerate(caps) for _ in c])
    ref["flickr"] = reference_retrieval(image_emb(model, imgs), text_emb(model, [t for c in caps for t in c]), owner)
    return root, ref


def bench(*args: str) -> int:
    return main(["benchmark", "--workers", "0", *args])


def read_result(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def slug(p: Path) -> str:
    return str(p).replace("/", "_")


def test_classification_and_retrieval_equal_reference(data, model_dir, tmp_path, capsys):
    root, ref = data
    out = tmp_path / "out"
    assert bench("--model", str(model_dir), "--dataset", "wds/cifar", "wds/cifar3", "wds/flickr",
                 "--dataset-root", str(root), "--output", str(out), "--batch-size", "5") == 0
    for name, task in (("cifar", "zeroshot_classification"), ("cifar3", "zeroshot_classification"),
                       ("flickr", "zeroshot_retrieval")):
        fname = f"{name}__{slug(model_dir)}_en_{task}.json"  # clip_benchmark's {dataset}_{pretrained}_{model}_..
        r = read_result(out, fname)
        assert set(r) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert (r["dataset"], r["model"], r["pretrained"], r["task"], r["language"]) == \
            (f"wds/{name}", str(model_dir), "", task, "en")
        assert set(r["metrics"]) == set(ref[name])
        for k, v in ref[name].items():
            if math.isnan(v):
                assert math.isnan(r["metrics"][k]), k
            else:
                assert r["metrics"][k] == pytest.approx(v, abs=1e-9), (name, k)
    assert 0 < ref["cifar"]["acc1"] < ref["cifar"]["acc5"] < 1  # the data make the comparison non-trivial
    assert 0 < ref["flickr"]["image_retrieval_recall@1"] < 1
    # the summary: one row per result, then the model's average of acc1 / mean recall@1
    import csv

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["dataset"], r["task"]) for r in rows] == [("wds/cifar", "zeroshot_classification"),
                                                         ("wds/cifar3", "zeroshot_classification"),
                                                         ("wds/flickr", "zeroshot_retrieval"),
                                                         ("average", "mean of 3")]
    mains = [ref["cifar"]["acc1"], ref["cifar3"]["acc1"],
             (ref["flickr"]["image_retrieval_recall@1"] + ref["flickr"]["text_retrieval_recall@1"]) / 2]
    assert [float(r["main_metric"]) for r in rows] == pytest.approx(mains + [sum(mains) / 3])
    md = (out / "results.md").read_text().splitlines()
    assert len(md) == 2 + len(rows) and md[-1].startswith(f"| {model_dir} |  | average |")


@pytest.fixture
def http_root(data):
    """The data's root served over HTTP on a loopback port (a real server in a thread), as a remote
    ``--dataset_root`` of clip_benchmark's serves its datasets."""
    import functools
    import http.server
    import threading

    root, _ = data
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the test reads the command's stderr
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_datasets_by_url_equal_the_local_ones(data, http_root, model_dir, tmp_path, capsys):
    """A dataset by URL (``--dataset URL``, or a ``--dataset-root`` URL / URL template) streams its shards and reads
    its class names, templates and type over HTTP: the same metrics as from the local directory."""
    root, ref = data
    out = tmp_path / "out"
    assert bench("--model", str(model_dir), "--dataset", f"{http_root}/cifar", "--output", str(out)) == 0
    assert bench("--model", str(model_dir), "--dataset", "wds/flickr", "--dataset-root", http_root + "/",
                 "--output", str(out)) == 0
    assert bench("--model", str(model_dir), "--dataset", "wds/cifar3", "--dataset-root", http_root + "/{dataset}",
                 "--output", str(out)) == 0
    for name, task in (("cifar", "zeroshot_classification"), ("cifar3", "zeroshot_classification"),
                       ("flickr", "zeroshot_retrieval")):
        r = read_result(out, f"{name}__{slug(model_dir)}_en_{task}.json")
        assert r["dataset"] == f"wds/{name}" and r["task"] == task
        assert r["metrics"] == pytest.approx(ref[name], abs=1e-9, nan_ok=True), name
    capsys.readouterr()
    assert bench("--model", str(model_dir), "--dataset", f"{http_root}/nowhere", "--output", str(out)) == 2
    assert capsys.readouterr().err.strip() == f"error: {http_root}/nowhere/test/nshards.txt: not found (a dataset " \
                                              "read by URL needs its split's shard count)"


def test_progress_counts_the_samples_and_estimates_the_time_left(data, tmp_path):
    """The encoding's progress knows the split's size (local shards: their tar headers; an image folder: its
    files), so it says how long is left."""
    from mm.eval.benchmark import resolve_dataset, sample_count
    from mm.utils.progress import Progress

    root, _ = data
    assert sample_count(resolve_dataset("wds/cifar", str(root)), "test") == 28
    assert sample_count(resolve_dataset("wds/flickr", str(root)), "test") == 14
    assert sample_count(resolve_dataset("wds/flickr", str(root)), "test", slice(1, None, 2)) == 5  # shard 1 of 5, 5, 4
    folder = tmp_path / "folder"
    for c, n in (("red", 3), ("green", 2)):
        (folder / c).mkdir(parents=True)
        for i in range(n):
            random_images(1, i)[0].save(folder / c / f"{i}.png")
    assert sample_count(resolve_dataset(str(folder)), "test") == 5
    p = Progress(28, "image", enabled=False)
    p.update(7)
    p.t0 -= 2.0  # 7 images in 2 s: 21 left at 3.5/s
    assert p.line(p.t0 + 2.0) == "7 of 28 images, 3.5 images/s, about 6 s left"


def test_an_adapter_gets_the_results_of_its_merged_model(data, model_dir, tmp_path, capsys):
    """`--adapter`: the base with a LoRA adapter applied (not merged) scores exactly what `mm merge`'s model
    directory scores, and not what the base alone scores (the adapter is really applied)."""
    from mm.hub import base_sha256, save_adapter
    from mm.layers.config import LoraConfig
    from mm.layers.lora import add_lora, is_lora_param

    root, ref = data
    base = mm.load_pretrained(model_dir).eval()
    lora = LoraConfig(rank=4, targets=["*.attn", "*.mlp"])
    add_lora(base, lora)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if is_lora_param(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapter = save_adapter(base, tmp_path / "adapter", lora, base=str(model_dir), base_hash=base_sha256(base))
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(merged)]) == 0
    metrics = {}
    for name, spec in (("adapter", ["--model", str(model_dir), "--adapter", str(adapter)]),
                       ("merged", ["--model", str(merged)])):
        out = tmp_path / f"out_{name}"
        assert bench(*spec, "--dataset", "wds/cifar", "wds/flickr", "--dataset-root", str(root),
                     "--output", str(out)) == 0
        files = sorted(out.glob("*.json"))
        assert len(files) == 2
        records = [json.loads(f.read_text()) for f in files]
        metrics[name] = [r["metrics"] for r in records]
        if name == "adapter":  # recorded (and so named) as base + adapter: never taken for the base's results
            assert {r["model"] for r in records} == {f"{model_dir}+{adapter}"}
    for a, m in zip(metrics["adapter"], metrics["merged"]):
        assert a == pytest.approx(m, abs=1e-9)
    assert metrics["adapter"][0] != pytest.approx(ref["cifar"], abs=1e-9)  # the base's own scores differ


def test_image_folder_equals_its_shards(data, model_dir, tmp_path, capsys):
    """The same images as class folders (torchvision ImageFolder: sorted folders = class indices) give the shards'
    metrics."""
    root, ref = data
    folder = tmp_path / "cifar_folder"
    import tarfile

    for shard in sorted((root / "cifar" / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, b in members.items():
            key, ext = name.split(".")
            if ext in ("png", "jpg"):
                label = int(members[f"{key}.cls"])
                d = folder / "test" / f"{label:02d}_{CLASSES[label]}"
                d.mkdir(parents=True, exist_ok=True)
                (d / name).write_bytes(b)
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES))
    (folder / "classnames.txt").write_text("\n".join(CLASSES))
    out = tmp_path / "out"
    missing = [i for i in range(len(CLASSES)) if not (folder / "test" / f"{i:02d}_{CLASSES[i]}").is_dir()]
    if missing:  # a class without images still needs its folder, or the indices of the later ones would shift
        assert bench("--model", str(model_dir), "--dataset", str(folder), "--output", str(out)) == 2
        assert f"classnames.txt lists 8 classes but there are {8 - len(missing)} class folders" in \
            capsys.readouterr().err
        for i in missing:
            (folder / "test" / f"{i:02d}_{CLASSES[i]}").mkdir()
    assert bench("--model", str(model_dir), "--dataset", str(folder), "--output", str(out)) == 0
    r = read_result(out, f"cifar_folder__{slug(model_dir)}_en_zeroshot_classification.json")
    assert r["dataset"] == "cifar_folder" and r["metrics"] == pytest.approx(ref["cifar"], abs=1e-9)


def test_suite_resumes_and_a_failing_entry_does_not_stop_the_others(data, model_dir, tmp_path, capsys):
    root, ref = data
    bad = write_wds(tmp_path / "wds" / "nolabels", [{"png": png_bytes(random_images(1, 9)[0]), "cls": b"0"}],
                    shards=1, templates=TEMPLATES)  # no classnames.txt
    suite = tmp_path / "suite.yaml"
    mismatch = write_wds(tmp_path / "wds" / "mismatch", [{"png": png_bytes(random_images(1, 9)[0]), "cls": b"5"}],
                         shards=1, classes=["red", "green"])  # label 5 of 2 classes
    suite.write_text(f"dataset_root: {root}\nmodels: [{model_dir}]\n"
                     f"datasets:\n  - {bad}\n  - wds/cifar3\n  - {{dataset: wds/flickr, tasks: [zeroshot_retrieval]}}\n"
                     f"  - {{dataset: wds/cifar3, tasks: [linear_regression]}}\n  - {mismatch}\n")
    out = tmp_path / "out"
    assert main(["benchmark", "--suite", str(suite), "--output", str(out), "--workers", "0"]) == 2
    got = capsys.readouterr()
    assert f"{bad}: no classnames.txt" in got.out and "3 of 5 entries failed" in got.err
    assert "wds/cifar3 linear_regression" in got.out and "error: unknown task 'linear_regression'" in got.out
    assert f"{mismatch}: sample s0000 has label 5, but classnames.txt lists 2 classes" in got.out
    files = {p.name: p for p in out.glob("*.json")}
    assert len(files) == 2
    c3 = files[f"cifar3__{slug(model_dir)}_en_zeroshot_classification.json"]
    assert json.loads(c3.read_text())["metrics"] == pytest.approx(ref["cifar3"], nan_ok=True)
    fl = files[f"flickr__{slug(model_dir)}_en_zeroshot_retrieval.json"]
    kept = fl.stat().st_mtime_ns
    c3.unlink()
    (bad / "classnames.txt").write_text("red\n")  # fixed: the entry now runs
    time.sleep(0.01)
    suite.write_text("\n".join(suite.read_text().splitlines()[:-2]) + "\n")  # the two bad entries dropped
    assert main(["benchmark", "--suite", str(suite), "--output", str(out), "--workers", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[-1].strip() for line in lines if "skipped, result exists" in line] == [str(fl)]
    assert sum("main metric" in line for line in lines) == 2  # nolabels and cifar3 computed, flickr skipped
    assert fl.stat().st_mtime_ns == kept and c3.is_file()
    assert json.loads(c3.read_text())["metrics"] == pytest.approx(ref["cifar3"], nan_ok=True)
    assert sum(1 for r in (out / "results.csv").read_text().splitlines()) == 1 + 3 + 1


def test_bad_inputs(data, model_dir, tmp_path, capsys):
    root, _ = data
    d = tmp_path / "wds"

    def run(*args: str) -> str:
        assert bench("--model", str(model_dir), "--output", str(tmp_path / "out"), *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]

    img = png_bytes(random_images(1, 5)[0])
    no_names = write_wds(d / "no_names", [{"png": img, "cls": b"0"}], shards=1)
    assert run("--dataset", str(no_names)) == f"error: {no_names}: no classnames.txt (one class name per line, " \
                                              "line i = class i), which classification needs"
    too_few = write_wds(d / "too_few", [{"png": img, "cls": b"0"}, {"png": img, "cls": b"3"}], shards=1,
                        classes=["red", "green"])
    msg = run("--dataset", str(too_few))
    assert str(too_few) in msg and "label 3" in msg and "lists 2 classes" in msg
    corrupt = write_wds(d / "corrupt", [{"png": img, "cls": b"0"}] * 4, shards=2, classes=["red"])
    data_bytes = (corrupt / "test" / "1.tar").read_bytes()
    (corrupt / "test" / "1.tar").write_bytes(data_bytes[: len(data_bytes) // 3] + b"\x07" * 700)
    msg = run("--dataset", str(corrupt))
    assert str(corrupt / "test" / "1.tar") in msg and "cut off or unreadable" in msg
    missing = write_wds(d / "missing", [{"png": img, "cls": b"0"}], shards=1, classes=["red"])
    (missing / "test" / "nshards.txt").write_text("2")
    assert str(missing / "test" / "1.tar") in run("--dataset", str(missing))
    assert run("--dataset", "wds/cifar", "--dataset-root", str(root), "--task", "linear_regression") == \
        "error: unknown task 'linear_regression' (mm benchmark runs: zeroshot_classification, zeroshot_retrieval, " \
        "linear_probe, captioning, image_caption_selection)"
    assert run("--dataset", "wds/cifar", "--dataset-root", str(root), "--task", "linear_probe") == \
        f"error: {root / 'cifar'}: split 'train' has no shards (train/*.tar)"
    assert run("--dataset", "wds/flickr", "--dataset-root", str(root), "--task", "captioning") == \
        f"error: model {model_dir} has no captioning decoder: the captioning task needs a CoCa model"
    assert "wds/nothere" in run("--dataset", "wds/nothere", "--dataset-root", str(root))
    assert run("--dataset", "wds/cifar") == "error: dataset 'wds/cifar': no such directory, and no dataset root to " \
                                            "find it under"
    assert run("--suite", str(tmp_path / "nowhere.yaml")) == f"error: --suite {tmp_path / 'nowhere.yaml'}: no such file"
    assert ModelRef("m", "w.pt", "a/").label == "m (pretrained w.pt, adapter a/)"  # a suite's keys, not options
    assert not list((tmp_path / "out").glob("*.json"))


def test_linear_probe_equals_the_probe_on_the_models_features(model, model_dir, tmp_path, capsys):
    """linear_probe: the train / val / test splits are encoded by the model (each image's unit features) and
    given to clip_benchmark's probe procedure (mm.eval.benchmark_probe, compared with clip_benchmark itself and
    scikit-learn in tests/test_benchmark_probe.py): the result file holds exactly what the procedure gives on the
    features computed here; without a validation split the weight decay is 0, as clip_benchmark's."""
    from mm.eval.benchmark_probe import linear_probe

    root = tmp_path / "wds"
    splits = {}
    for split, n, seed in (("train", 60, 41), ("val", 20, 42), ("test", 24, 43)):
        enc = [png_bytes(im) for im in random_images(n, seed)]
        logits = class_logits(model, enc, CLASSES, TEMPLATES)
        labels = logits.argsort(dim=1, descending=True)[:, 0]  # learnable: a function of the features
        labels[::5] = torch.arange(len(labels[::5])) % len(CLASSES)  # and some noise
        write_wds(root / "lp", [{"png": b, "cls": str(int(y)).encode()} for b, y in zip(enc, labels)],
                  classes=CLASSES if split == "test" else None, templates=TEMPLATES if split == "test" else None,
                  split=split)
        splits[split] = (image_emb(model, enc), labels)
    out = tmp_path / "out"
    assert bench("--model", str(model_dir), "--dataset", "wds/lp", "--dataset-root", str(root), "--task",
                 "linear_probe", "--val-split", "val", "--fewshot-epochs", "3", "--batch-size", "16",
                 "--output", str(out)) == 0
    r = read_result(out, f"lp__{slug(model_dir)}_en_linear_probe.json")
    ref = linear_probe(*splits["train"], *splits["test"], *splits["val"], epochs=3, batch_size=16)
    assert set(r["metrics"]) == set(ref) and r["metrics"] == pytest.approx(ref, abs=1e-6, nan_ok=True)
    assert 0 < ref["lp_acc1"] < 1 and ref["weight_decay"] > 0
    assert bench("--model", str(model_dir), "--dataset", "wds/lp", "--dataset-root", str(root), "--task",
                 "linear_probe", "--fewshot-epochs", "3", "--batch-size", "16", "--output", str(out),
                 "--overwrite") == 0
    r = read_result(out, f"lp__{slug(model_dir)}_en_linear_probe.json")
    ref = linear_probe(*splits["train"], *splits["test"], epochs=3, batch_size=16)
    assert r["metrics"]["weight_decay"] == 0 and r["metrics"] == pytest.approx(ref, abs=1e-6, nan_ok=True)
    rows = (out / "results.csv").read_text().splitlines()
    assert float(rows[1].split(",")[4]) == pytest.approx(ref["lp_acc1"])  # the main metric


def test_two_processes_give_the_results_of_one(data, model_dir, tmp_path):
    """Under `accelerate launch` (two gloo ranks on the CPU) each process encodes every other shard and the features
    are gathered: the results equal one process's; an unreadable shard in one process's share fails that entry on
    both (no process waits for the other) and the other entries still run."""
    import socket

    root, ref = data
    bad = root.parent / "bad2"
    if not bad.exists():
        import shutil

        shutil.copytree(root / "cifar", bad)
        (bad / "test" / "1.tar").write_bytes((bad / "test" / "1.tar").read_bytes()[:700] + b"\x07" * 700)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "mm.cli", "benchmark", "--model", str(model_dir), "--dataset", "wds/cifar", "wds/flickr", str(bad),
           "--dataset-root", str(root), "--batch-size", "4", "--workers", "0", "--output", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "2 processes share the encoding" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert f"{bad / 'test' / '1.tar'}" in proc.stderr and "1 of 3 entries failed" in proc.stderr
    for name, task in (("cifar", "zeroshot_classification"), ("flickr", "zeroshot_retrieval")):
        r = read_result(out, f"{name}__{slug(model_dir)}_en_{task}.json")
        assert r["metrics"] == pytest.approx(ref[name], abs=1e-6), name
    assert len(list(out.glob("*.json"))) == 2


def test_image_caption_selection_equals_reference(model, model_dir, tmp_path, capsys):
    """SugarCrepe-style data (one image, its true caption first, then negatives): ``text_acc`` = ``acc`` = the share
    of images whose most similar caption is the first, here half by construction (the model's best caption first
    for even samples, its worst first for odd ones); ``image_acc`` is 1 (one image per sample), as clip_benchmark
    computes it; the task is chosen from the dataset's name, as clip_benchmark's --task auto."""
    imgs = [png_bytes(im) for im in random_images(10, 21)]
    pool = ["a red thing", "a dark blue square", "noise of many colours", "a bright green field", "yellow light"]
    sim = image_emb(model, imgs) @ text_emb(model, pool).T
    caps = []
    for i in range(len(imgs)):
        order = sim[i].argsort(descending=True).tolist()
        first = order[0] if i % 2 == 0 else order[-1]
        caps.append([pool[first]] + [pool[j] for j in order if j != first][:2])
    ref = sum((sim[i, pool.index(c[0])] >= sim[i, [pool.index(x) for x in c]].max()).item()
              for i, c in enumerate(caps)) / len(caps)
    assert ref == 0.5
    root = tmp_path / "wds"
    write_wds(root / "sugar_crepe_swap", [{"png": b, "txt": "\n".join(c).encode()} for b, c in zip(imgs, caps)],
              dataset_type="retrieval")
    out = tmp_path / "out"
    assert bench("--model", str(model_dir), "--dataset", "wds/sugar_crepe_swap", "--dataset-root", str(root),
                 "--output", str(out)) == 0
    r = read_result(out, f"sugar_crepe_swap__{slug(model_dir)}_en_image_caption_selection.json")
    assert r["task"] == "image_caption_selection" and r["metrics"] == {"image_acc": 1.0, "text_acc": ref, "acc": ref}


@pytest.fixture(scope="module")
def coca_dir(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    return mm.save_pretrained(mm.create_model("tiny-coca"), tmp_path_factory.mktemp("coca") / "coca")


def test_captioning_scores_the_generated_captions(coca_dir, tmp_path, capsys):
    """Captioning: a caption generated per image (greedy here) scored against the sample's captions with
    coco-caption's BLEU / ROUGE-L / CIDEr-D under clip_benchmark's (pycocoevalcap's) names. The references hold
    the image's own generated caption for some images, so the scores are neither 0 nor 1; the reference scores
    come from mm.generate on the images decoded here and the metric functions (whose arithmetic
    tests/test_caption_metrics.py checks against coco-caption's formulas)."""
    from mm.eval.caption_metrics import caption_scores
    from mm.inference.generate import generate

    model = mm.load_pretrained(coca_dir).eval()
    imgs = [png_bytes(im) for im in random_images(8, 31)]
    tf, tok = mm.image_transform(model), mm.get_tokenizer(model)
    x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in imgs])
    with torch.no_grad():
        ids = generate(model, x, method="greedy", max_new_tokens=6).tolist()
    eot = model.config.text.eot_id
    gen = [tok.decode(r[: r.index(eot)] if eot in r else r) for r in ids]
    refs = [([g] if i % 3 == 0 else []) + [f"a photo number {i}", "some colour noise"] for i, g in enumerate(gen)]
    root = tmp_path / "wds"
    write_wds(root / "flickr", [{"png": b, "txt": "\n".join(c).encode()} for b, c in zip(imgs, refs)],
              dataset_type="retrieval")
    out = tmp_path / "out"
    assert bench("--model", str(coca_dir), "--dataset", "wds/flickr", "--dataset-root", str(root), "--task",
                 "captioning", "--generation", "greedy", "--max-new-tokens", "6", "--output", str(out)) == 0
    r = read_result(out, f"flickr__{slug(coca_dir)}_en_captioning.json")
    s = caption_scores(gen, refs)
    expected = {"Bleu_1": s["bleu1"], "Bleu_2": s["bleu2"], "Bleu_3": s["bleu3"], "Bleu_4": s["bleu4"],
                "ROUGE_L": s["rouge_l"], "CIDEr": s["cider"]}
    assert r["metrics"] == pytest.approx(expected, abs=1e-12)
    assert 0 < r["metrics"]["Bleu_1"] < 1 and 0 < r["metrics"]["CIDEr"]
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].split(",")[5:] == list(expected) and float(rows[1].split(",")[4]) == pytest.approx(s["cider"])


# -- clip_benchmark itself -----------------------------------------------------------------------
# `make test-benchmark` fills it; absolute, since clip_benchmark runs in the test's own folder
CB_PATH = os.path.abspath(os.environ.get("MM_CLIP_BENCHMARK_PATH", str(ROOT / ".venv-clip-benchmark")))


def _run(cmd: list[str], **kw) -> None:
    """A subprocess that must succeed; its stderr in the failure message."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, (cmd[:4], proc.stderr[-3000:])


@pytest.mark.benchmark_peer
def test_equals_clip_benchmark(tmp_path, capsys):
    """clip_benchmark 1.6.2 (`clip_benchmark eval`) and `mm benchmark` on the same open_clip ViT-S-32 (random
    weights saved to a file, which both load: clip_benchmark through open_clip's
    ``create_model_and_transforms(model, pretrained=FILE)``) and the same local webdatasets: every metric, the
    result file names and fields are equal, and `clip_benchmark build` reads mm's files.

    Setup (the `benchmark` extra, but in a directory of its own): clip-benchmark 1.6.2 calls float() on a
    1-element numpy array, which numpy >= 2.3 (this venv's) refuses, so it runs in a subprocess with
    ``PYTHONPATH=$MM_CLIP_BENCHMARK_PATH`` (default .venv-clip-benchmark, which `make test-benchmark` fills) holding
    it and an older numpy::

        pip install --target .venv-clip-benchmark --no-deps clip-benchmark==1.6.2 'numpy<2.3' 'scikit-learn>=1,<2' scipy \\
            joblib threadpoolctl cloudpickle narwhals pycocoevalcap requests urllib3 idna charset-normalizer certifi

    (torch, torchvision, open_clip, webdataset, tqdm come from this venv). Run with ``pytest -m benchmark_peer -s``
    to see both tools' wall times (each a fresh process: imports, model load, data, metrics).
    """
    env = {**os.environ, "PYTHONPATH": CB_PATH}
    probe = subprocess.run([sys.executable, "-c", "import clip_benchmark.cli"], env=env, capture_output=True, text=True)
    assert probe.returncode == 0, (f"clip_benchmark 1.6.2 is not importable from {CB_PATH}: `make test-benchmark` "
                                   f"installs it there (this test's docstring says how)\n{probe.stderr[-2000:]}")
    import open_clip

    torch.manual_seed(0)
    weights = tmp_path / "vit_s_32_random.pt"
    torch.save(open_clip.create_model("ViT-S-32").state_dict(), weights)
    model = mm.load_model("ViT-S-32", str(weights)).eval()

    root = tmp_path / "wds"
    n = 40
    enc = [png_bytes(im) if i % 2 else jpeg(im) for i, im in enumerate(random_images(n, 11, size=64))]
    order = class_logits(model, enc, CLASSES, TEMPLATES).argsort(dim=1, descending=True)
    labels = [int(order[i, RANKS[i % len(RANKS)]]) for i in range(n)]
    write_wds(root / "cifar", [{"png" if i % 2 else "jpg": b, "cls": str(y).encode()}
                               for i, (b, y) in enumerate(zip(enc, labels))], classes=CLASSES, templates=TEMPLATES)
    caps = [[f"a picture number {i}", f"colour noise {i + 100}", f"{i} squares"][: 1 + i % 3] for i in range(n)]
    write_wds(root / "flickr", [{"png": b, "txt": "\n".join(c).encode()} for b, c in zip(enc, caps)], shards=3,
              dataset_type="retrieval")
    pool = [f"a {c} square" for c in CLASSES]  # SugarCrepe-style: 3 candidates each, the "true" one first
    sim = image_emb(model, enc) @ text_emb(model, pool).T
    ranks = ([0, 3, 6], [3, 0, 6], [5, 1, 7])  # the first caption is the model's best of the three for i % 3 == 0
    picks = [sim[i].argsort(descending=True)[ranks[i % 3]].tolist() for i in range(n)]
    write_wds(root / "sugar_crepe_x", [{"png": b, "txt": "\n".join(pool[j] for j in p).encode()}
                                       for b, p in zip(enc, picks)], dataset_type="retrieval")
    del model

    cb_out, mm_out = tmp_path / "cb", tmp_path / "mm"
    cb_out.mkdir()
    times = {}
    for dataset, task in (("wds/cifar", "zeroshot_classification"), ("wds/flickr", "zeroshot_retrieval"),
                          ("wds/sugar_crepe_x", "image_caption_selection")):
        t0 = time.perf_counter()
        _run([sys.executable, "-m", "clip_benchmark.cli", "eval", "--model", "ViT-S-32", "--pretrained",
              str(weights), "--dataset", dataset, "--dataset_root", f"{root}/{{dataset}}", "--task", task,
              "--no_amp", "--recall_k", "1", "5", "10", "--batch_size", "16", "--num_workers", "1",
              "--output", f"{cb_out}/{{dataset}}_{{pretrained}}_{{model}}_{{language}}_{{task}}.json"],
             env=env, cwd=tmp_path)
        t1 = time.perf_counter()
        _run([sys.executable, "-m", "mm", "benchmark", "--model", "ViT-S-32", "--pretrained", str(weights),
              "--dataset", dataset, "--dataset-root", f"{root}/{{dataset}}", "--task", task,
              "--batch-size", "16", "--workers", "1", "--output", str(mm_out), "--device", "cpu"],
             cwd=ROOT)
        times[dataset] = (t1 - t0, time.perf_counter() - t1)
    cb_files = sorted(p.name for p in cb_out.glob("*.json"))
    assert sorted(p.name for p in mm_out.glob("*.json")) == cb_files and len(cb_files) == 3
    for name in cb_files:
        cb, ours = read_result(cb_out, name), read_result(mm_out, name)
        assert {k: v for k, v in ours.items() if k != "metrics"} == {k: v for k, v in cb.items() if k != "metrics"}
        assert set(ours["metrics"]) == set(cb["metrics"])
        assert ours["metrics"] == pytest.approx(cb["metrics"], abs=1e-6), name
        with capsys.disabled():
            print(f"\n{name}\n  clip_benchmark {cb['metrics']}\n  mm             {ours['metrics']}")
    cls = read_result(mm_out, next(f for f in cb_files if "classification" in f))["metrics"]
    assert 0 < cls["acc1"] < cls["acc5"] < 1
    assert 0 < read_result(mm_out, next(f for f in cb_files if "selection" in f))["metrics"]["acc"] < 1
    with capsys.disabled():
        for dataset, (t_cb, t_mm) in times.items():
            print(f"{dataset}: wall time clip_benchmark {t_cb:.1f} s, mm {t_mm:.1f} s (fresh processes, CPU)")
    built = tmp_path / "built.csv"
    _run([sys.executable, "-m", "clip_benchmark.cli", "build", str(mm_out), str(cb_out), "--output", str(built)],
         env=env)
    import csv

    rows = list(csv.DictReader(built.open()))
    assert len(rows) == 6 and {r["model_fullname"] for r in rows} == {f"ViT-S-32 {weights}"}


@pytest.mark.benchmark_peer
def test_caption_metrics_equal_pycocoevalcap(tmp_path):
    """The captioning task's metrics (mm.eval.caption_metrics: tokenize, then BLEU-1..4, ROUGE-L, CIDEr-D) equal
    pycocoevalcap's (clip_benchmark's captioning scorer) with its Java PTBTokenizer, on Flickr-style captions with
    punctuation, capitals and clitics. METEOR and SPICE (Java + Stanford CoreNLP models) are not computed by mm."""
    from mm.eval.caption_metrics import caption_scores

    rng = np.random.default_rng(0)
    words = "a the dog dogs man woman child red blue ball grass beach water runs jumps is sitting on in near with " \
            "two three playing brown white black small large".split()
    refs = [[" ".join(rng.choice(words, rng.integers(4, 12))).capitalize() + rng.choice([".", " .", "!", ""])
             for _ in range(5)] for _ in range(30)]
    refs[0][:4] = ["A dog's ball, on the grass.", "The man isn't sitting; he's running!", "Dogs at no. 5 run.",
                   "Mr. Smith, i.e. a man, in the U.S. sees a."]  # PTB's abbreviations and initials
    cands = [rng.choice(r).lower().rstrip(".!") if i % 3 else " ".join(rng.choice(words, 7)) for i, r in enumerate(refs)]
    (tmp_path / "data.json").write_text(json.dumps({"cands": cands, "refs": refs}))
    script = """
import json, sys
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.cider.cider import Cider
d = json.load(open(sys.argv[1]))
tok = PTBTokenizer()
gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(d["refs"])})
res = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(d["cands"])})
out = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res)[0]))
out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
out["CIDEr"] = Cider().compute_score(gts, res)[0]
print(json.dumps({k: float(v) for k, v in out.items()}))
"""
    env = {**os.environ, "PYTHONPATH": CB_PATH}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data.json")], env=env, capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    s = caption_scores(cands, refs)
    ours = {"Bleu_1": s["bleu1"], "Bleu_2": s["bleu2"], "Bleu_3": s["bleu3"], "Bleu_4": s["bleu4"],
            "ROUGE_L": s["rouge_l"], "CIDEr": s["cider"]}
    assert ours == pytest.approx(ref, abs=1e-9)
    assert 0 < ref["Bleu_4"] < 1 and 0 < ref["CIDEr"]
