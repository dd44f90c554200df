"""`mm embed` / `mm search`: embeddings equal the model's own, resumed runs redo only missing chunks, two
`accelerate launch` processes write every input exactly once, search equals brute force, and bad inputs
fail early with messages that name the problem."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_image, colour_samples, write_tar
from PIL import Image

import mm
from mm.cli import main as mm_main
from mm.inference.embed import EmbedError, embed_images, load_index, model_fingerprint, read_texts
from mm.inference.search import search

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
COLOURS = ["red", "green", "blue", "yellow"]




@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """9 readable images (various sizes, one subfolder) and one corrupt file."""
    d = tmp_path_factory.mktemp("images")
    (d / "sub").mkdir()
    for i in range(9):
        img = colour_image(COLOURS[i % 4], size=32 + 8 * i, seed=i).resize((32 + 8 * i, 40))
        img.save(d / ("sub" if i % 3 == 0 else "") / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return d


def good_images(root: Path) -> list[tuple[str, Path]]:
    return sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("img*"))


def reference(model, paths: list[Path]) -> np.ndarray:
    pre = mm.image_transform(model, train=False)
    x = torch.stack([pre(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model.encode_image(x, normalize=True).numpy()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mm.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def part_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("part-*"))}


def test_embed_folder_equals_encode_image_and_skips_the_corrupt_file(model_dir, model, images, tmp_path):
    out = tmp_path / "emb"
    run_cli("embed", "--model", str(model_dir), "--images", str(images), "--out", str(out),
            "--chunk-size", "4", "--batch-size", "3", "--workers", "2")
    emb, ids = load_index(out)
    expected = good_images(images)
    assert ids == [i for i, _ in expected]  # ids relative to the folder, sorted; the corrupt file left out
    assert "sub/img0.jpg" in ids and emb.shape == (9, model.config.embed_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, reference(model, [p for _, p in expected]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f"{images / 'broken.jpg'}\tundecodable image")
    index = json.loads((out / "index.json").read_text())
    assert index["count"] == 9 and index["skipped"] == 1 and index["normalized"] is True
    assert index["model"] == str(model_dir.resolve()) and index["embed_dim"] == model.config.embed_dim
    assert [p["rows"] for p in index["parts"]] == [3, 4, 2]  # 10 inputs in chunks of 4; broken.jpg is in the first
    # the weights fingerprint queries are checked against: the model's, a reloaded copy's, not another model's
    assert index["model_fingerprint"] == model_fingerprint(model) == model_fingerprint(mm.load_pretrained(model_dir))
    other = mm.create_model("tiny-clip")
    assert model_fingerprint(other) != index["model_fingerprint"]
    other.load_state_dict(model.state_dict())
    assert model_fingerprint(other) == index["model_fingerprint"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_default_workers_follow_the_cores_this_process_may_use(model_dir, images, tmp_path):
    """On 2 cores (a CI runner, a small VM) `mm embed` starts 1 loader worker, and PyTorch has nothing to warn
    about; the default is the cores of the affinity mask but one, 1 to 4."""
    cores = sorted(os.sched_getaffinity(0))
    counts = "import mm.utils.host as h; print(h.available_cpus(), h.default_workers())"
    for n in sorted({1, min(2, len(cores)), len(cores)}):
        out = subprocess.run([sys.executable, "-c", counts], env=ENV, capture_output=True, text=True, check=True,
                             preexec_fn=lambda n=n: os.sched_setaffinity(0, cores[:n])).stdout.split()
        assert [int(x) for x in out] == [n, max(1, min(4, n - 1))]
    proc = subprocess.run([sys.executable, "-W", "always", "-m", "mm.cli", "embed", "--model", str(model_dir),
                           "--images", str(images), "--out", str(tmp_path / "emb")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores[:2]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker processes in total" not in proc.stderr, proc.stderr[-3000:]  # PyTorch's warning
    assert json.loads((tmp_path / "emb" / "index.json").read_text())["count"] == 9


def test_resumed_run_redoes_only_the_missing_chunk(model_dir, images, tmp_path, capsys):
    out = tmp_path / "emb"
    cmd = ["embed", "--model", str(model_dir), "--images", str(images), "--out", str(out), "--batch-size", "2",
           "--workers", "0", "--chunk-size", "3"]
    assert mm_main(cmd) == 0
    first_emb, first_ids = load_index(out)
    before = part_stats(out)
    assert len(before) == 8  # 4 chunks x (.npy + .ids.json)
    for f in out.glob("part-000-000002.*"):
        f.unlink()
    (out / "index.json").unlink()  # as after an interrupted run
    assert mm_main(cmd) == 0
    after = part_stats(out)
    assert after.keys() == before.keys()
    rewritten = {name for name in before if after[name] != before[name]}
    assert rewritten == {"part-000-000002.npy", "part-000-000002.ids.json"}
    emb, ids = load_index(out)
    assert ids == first_ids
    np.testing.assert_array_equal(emb, first_emb)
    # a rerun that would cut the inputs differently is refused, naming what changed
    assert mm_main(cmd[:-1] + ["4"]) == 2
    assert "different chunks, inputs_sha256" in capsys.readouterr().err
    assert part_stats(out) == after


@pytest.fixture(scope="module")
def image_index(model_dir, images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "emb"
    embed_images(mm.load_model(model_dir), [images], out, chunk_size=2, batch_size=4, workers=0,
                 model_spec=str(model_dir))  # recorded in index.json: `mm search` embeds queries with it
    return out


def brute_force(index: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
    emb, ids = load_index(index)
    scores = queries @ (emb / np.linalg.norm(emb, axis=1, keepdims=True)).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), [[ids[j] for j in row] for row in order]


def test_search_equals_brute_force_for_text_and_image_queries(model_dir, model, images, image_index, capsys):
    texts = ["a red square", "something blue", "yellow"]
    with torch.no_grad():
        q_text = model.encode_text(mm.get_tokenizer(model)(texts), normalize=True).numpy()
    q_image = reference(model, [images / "img4.jpg"])
    assert len(json.loads((image_index / "index.json").read_text())["parts"]) == 5
    for q, k in ((q_text, 4), (q_image, 9), (q_text, 50)):
        want_scores, want_ids = brute_force(image_index, q, k)
        for block_rows in (1, 3, 65536):  # running top-k across chunks and blocks within a chunk
            scores, ids = search(image_index, q, k, block_rows=block_rows)
            assert ids == want_ids
            np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
    assert search(image_index, q_image, 9)[1][0][0] == "img4.jpg"  # an image finds itself first

    assert mm_main(["search", "--index", str(image_index), *texts, "-k", "4", "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want_scores, want_ids = brute_force(image_index, q_text, 4)
    assert [g["query"] for g in got] == texts
    assert [[r["id"] for r in g["results"]] for g in got] == want_ids
    np.testing.assert_allclose([[r["score"] for r in g["results"]] for g in got], want_scores, atol=1e-5)
    assert mm_main(["search", "--index", str(image_index), "--image", str(images / "img4.jpg"), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query: {images / 'img4.jpg'}" and lines[1].split("\t")[::2] == ["1", "img4.jpg"]


def test_search_with_faiss_equals_numpy(image_index, model):
    pytest.importorskip("faiss", reason="faiss is not installed; --faiss is optional")
    q = np.random.default_rng(0).normal(size=(3, model.config.embed_dim)).astype(np.float32)
    want_scores, want_ids = search(image_index, q, 5)
    scores, ids = search(image_index, q, 5, use_faiss=True, block_rows=3)
    assert ids == want_ids
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_faiss_flag_without_faiss_is_a_clear_error(image_index, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed (the test extra installs it)
    assert mm_main(["search", "--index", str(image_index), "red", "--faiss"]) == 2
    assert "faiss is not installed" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_embed_every_image_exactly_once(model_dir, images, image_index, tmp_path):
    out = tmp_path / "emb2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "mm.cli", "embed", "--model", str(model_dir),
           "--images", str(images), "--out", str(out), "--chunk-size", "2", "--batch-size", "4", "--workers", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    index = json.loads((out / "index.json").read_text())
    files = [p["file"] for p in index["parts"]]
    # chunk c by rank c % 2: really two ranks, not two single-process runs each doing everything
    assert files == [f"part-{c % 2:03d}-{c:06d}.npy" for c in range(5)]
    assert sorted(p.name for p in out.glob("part-*.npy")) == sorted(files)
    emb, ids = load_index(out)
    assert len(ids) == len(set(ids)) == 9 and ids == [i for i, _ in good_images(images)]
    one_emb, one_ids = load_index(image_index)  # the same inputs and chunking in one process
    assert ids == one_ids
    np.testing.assert_allclose(emb, one_emb, atol=1e-6, rtol=0)
    assert index["skipped"] == 1


def test_shards_use_sample_keys_and_skip_bad_samples(model, tmp_path):
    samples = colour_samples(5)
    samples[2] = (samples[2][0], {"jpg": b"garbage", "txt": b"x"})
    write_tar(tmp_path / "a-000.tar", samples[:3])
    write_tar(tmp_path / "a-001.tar", samples[3:])
    out = tmp_path / "emb"
    index = embed_images(model, [f"{tmp_path}/a-{{000..001}}.tar"], out, batch_size=2, workers=2, dtype="float16")
    emb, ids = load_index(out)
    assert ids == ["s00000", "s00001", "s00003", "s00004"] and emb.dtype == np.float16
    assert [p["rows"] for p in index["parts"]] == [2, 2]  # one part per shard
    pre = mm.image_transform(model, train=False)
    x = torch.stack([pre(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for k, s in samples if k != "s00002"])
    with torch.no_grad():
        want = model.encode_image(x, normalize=True).numpy()
    np.testing.assert_allclose(emb.astype(np.float32), want, atol=2e-3)
    assert (out / "skipped.txt").read_text().startswith(f"{tmp_path}/a-000.tar:s00002\tundecodable image")


def test_texts_equal_encode_text(model_dir, model, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a red circle\n\n  blue star \ngreen\n")
    out = tmp_path / "emb"
    assert mm_main(["embed", "--model", str(model_dir), "--texts", str(tmp_path / "t.txt"), "--out", str(out),
                    "--chunk-size", "2", "--workers", "0"]) == 0
    emb, ids = load_index(out)
    assert ids == ["1: a red circle", "3: blue star", "4: green"]
    with torch.no_grad():
        want = model.encode_text(mm.get_tokenizer(model)(["a red circle", "blue star", "green"]), normalize=True)
    np.testing.assert_allclose(emb, want.numpy(), atol=1e-5, rtol=0)
    # an image query over a text index (a missing query image is named)
    assert mm_main(["search", "--index", str(out), "--image", str(tmp_path / "q.png")]) == 2
    assert f"--image: no such file: {tmp_path / 'q.png'}" in capsys.readouterr().err
    Image.new("RGB", (40, 40), (200, 20, 20)).save(tmp_path / "q.png")
    assert mm_main(["search", "--index", str(out), "--image", str(tmp_path / "q.png"), "-k", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3

    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    (tmp_path / "t.json").write_text('["x", "y"]')
    assert read_texts(tmp_path / "t.jsonl") == [("1: a", "a"), ("3: b", "b")]
    assert read_texts(tmp_path / "t.json") == [("1: x", "x"), ("2: y", "y")]
    # called from Python, the errors name the parameters (mm embed passes its options' names: test below)
    with pytest.raises(EmbedError, match=r"^texts: no such file: "):
        read_texts(tmp_path / "nope.txt")
    with pytest.raises(EmbedError, match=r"^inputs: shard .* not found"):
        embed_images(mm.create_model("tiny-clip"), [str(tmp_path / "nope-{0..1}.tar")], tmp_path / "o")
    with pytest.raises(EmbedError, match=r"^batch_size must be >= 1"):
        mm.inference.embed_texts(mm.create_model("tiny-clip"), ["a"], tmp_path / "o", batch_size=0)


@pytest.mark.parametrize("args, message", [
    (["--images", "{tmp}/nope"], "no such image file or folder: {tmp}/nope"),
    (["--images", "{tmp}/shard-{{000..001}}.tar"], "--images: shard '{tmp}/shard-000.tar' not found"),
    (["--texts", "{tmp}/nope.txt"], "--texts: no such file: {tmp}/nope.txt"),
    (["--texts", "{tmp}/bad.jsonl"], "bad.jsonl:2: expected a JSON object with a \"text\" field"),
    (["--images", "{tmp}/empty"], "no images found in {tmp}/empty"),
])
def test_bad_inputs_fail_before_the_model_is_loaded(args, message, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    # the model does not exist: an error about the inputs proves they were checked first
    assert mm_main(["embed", "--model", "no-such-model", *args, "--out", str(tmp_path / "o")]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--images", "x.jpg", "--texts", "t.txt"], "argument --texts: not allowed with argument --images"),
    ([], "one of the arguments --images --texts is required"),
])
def test_images_and_texts_are_exclusive_and_one_is_required(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        mm_main(["embed", "--model", "tiny-clip", "--out", "o", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("n", [5_000, 2**24, 2**24 + 1, 49_408 * 512])
def test_the_fingerprint_reads_the_first_and_last_value_of_any_tensor(n):
    """Index outputs record the model's fingerprint, a sample of each tensor's values. Above 2**24 values float32
    cannot count positions exactly: ViT-B-32's token table (49,408 x 512) made the sample index one past the end, so
    `mm embed`, `mm curate score` and `mm index` failed on every open_clip model with that table."""
    holder = torch.nn.Module()
    holder.register_buffer("table", torch.zeros(n, dtype=torch.uint8))
    plain = model_fingerprint(holder)
    seen = []
    for i in (0, n - 1):
        holder.table[i] = 1
        seen.append(model_fingerprint(holder))
        holder.table[i] = 0
    assert plain not in seen and seen[0] != seen[1]
    assert model_fingerprint(holder) == plain
