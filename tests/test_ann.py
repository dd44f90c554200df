"""`mm index` / `mm search --index` (mm.inference.ann): a flat index answers exactly what exact search answers, with
the same ids; IVF / HNSW recall, measured on held-out queries, is high; a build interrupted and resumed equals one
built at once; the chosen index fits the memory budget and a budget too small is refused; mixed widths are refused
naming the part; `mm search --index` answers from the index, and with --exact from the embeddings."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mm
from mm.cli import main as mm_main
from mm.inference import ann
from mm.inference.search import merge_topk, search

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


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embed(d: Path, parts: list[np.ndarray], model: str | None = None, fingerprint: str | None = None,
                start: int = 0) -> Path:
    """An `mm embed` output (the files mm.inference.embed writes, index.json last) holding ``parts``, ids
    v<start>, v<start + 1>, ..."""
    d.mkdir(parents=True, exist_ok=True)
    meta, k = [], start
    for c, x in enumerate(parts):
        stem = f"part-000-{c:06d}"
        (d / f"{stem}.ids.json").write_text(json.dumps({"ids": [f"v{k + i}" for i in range(len(x))], "skipped": []}))
        np.save(d / f"{stem}.npy", x)
        meta.append({"file": f"{stem}.npy", "ids": f"{stem}.ids.json", "rows": len(x)})
        k += len(x)
    index = {"format": "mm-embed", "version": 1, "kind": "images", "model": model, "pretrained": None,
             "normalized": True, "dtype": "float32", "embed_dim": parts[0].shape[1], "count": k - start, "skipped": 0,
             "parts": meta, "model_fingerprint": fingerprint}
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
    assert info["recall"]["recall@10"] >= 0.9  # IVF-PQ too: it re-ranks its candidates by exact cosine
    # the recorded recall is what the index answers: recompute it from scratch against exact search's ids
    queries = np.load(tmp_path / kind / "heldout.npy")
    _, want = search(emb, queries, 10)
    _, got = ann.search(tmp_path / kind, queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall == pytest.approx(info["recall"]["recall@10"], abs=0.01)
    # no query is a stored vector (perturbed), yet each is near the row it came from
    assert not np.any(np.isclose(queries @ x.T, 1.0, atol=1e-6))
    assert np.all(np.sum(queries * x[held], 1) > 0.9)


def test_ivf_pq_reranks_with_exact_cosines_from_the_embed_output(data, tmp_path):
    emb, x = data
    info = ann.build(emb, tmp_path / "pq", kind="ivf-pq", chunk_rows=4000, n_queries=200, progress_every=None)
    assert info["spec"]["rerank"] == ann.RERANK and info["search_params"]["rerank"] == ann.RERANK
    q = clustered(20, 32, seed=11)
    scores, ids = ann.search(tmp_path / "pq", q, 10)
    rows = np.array([[int(i[1:]) for i in row] for row in ids])  # ids are v<row>
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[rows], q), atol=1e-5)  # exact cosines, ordered
    assert np.all(np.diff(scores, axis=1) <= 0)
    codes = ann.tune(tmp_path / "pq", rerank=0)  # the codes' own order: the recall re-ranking buys
    assert "rerank" not in codes["search_params"]
    assert codes["sweep"][-1]["recall@10"] < info["recall"]["recall@10"]
    top = max(s["recall@10"] for s in codes["sweep"])  # target missed: the cheapest nprobe near the best recall
    assert not codes["meets_target"] and codes["search_params"]["nprobe"] == min(
        s["value"] for s in codes["sweep"] if s["recall@10"] >= top - ann.PLATEAU_GAIN)
    ann.tune(tmp_path / "pq", rerank=ann.RERANK)
    shutil.move(emb, tmp_path / "moved")
    try:
        with pytest.raises(ann.AnnError, match=r"part-000-000000\.npy: missing; .* re-ranks .* rerank 0"):
            ann.search(tmp_path / "pq", q, 10)
    finally:
        shutil.move(tmp_path / "moved", emb)


@pytest.mark.slow  # a real process killed and rerun (~20 s on 2 cores): the second CI step
def test_a_killed_build_process_resumes(tmp_path):
    """`mm index build` killed (SIGKILL) after its first checkpoint: the rerun continues from it (not from 0), and the
    index holds every vector once, answering as one built at once."""
    x = clustered(60000, 64, seed=4)
    emb = write_embed(tmp_path / "emb", [x[:30000], x[30000:]])
    cmd = [sys.executable, "-m", "mm", "index", "build", "--embeddings", str(emb), "--type", "hnsw",
           "--chunk-rows", "500", "--queries", "200"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = tmp_path / "killed" / "build.json"
    while proc.poll() is None and not (state.is_file() and json.loads(state.read_text())["added"] > 0):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, proc.stdout.read()  # killed mid-build, not finished
    added = json.loads(state.read_text())["added"]
    assert 0 < added < len(x) and not (tmp_path / "killed" / "ann.json").exists()
    r = subprocess.run([*cmd, "--out", str(tmp_path / "killed")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode in (0, 1), r.stderr
    assert f"resuming: {added} of {len(x)} vectors already added" in r.stderr, r.stderr
    once = ann.build(emb, tmp_path / "once", kind="hnsw", chunk_rows=500, n_queries=200, progress_every=None)
    resumed = json.loads((tmp_path / "killed" / "ann.json").read_text())
    assert faiss.read_index(str(tmp_path / "killed" / "index.faiss")).ntotal == len(x)
    assert resumed["recall"]["recall@10"] == pytest.approx(once["recall"]["recall@10"], abs=0.02)
    q = unit(x[::1000] + 0.02 * np.random.default_rng(8).standard_normal((60, 64)).astype(np.float32))  # near the data
    _, want = search(emb, q, 10)
    _, got = ann.search(tmp_path / "killed", q, 10)
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)]) >= 0.9


def test_search_refuses_a_query_model_other_than_the_index_model(model_dir, model, tmp_path, capsys):
    from mm.inference.embed import model_fingerprint

    x = clustered(500, model.config.embed_dim, seed=6)
    emb = write_embed(tmp_path / "emb", [x], model=str(model_dir), fingerprint=model_fingerprint(model))
    ann.build(emb, tmp_path / "ann", kind="flat", n_queries=20, progress_every=None)
    torch.manual_seed(1)
    other = mm.save_pretrained(mm.create_model("tiny-clip"), tmp_path / "other")  # same name and width, other weights
    for index in (emb, tmp_path / "ann"):
        assert mm_main(["search", "--index", str(index), "--json", "a red square"]) == 0
        capsys.readouterr()
        assert mm_main(["search", "--index", str(index), "--model", str(other), "a red square"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --index {index}: made with the model {model_dir}") and "--allow-other-model" in err
        assert mm_main(["search", "--index", str(index), "--model", str(other), "--allow-other-model", "--json",
                        "a red square"]) == 0
        capsys.readouterr()


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
    assert ann.choose_index(n, dim, 2 << 30).factory == "IVF4096,PQ64x8np"  # lists capped: NLIST_MAX
    assert ann.choose_index(1_000_000, dim, 4 << 30).kind == "hnsw"
    assert ann.choose_index(5000, dim, 4 << 30).kind == "flat"
    with pytest.raises(ann.AnnError, match=r"too small .* IVF4096,PQ4x8np"):
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
    loose = json.loads((tmp_path / "ivf" / "ann.json").read_text())  # every value is fast enough: the last tried
    assert loose["search_params"]["nprobe"] == loose["sweep"][-1]["value"] >= high["search_params"]["nprobe"]
    assert loose["recall"]["recall@10"] == max(s["recall@10"] for s in loose["sweep"])
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


def test_an_index_built_in_two_parts_answers_as_one_built_at_once(data, tmp_path):
    """Two shards (halves of the collection, each its own embed output and index), searched together and merged:
    flat ones answer exactly what one exact search over the whole answers; IVF ones reach the recall of one IVF
    index of the whole on its held-out queries."""
    emb, x = data
    halves = [write_embed(tmp_path / f"emb{i}", [x[6000 * i:6000 * (i + 1)]], start=6000 * i) for i in range(2)]
    whole = ann.build(emb, tmp_path / "whole", kind="ivf-flat", n_queries=300, progress_every=None,
                      target_recall=0.95)
    queries, truth = np.load(tmp_path / "whole" / "heldout.npy"), np.load(tmp_path / "whole" / "truth.npy")
    want_scores, want_ids = search(emb, queries, 10)
    assert [[f"v{r}" for r in row] for row in truth] == want_ids  # the recorded truth is exact search's
    for kind in ("flat", "ivf-flat"):
        for i, h in enumerate(halves):
            ann.build(h, tmp_path / f"{kind}{i}", kind=kind, n_queries=300, progress_every=None, target_recall=0.95)
        scores, ids = merge_topk([ann.search(tmp_path / f"{kind}{i}", queries, 10) for i in range(2)], 10)
        if kind == "flat":
            assert ids == want_ids
            np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        else:
            recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(ids, want_ids)])
            assert recall >= 0.95 and recall == pytest.approx(whole["recall"]["recall@10"], abs=0.03)


def test_search_cli_merges_several_shards(model_dir, model, tmp_path):
    from mm.inference.embed import model_fingerprint

    x = clustered(2000, model.config.embed_dim, seed=7)
    fp = model_fingerprint(model)
    whole = write_embed(tmp_path / "whole", [x], model=str(model_dir), fingerprint=fp)
    halves = [write_embed(tmp_path / f"h{i}", [x[1000 * i:1000 * (i + 1)]], model=str(model_dir), fingerprint=fp,
                          start=1000 * i) for i in range(2)]
    ann.build(halves[1], tmp_path / "ann1", kind="flat", n_queries=20, progress_every=None)

    def run(*index: Path) -> list[list[str]]:
        r = subprocess.run([sys.executable, "-m", "mm", "search", *[a for d in index for a in ("--index", str(d))],
                            "a red square", "a blue circle", "-k", "7", "--json"], capture_output=True, text=True,
                           cwd=ROOT, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr
        return [[h["id"] for h in json.loads(line)["results"]] for line in r.stdout.splitlines()]

    assert run(halves[0], tmp_path / "ann1") == run(whole)  # an embed output and an index of the other half
