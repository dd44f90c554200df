"""`mm index` / `mm search --index` (mm.inference.ann): a flat index answers exactly what exact search answers, with
the same ids; IVF / HNSW recall, measured on held-out queries, is high; a build interrupted and resumed equals one
built at once; the chosen index fits the memory budget and a budget too small is refused; mixed widths are refused
naming the part; `mm search --index` answers from the index, and with --exact from the embeddings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mm
from mm.cli import main as mm_main
from mm.inference import ann
from mm.inference.search import search

faiss = pytest.importorskip("faiss")  # in the test extra (CI has it); a bare install without mm[index] skips
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Unit vectors around random unit centres: the cluster structure of real embeddings."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((clusters, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embed(d: Path, parts: list[np.ndarray], model: str | None = None) -> Path:
    """An `mm embed` output (the files mm.inference.embed writes, index.json last) holding ``parts``."""
    d.mkdir(parents=True, exist_ok=True)
    meta, k = [], 0
    for c, x in enumerate(parts):
        stem = f"part-000-{c:06d}"
        (d / f"{stem}.ids.json").write_text(json.dumps({"ids": [f"v{k + i}" for i in range(len(x))], "skipped": []}))
        np.save(d / f"{stem}.npy", x)
        meta.append({"file": f"{stem}.npy", "ids": f"{stem}.ids.json", "rows": len(x)})
        k += len(x)
    index = {"format": "mm-embed", "version": 1, "kind": "images", "model": model, "pretrained": None,
             "normalized": True, "dtype": "float32", "embed_dim": parts[0].shape[1], "count": k, "skipped": 0,
             "parts": meta}
    (d / "index.json").write_text(json.dumps(index))
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, np.ndarray]:
    x = clustered(12000, 32)
    return write_embed(tmp_path_factory.mktemp("ann") / "emb", [x[:5000], x[5000:9000], x[9000:]]), x


def test_flat_index_answers_exactly_with_the_same_ids(data, tmp_path):
    emb, x = data
    info = ann.build(emb, tmp_path / "flat", kind="flat", chunk_rows=1000, n_queries=100, progress_every=None)
    assert info["factory"] == "Flat" and info["count"] == len(x) and info["recall"]["recall@10"] == 1.0
    q = clustered(20, 32, seed=5)
    want_scores, want_ids = search(emb, q, 10)
    scores, ids = ann.search(tmp_path / "flat", q, 10)
    assert ids == want_ids
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert ann.search(tmp_path / "flat", x[[7, 9500]], 1)[1] == [["v7"], ["v9500"]]  # row -> id across parts
    ann.build(emb, tmp_path / "l2", kind="flat", metric="l2", chunk_rows=5000, n_queries=100, progress_every=None)
    scores, ids = ann.search(tmp_path / "l2", q, 10)  # L2 ranks unit vectors as cosine does; scores are cosines
    assert ids == want_ids
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw", "ivf-pq"])
def test_approximate_recall_on_held_out_queries(data, tmp_path, kind):
    emb, x = data
    info = ann.build(emb, tmp_path / kind, kind=kind, chunk_rows=2000, n_queries=200, target_recall=0.9,
                     progress_every=None)
    held = np.load(tmp_path / kind / "heldout_rows.npy")
    assert info["held_out"]["excluded_from_training"] and len(held) == 200
    assert info["spec"]["kind"] == kind and info["meets_target"] is (info["recall"]["recall@10"] >= 0.9)
    floor = 0.6 if kind == "ivf-pq" else 0.9  # PQ codes cap recall; the exact ones reach the target
    assert info["recall"]["recall@10"] >= floor
    # the recorded recall is what the index answers: recompute it from scratch against exact search's ids
    queries = np.load(tmp_path / kind / "heldout.npy")
    _, want = search(emb, queries, 10)
    _, got = ann.search(tmp_path / kind, queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall == pytest.approx(info["recall"]["recall@10"], abs=0.01)
    # no query is a stored vector (perturbed), yet each is near the row it came from
    assert not np.any(np.isclose(queries @ x.T, 1.0, atol=1e-6))
    assert np.all(np.sum(queries * x[held], 1) > 0.9)


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_a_build_killed_while_adding_resumes_to_the_same_index(data, tmp_path, kind):
    emb, _ = data
    once = ann.build(emb, tmp_path / "once", kind=kind, chunk_rows=1000, n_queries=100, progress_every=None)
    assert ann.build(emb, tmp_path / "twice", kind=kind, chunk_rows=1000, n_queries=100, progress_every=None,
                     max_chunks=5) is None
    assert json.loads((tmp_path / "twice" / "build.json").read_text())["added"] == 5000
    assert faiss.read_index(str(tmp_path / "twice" / "index.faiss")).ntotal == 5000
    assert not (tmp_path / "twice" / "ann.json").exists()
    with pytest.raises(ann.AnnError, match="different"):  # a rerun with other options is not a resume
        ann.build(emb, tmp_path / "twice", kind="hnsw", progress_every=None)
    twice = ann.build(emb, tmp_path / "twice", kind=kind, chunk_rows=1000, n_queries=100, progress_every=None)
    assert twice["recall"] == once["recall"] and twice["search_params"] == once["search_params"]
    q = clustered(30, 32, seed=9)
    assert ann.search(tmp_path / "twice", q, 10)[1] == ann.search(tmp_path / "once", q, 10)[1]
    a, b = (faiss.read_index(str(tmp_path / d / "index.faiss")) for d in ("once", "twice"))
    assert a.ntotal == b.ntotal == 12000


def test_choice_respects_the_memory_budget_and_refuses_one_too_small():
    n, dim = 10_000_000, 512
    for budget in (64 << 30, 8 << 30, 2 << 30, 600 << 20, 200 << 20):
        spec = ann.choose_index(n, dim, budget)
        assert spec.memory <= budget
        assert spec.memory == ann.estimate_memory(spec.kind, n, dim, spec.nlist, spec.m, spec.nbits or 8)
    assert ann.choose_index(n, dim, 64 << 30).kind == "ivf-flat"  # HNSW's build is too slow at 10M
    assert ann.choose_index(n, dim, 2 << 30).factory == "IVF16384,PQ64x8np"
    assert ann.choose_index(1_000_000, dim, 4 << 30).kind == "hnsw"
    assert ann.choose_index(5000, dim, 4 << 30).kind == "flat"
    with pytest.raises(ann.AnnError, match=r"too small .* IVF16384,PQ4x8np"):
        ann.choose_index(n, dim, 50 << 20)
    assert ann.parse_memory("2GB") == 2 << 30 and ann.parse_memory("500MB") == 500 << 20


def test_mixed_widths_and_unfinished_embed_outputs_are_refused(tmp_path, capsys):
    x = clustered(300, 32)
    emb = write_embed(tmp_path / "mixed", [x[:100], clustered(100, 48)])
    with pytest.raises(ann.AnnError, match=r"part-000-000001\.npy: vectors of width 48.*mixed widths"):
        ann.build(emb, tmp_path / "out", progress_every=None)
    (tmp_path / "half").mkdir()
    assert mm_main(["index", "build", "--embeddings", str(tmp_path / "half"), "--out", str(tmp_path / "o")]) == 2
    assert "did not finish" in capsys.readouterr().err
    ok = write_embed(tmp_path / "ok", [x])
    assert mm_main(["index", "build", "--embeddings", str(ok), "--out", str(tmp_path / "o"), "--max-memory",
                    "1KB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a memory budget of 1.0 KB is too small") and err.count("\n") == 1


def test_tune_sets_the_knob_for_recall_or_latency(data, tmp_path, capsys):
    emb, _ = data
    ann.build(emb, tmp_path / "ivf", kind="ivf-flat", chunk_rows=4000, n_queries=100, progress_every=None)
    assert mm_main(["index", "tune", "--index", str(tmp_path / "ivf"), "--target-recall", "0.99"]) in (0, 1)
    high = json.loads((tmp_path / "ivf" / "ann.json").read_text())
    assert mm_main(["index", "tune", "--index", str(tmp_path / "ivf"), "--target-recall", "0.5"]) == 0
    low = json.loads((tmp_path / "ivf" / "ann.json").read_text())
    assert low["search_params"]["nprobe"] <= high["search_params"]["nprobe"]
    assert low["recall"]["recall@10"] >= 0.5 and low["tuned_for"] == {"target_recall": 0.5}
    assert mm_main(["index", "tune", "--index", str(tmp_path / "ivf"), "--max-latency-ms", "1000"]) == 0
    assert json.loads((tmp_path / "ivf" / "ann.json").read_text())["search_params"]["nprobe"] == high["spec"]["nlist"]  # all lists
    capsys.readouterr()


def test_search_cli_uses_the_index_and_exact_on_request(model_dir, model, tmp_path):
    dim = model.config.embed_dim
    x = clustered(3000, dim, seed=3)
    emb = write_embed(tmp_path / "emb", [x[:2000], x[2000:]], model=str(model_dir))
    ann.build(emb, tmp_path / "ann", kind="flat", n_queries=50, progress_every=None)
    texts = ["a red square", "something blue"]
    with torch.no_grad():
        q = model.encode_text(mm.get_tokenizer(model)(texts), normalize=True).numpy()
    want_scores, want_ids = search(emb, q, 5)

    def run(*extra: str) -> list[dict]:
        r = subprocess.run([sys.executable, "-m", "mm", "search", "--index", str(tmp_path / "ann"), *texts, "-k", "5",
                            "--json", *extra], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines()]

    for got in (run(), run("--exact")):
        assert [[r["id"] for r in g["results"]] for g in got] == want_ids
        np.testing.assert_allclose([[r["score"] for r in g["results"]] for g in got], want_scores, atol=1e-5)
