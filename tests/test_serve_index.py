"""`mm serve` over approximate and sharded indexes, as real processes on loopback ports: an `mm index build` output
answers as `mm search` on it does (and exactly on request); an index of two shards, local or served by two other
`mm serve` processes, answers what exact search over their union answers; a shard that goes down is a 502 naming
it while the server stays up; an index made by another model is refused at start (exit 2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_ann import clustered, write_embed

import mm
from mm.cli import main as mm_main
from mm.inference import ann
from mm.inference.embed import model_fingerprint
from mm.inference.search import search

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from test_serve import Server  # noqa: E402  (needs the serve extra)

TEXT = "a red square"


@pytest.fixture(scope="module")
def shards(model_dir, model, tmp_path_factory):
    """3,000 vectors as one `mm embed` output and as two halves, each half a flat `mm index build` output, and an
    IVF-PQ index of the whole; all recorded as made by ``model``."""
    d = tmp_path_factory.mktemp("shards")
    x = clustered(3000, model.config.embed_dim, seed=2)
    fp = model_fingerprint(model)
    whole = write_embed(d / "emb", [x[:1000], x[1000:]], model=str(model_dir), fingerprint=fp)
    halves = [write_embed(d / f"emb{i}", [x[1500 * i:1500 * (i + 1)]], model=str(model_dir), fingerprint=fp,
                          start=1500 * i) for i in range(2)]
    flat = [d / "ann0", d / "ann1"]
    for h, out in zip(halves, flat):
        ann.build(h, out, kind="flat", n_queries=20, progress_every=None)
    ann.build(whole, d / "pq", kind="ivf-pq", n_queries=100, progress_every=None)
    return whole, flat, d / "pq"


def text_embedding(model) -> np.ndarray:
    with torch.no_grad():
        return model.encode_text(mm.get_tokenizer(model)([TEXT]), normalize=True).numpy()


def hits(response: httpx.Response, name: str) -> tuple[list[str], list[float]]:
    assert response.status_code == 200, response.text
    found = response.json()["results"][name]
    return [h["id"] for h in found], [h["score"] for h in found]


@pytest.mark.slow  # three server processes (~20 s on 2 cores): the second CI step
def test_serve_answers_from_approximate_and_sharded_indexes(model_dir, model, shards):
    whole, flat, pq = shards
    backends = [Server("--model", str(model_dir), "--index", f"photos={f}") for f in flat]
    front = Server("--model", str(model_dir), "--index", f"local={flat[0]},{flat[1]}", "--index", f"pq={pq}",
                   "--index", "photos=" + ",".join(f"{b.url}/photos" for b in backends))
    try:
        q = text_embedding(model)
        want_scores, want_ids = search(whole, q, 8)
        with front.client() as c:
            info = c.get("/v1/info").json()["indexes"]
            assert info["photos"]["shards"] == info["local"]["shards"] == 2
            assert info["photos"]["count"] == info["local"]["count"] == info["pq"]["count"] == 3000
            assert info["pq"]["approximate"] and not info["photos"]["approximate"]  # its shards: flat indexes, exact
            for name in ("local", "photos"):  # two shards merged = exact search over their union
                ids, scores = hits(c.post("/v1/search", json={"text": TEXT, "index": name, "k": 8}), name)
                assert ids == want_ids[0]
                np.testing.assert_allclose(scores, want_scores[0], atol=1e-4)
            # the approximate index answers as mm search --index on it; exact on request, as mm search --exact
            pq_scores, pq_ids = ann.search(pq, q, 8)
            ids, scores = hits(c.post("/v1/search", json={"text": TEXT, "index": "pq", "k": 8}), "pq")
            assert ids == pq_ids[0]
            np.testing.assert_allclose(scores, pq_scores[0], atol=1e-4)
            r = c.post("/v1/search", json={"embedding": q[0].tolist(), "index": "pq", "k": 8, "exact": True})
            assert hits(r, "pq")[0] == want_ids[0] and r.json()["query"] == "embedding"
            for bad, status in (([0.0] * q.shape[1], 422), ([1.0] * (q.shape[1] + 1), 422)):
                r = c.post("/v1/search", json={"embedding": bad, "index": "pq"})
                assert r.status_code == status and "embedding" in r.json()["detail"], r.text
            # a shard gone: 502 naming it; the server stays up and its other indexes answer
            assert backends[1].stop() == 0
            r = c.post("/v1/search", json={"text": TEXT, "index": "photos"})
            assert r.status_code == 502 and f"{backends[1].url}/photos" in r.json()["detail"], r.text
            assert c.get("/healthz").status_code == 200
            assert hits(c.post("/v1/search", json={"text": TEXT, "index": "local", "k": 8}), "local")[0] == want_ids[0]
    finally:
        for s in (front, *backends):
            s.stop()


def test_serve_refuses_an_index_of_another_model(model_dir, model, shards, tmp_path, capsys):
    _, flat, pq = shards
    torch.manual_seed(1)
    other = mm.save_pretrained(mm.create_model("tiny-clip"), tmp_path / "other")  # same name and width
    assert mm_main(["serve", "--model", str(other), "--index", f"pq={pq}", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --index pq: made with the model") and "--allow-other-model" in err
    foreign = write_embed(tmp_path / "foreign", [clustered(100, model.config.embed_dim)], model=str(other),
                          fingerprint=model_fingerprint(mm.load_pretrained(other)), start=5000)
    assert mm_main(["serve", "--model", str(model_dir), "--index", f"x={flat[0]},{foreign}", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: index x: shard {foreign} differs from {flat[0]} in its model"), err
