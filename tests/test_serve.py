"""`mm serve`: a real server process on a loopback port answers each endpoint with what the library gives for the
same inputs (encode_image / encode_text, zero-shot, mm.caption, mm search), refuses every bad request with a
4xx and a message (never a 500), batches concurrent requests, answers 503 when its queue is full, finishes
in-flight requests on SIGTERM, and its page works in a real browser (headless Chromium, slow)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import colour_image, colour_samples, write_tar
from PIL import Image

import mm
from mm.cli import main as mm_main
from mm.data.folder import load_image
from mm.eval.zeroshot import predict
from mm.inference.embed import embed_images

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from mm.serve.batcher import Batcher, QueueFull, Timeout  # noqa: E402  (needs the serve extra)
from mm.serve.metrics import parse as parse_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MM_SERVE_API_KEY": ""}
COLOURS = ["red", "green", "blue", "yellow"]


# -- a server process --------------------------------------------------------------------------------------
class Server:
    """``python -m mm serve ... --port 0`` on loopback; ``url`` once /healthz answers."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "mm", "serve", "--port", "0", *args], cwd=ROOT, env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.url = None
        for line in self.proc.stderr:
            self.log.append(line)
            if "listening on " in line:
                self.url = line.split("listening on ")[1].split()[0]
                break
        assert self.url, "server did not start:\n" + "".join(self.log)
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        for _ in range(600):
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("server never answered /healthz:\n" + "".join(self.log))

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=30).text)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """A random tiny-coca (embeds, classifies and captions), 6 image files with an `mm embed` index of them, and
    a shard of 8 samples with its index."""
    d = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model_dir = mm.save_pretrained(mm.create_model("tiny-coca"), d / "coca")
    model = mm.load_pretrained(model_dir).eval()
    (d / "images").mkdir()
    files = []
    for i in range(6):
        path = d / "images" / f"img{i}.{'png' if i % 2 else 'jpg'}"
        colour_image(COLOURS[i % 4], size=36 + 4 * i, seed=i).save(path)
        files.append(path)
    shard = write_tar(d / "shard-0000.tar", colour_samples(8))
    embed_images(model, [d / "images"], d / "emb_files", model_spec=str(model_dir), workers=0)
    embed_images(model, [shard], d / "emb_shards", model_spec=str(model_dir), workers=0)
    return SimpleNamespace(dir=d, model_dir=model_dir, model=model, files=files, shard=shard,
                           indexes={"files": d / "emb_files", "shards": d / "emb_shards"})


@pytest.fixture(scope="module")
def server(data):
    s = Server("--model", str(data.model_dir), "--index", f"files={data.indexes['files']}",
               "--index", f"shards={data.indexes['shards']}", "--max-upload-mb", "4", "--max-pixels", "1000000")
    yield s
    assert s.stop() == 0, "".join(s.log)


def encode_images(model, paths) -> np.ndarray:
    pre = mm.image_transform(model, train=False)
    with torch.no_grad():
        return model.encode_image(torch.stack([pre(load_image(p)) for p in paths]), normalize=True).numpy()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def files_of(*paths: Path, name: str = "image") -> list:
    return [(name, (p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg")) for p in paths]


# -- each endpoint equals the library ------------------------------------------------------------------------
def test_embed_equals_encode_image_and_encode_text(server, data):
    texts = ["a red square", "a photo of something blue", "x"]
    with server.client() as c:
        r = c.post("/v1/embed", files=files_of(*data.files[:3], name="images"), data={"texts": texts})
        assert r.status_code == 200, r.text
        got = r.json()
        j = c.post("/v1/embed", json={"images": [b64(p) for p in data.files[3:]], "texts": texts[:1]}).json()
    tok = mm.get_tokenizer(data.model)
    with torch.no_grad():
        want_t = data.model.encode_text(tok(texts), normalize=True).numpy()
    assert got["dim"] == want_t.shape[1] and len(got["images"]) == 3 and len(got["texts"]) == 3
    np.testing.assert_allclose(got["images"], encode_images(data.model, data.files[:3]), atol=2e-6)
    np.testing.assert_allclose(got["texts"], want_t, atol=2e-6)
    np.testing.assert_allclose(j["images"], encode_images(data.model, data.files[3:]), atol=2e-6)
    np.testing.assert_allclose(j["texts"], want_t[:1], atol=2e-6)


def test_zeroshot_equals_the_library(server, data):
    classes, templates = ["red", "green", "blue", "yellow"], ["a {} square", "a photo of something {}"]
    tok = mm.get_tokenizer(data.model)
    with server.client() as c:
        for path, prompts in zip(data.files[:2], (templates, templates[:1])):  # one template: a list of one
            r = c.post("/v1/zeroshot", files=files_of(path), data={"classes": ",".join(classes),
                                                                    "templates": prompts, "k": "3"})
            assert r.status_code == 200, r.text
            W = mm.zero_shot_classifier(data.model, tok, classes, prompts)
            probs, idx = predict(data.model, W, torch.stack([mm.image_transform(data.model)(load_image(path))]), k=3)
            assert [lab["label"] for lab in r.json()["labels"]] == [classes[i] for i in idx[0].tolist()]
            np.testing.assert_allclose([lab["prob"] for lab in r.json()["labels"]], probs[0].numpy(), atol=1e-5)
        # JSON, OpenAI's default prompts
        r = c.post("/v1/zeroshot", json={"image": b64(data.files[2]), "classes": classes[:2]})
    W = mm.zero_shot_classifier(data.model, tok, classes[:2])
    probs, idx = predict(data.model, W, torch.stack([mm.image_transform(data.model)(load_image(data.files[2]))]))
    assert [lab["index"] for lab in r.json()["labels"]] == idx[0].tolist()
    np.testing.assert_allclose([lab["prob"] for lab in r.json()["labels"]], probs[0].numpy(), atol=1e-5)


def test_caption_equals_mm_caption(server, data):
    tok = mm.get_tokenizer(data.model)
    path = data.files[1]
    cases = [{}, {"method": "greedy", "max_new_tokens": 8},
             {"method": "beam", "num_beams": 3, "no_repeat_ngram_size": 2, "max_new_tokens": 10},
             {"method": "sample", "top_p": 0.9, "seed": 7, "max_new_tokens": 10}]
    with server.client() as c:
        for options in cases:
            r = c.post("/v1/caption", files=files_of(path), data={k: str(v) for k, v in options.items()})
            assert r.status_code == 200, r.text
            kw = {k: v for k, v in options.items() if k != "seed"}
            if "seed" in options:
                kw["generator"] = torch.Generator().manual_seed(options["seed"])
            assert r.json()["caption"] == mm.caption(data.model, tok, [path], **kw)[0], options


def test_search_equals_mm_search_and_serves_the_source_images(server, data, capsys):
    with server.client() as c:
        for name, index in data.indexes.items():
            r = c.post("/v1/search", json={"text": "a red square", "index": name, "k": 4})
            assert r.status_code == 200, r.text
            assert mm_main(["search", "--index", str(index), "--json", "-k", "4", "a red square"]) == 0
            want = json.loads(capsys.readouterr().out)["results"]
            hits = r.json()["results"][name]
            assert [h["id"] for h in hits] == [w["id"] for w in want]
            np.testing.assert_allclose([h["score"] for h in hits], [w["score"] for w in want], atol=1e-5)
        # an image query searches every index; each hit links to the image the index was made from
        r = c.post("/v1/search", files=files_of(data.files[4]), data={"k": "3"})
        assert set(r.json()["results"]) == {"files", "shards"}
        assert mm_main(["search", "--index", str(data.indexes["files"]), "--json", "-k", "3",
                        "--image", str(data.files[4])]) == 0
        want = json.loads(capsys.readouterr().out)["results"]
        hits = r.json()["results"]["files"]
        assert [h["id"] for h in hits] == [w["id"] for w in want] and hits[0]["id"] == data.files[4].name
        assert c.get(hits[0]["image"]).content == data.files[4].read_bytes()
        members = {k: m["jpg"] for k, m in colour_samples(8)}
        for hit in r.json()["results"]["shards"]:
            image = c.get(hit["image"])
            assert image.headers["content-type"] == "image/jpeg" and image.content == members[hit["id"]]


# -- refusals: 4xx with a message, never 500 -------------------------------------------------------------------
class Chunks:
    """A body sent in chunks without a Content-Length (re-iterable: each request sends it anew)."""

    def __init__(self, n: int, size: int = 2**20):
        self.n, self.size = n, size

    def __iter__(self):
        return (b" " * self.size for _ in range(self.n))


def nest(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def bad_requests(data, big: int) -> list[tuple[str, str, dict, int]]:
    """(name, path, httpx request arguments, expected status)."""
    good = data.files[1].read_bytes()
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, format="PNG")  # 16 Mpx in a few kB; the server allows 1 Mpx
    up = lambda blob, t="image/png": {"files": [("image", ("x.png", blob, t))]}  # noqa: E731
    return [
        ("corrupt", "/v1/search", up(os.urandom(3000)), 400),
        ("truncated", "/v1/search", up(good[: len(good) // 2]), 400),
        ("bomb", "/v1/zeroshot", {**up(bomb.getvalue()), "data": {"classes": "a,b"}}, 413),
        ("too big", "/v1/embed", {"files": [("images", ("x.png", b"\0" * big, "image/png"))]}, 413),
        ("too big, chunked", "/v1/embed", {"content": Chunks(big // 2**20 + 1),
                                           "headers": {"content-type": "application/json"}}, 413),
        ("wrong part type", "/v1/search", up(good, "text/plain"), 415),
        ("wrong body type", "/v1/search", {"content": b"a red square", "headers": {"content-type": "text/plain"}}, 415),
        ("bad JSON", "/v1/search", {"content": b'{"text": "a"', "headers": {"content-type": "application/json"}}, 400),
        ("JSON not an object", "/v1/embed", {"json": ["a"]}, 422),
        # past the JSON parser's own recursion guard (CPython's: ~1,000), and past mm's depth limit below it
        ("nested 1,000 deep", "/v1/search", {"content": b'{"text": ' + b"[" * 1000 + b"]" * 1000 + b"}",
                                             "headers": {"content-type": "application/json"}}, 400),
        ("nested 100,000 deep", "/v1/embed", {"content": b"[" * 100_000 + b"]" * 100_000,
                                              "headers": {"content-type": "application/json"}}, 400),
        ("nested 40 deep", "/v1/zeroshot", {"json": {"classes": ["a"], "image": nest(40)}}, 400),
        ("k too large", "/v1/search", {"json": {"text": "a", "k": 10_000}}, 422),
        ("k not a number", "/v1/search", {"json": {"text": "a", "k": "many"}}, 422),
        ("a path for an index", "/v1/search", {"json": {"text": "a", "index": str(data.indexes["files"])}}, 404),
        ("a path as a field", "/v1/search", {"json": {"text": "a", "path": "/etc/passwd"}}, 422),
        ("no query", "/v1/search", {"json": {"k": 3}}, 422),
        ("bad base64", "/v1/embed", {"json": {"images": ["not base64!"]}}, 400),
        ("data URL of text", "/v1/embed", {"json": {"images": ["data:text/html;base64,PGI+"]}}, 415),
        ("nothing to embed", "/v1/embed", {"json": {}}, 422),
        ("no image", "/v1/zeroshot", {"json": {"classes": ["a"]}}, 422),
        ("template without {}", "/v1/zeroshot", {"json": {"image": b64(data.files[0]), "classes": ["a"],
                                                          "templates": ["a photo"]}}, 422),
        ("unknown method", "/v1/caption", {"json": {"image": b64(data.files[0]), "method": "telepathy"}}, 422),
        ("too many beams", "/v1/caption", {"json": {"image": b64(data.files[0]), "num_beams": 500}}, 422),
        ("no box tokens", "/v1/ground", {"json": {"image": b64(data.files[0]), "text": "the red square"}}, 400),
    ]


def test_bad_requests_get_4xx_with_a_message_and_the_server_stays_up(server, data):
    with server.client() as c:
        for name, path, kw, status in bad_requests(data, big=5 * 2**20):
            r = c.post(path, **kw)
            assert r.status_code == status and r.json()["detail"], (name, r.status_code, r.text)
        for path in ("/v1/indexes/files/image?id=../../etc/passwd", "/v1/indexes/nope/image?id=img0.jpg",
                     f"/v1/indexes/files/image?id={data.files[0]}"):
            assert c.get(path).status_code == 404, path
        assert c.get("/healthz").json() == {"status": "ok"}
    m = server.metrics()
    assert not any(k.startswith("mm_requests_total") and 'status="5' in k for k in m), m


def test_metrics_count_requests_batches_and_queues(server, data):
    with server.client() as c:
        assert c.post("/v1/embed", json={"texts": ["a", "b"]}).status_code == 200
    m = server.metrics()
    assert m['mm_requests_total{endpoint="/v1/embed",status="200"}'] >= 1
    assert m['mm_request_duration_seconds_count{endpoint="/v1/embed"}'] >= 1
    assert m['mm_batch_size_count{kind="text"}'] >= 1 and m['mm_queue_depth{kind="image"}'] == 0
    assert "mm_requests_in_flight" in m


def test_page_and_docs_are_served(server):
    with server.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and "<script src=\"/app.js\">" in page.text and "http" not in \
            page.text.replace("http-equiv", "")  # nothing loaded from elsewhere
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert c.get("/app.js").headers["content-type"].startswith("text/javascript")
        assert "/v1/search" in c.get("/openapi.json").json()["paths"]
        assert c.get("/docs").status_code == 200
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": "http://evil.example"}).headers


# -- /v1/ground: a LocCa model's boxes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def locca(data):
    """A server of a random tiny-siglip2 (a LocCa decoder with box tokens) and the model itself."""
    torch.manual_seed(0)
    model_dir = mm.save_pretrained(mm.create_model("tiny-siglip2"), data.dir / "siglip2")
    s = Server("--model", str(model_dir), "--max-pixels", "1000000")
    yield SimpleNamespace(server=s, model=mm.load_pretrained(model_dir).eval())
    assert s.stop() == 0, "".join(s.log)


def test_ground_equals_the_library_and_refuses_bad_requests(locca, data, server):
    from mm.inference.ground import locate

    model, s = locca.model, locca.server
    tok = mm.get_tokenizer(model)
    texts = ["the red square", "a small thing on the left side", "x"]
    with s.client() as c:
        assert c.get("/v1/info").json()["ground"] is True
        # multipart, repeated `text` fields; JSON, one string; several requests at once batch together
        multi = c.post("/v1/ground", files=files_of(data.files[1]), data={"text": texts})
        assert multi.status_code == 200, multi.text
        one = c.post("/v1/ground", json={"image": b64(data.files[2]), "text": "x"})
        with ThreadPoolExecutor(4) as pool:
            many = list(pool.map(lambda p: c.post("/v1/ground", json={"image": b64(p), "text": texts}).json(),
                                 data.files[:4]))
        for path, got, want_texts in [(data.files[1], multi.json(), texts), (data.files[2], one.json(), ["x"])] + \
                [(p, m, texts) for p, m in zip(data.files[:4], many)]:
            want = locate(model, tok, [path] * len(want_texts), want_texts)
            assert [b["text"] for b in got["boxes"]] == want_texts
            np.testing.assert_allclose([b["box"] for b in got["boxes"]], [w.box for w in want], atol=1e-4)
            np.testing.assert_allclose([b["score"] for b in got["boxes"]], [w.score for w in want], atol=1e-4)
            size = Image.open(path).size
            assert all(0 <= b["box"][0] <= b["box"][2] <= size[0] and 0 <= b["box"][1] <= b["box"][3] <= size[1]
                       for b in got["boxes"])
        # refusals: 4xx with a message, never 500
        for body, status in [({"image": b64(data.files[0])}, 422), ({"text": "x"}, 422),
                             ({"image": b64(data.files[0]), "text": []}, 422),
                             ({"image": b64(data.files[0]), "text": ["a", " "]}, 422),
                             ({"image": b64(data.files[0]), "text": ["x"] * 500}, 413),
                             ({"image": "bm90IGFuIGltYWdl", "text": "x"}, 400),
                             ({"image": b64(data.files[0]), "text": "x", "k": 3}, 422)]:
            r = c.post("/v1/ground", json=body)
            assert r.status_code == status and r.json()["detail"], (body.keys(), r.status_code, r.text)
        assert c.get("/healthz").json() == {"status": "ok"}
    assert not any(k.startswith("mm_requests_total") and 'status="5' in k for k in s.metrics())
    assert s.metrics()['mm_requests_total{endpoint="/v1/ground",status="200"}'] >= 6
    # a model without box tokens (tiny-coca): refused, naming what it lacks
    with server.client() as c:
        assert c.get("/v1/info").json()["ground"] is False
        r = c.post("/v1/ground", json={"image": b64(data.files[0]), "text": "x"})
        assert r.status_code == 400 and "decoder.loc_bins" in r.json()["detail"]


# -- options: auth, CORS, refusing to listen on the network without a key ------------------------------------------
def test_the_commands_do_not_import_the_server():
    code = ("import sys, mm.cli; mm.cli.build_parser(); "
            "web = [m for m in ('fastapi', 'uvicorn', 'starlette', 'pydantic') if m in sys.modules]; assert not web, web")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_index_specs_are_named_as_the_caller_names_them(capsys):
    from mm.inference.embed import EmbedError
    from mm.serve.indexes import parse_index_specs

    with pytest.raises(EmbedError, match=r"^a=y: two indexes named 'a' \(give one as NAME=DIR\)$"):
        parse_index_specs(["a=x", "a=y"])
    assert mm_main(["serve", "--model", "tiny-clip", "--index", "a=x", "--index", "a=y"]) == 2
    assert "error: --index a=y: two indexes named 'a'" in capsys.readouterr().err


def test_a_non_loopback_host_needs_an_api_key(data, capsys):
    assert mm_main(["serve", "--model", str(data.model_dir), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_api_key_and_cors_in_process(data):
    from starlette.testclient import TestClient

    from mm.serve.app import ServeSettings, create_app
    from mm.serve.engine import Engine

    settings = ServeSettings(model="coca", api_key="s3cret", cors_origins=("http://app.example",))
    with TestClient(create_app(Engine(data.model), {}, settings)) as c:
        body = {"texts": ["a"]}
        assert c.post("/v1/embed", json=body).status_code == 401
        assert c.post("/v1/embed", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.post("/v1/embed", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/embed", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # no secrets there
        pre = c.options("/v1/embed", headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-origin" not in c.options(
            "/v1/embed", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}).headers


# -- the batcher ---------------------------------------------------------------------------------------------
def _run_batcher(test, run, **kw):
    async def main():
        executor = ThreadPoolExecutor(1)
        b = Batcher("t", run, executor, **{"max_batch": 4, "max_wait": 0.2, "max_queue": 100, **kw})
        b.start()
        try:
            return await test(b)
        finally:
            await b.stop()
            executor.shutdown()
    return asyncio.run(main())


def test_batcher_groups_concurrent_items_up_to_max_batch_and_by_key():
    calls = []

    def run(items):
        calls.append(list(items))
        return [x * 10 for x in items]

    async def test(b):
        plain = await asyncio.gather(*(b.submit([i]) for i in range(10)))
        keyed = await asyncio.gather(*(b.submit([i], key=i % 2) for i in range(20, 26)))
        return plain, keyed
    plain, keyed = _run_batcher(test, run)
    assert plain == [[i * 10] for i in range(10)] and keyed == [[i * 10] for i in range(20, 26)]
    assert calls[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sorted(calls[3:]) == [[20, 22, 24], [21, 23, 25]]
    # no other request on its way: a lone item does not wait its max_wait (an hour here) for company
    calls.clear()
    assert _run_batcher(lambda b: b.submit([7]), run, max_wait=3600, pending=lambda: 1) == [70]
    assert calls == [[7]]


def test_batcher_refuses_when_full_drops_expired_items_and_fails_items_alone():
    gate, started, seen = threading.Event(), threading.Event(), []

    def run(items):
        started.set()
        gate.wait(30)
        seen.extend(items)
        return [ValueError(f"bad {x}") if x == "bad" else x for x in items]

    async def test(b):
        first = asyncio.ensure_future(b.submit(["first"]))
        while not started.is_set():  # until the model thread holds "first"
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(b.submit(["ok", "ok2"]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit(["x", "y"])  # 2 waiting + 2 > 3
        with pytest.raises(Timeout):
            await b.submit(["late"], timeout=0.05)
        bad = asyncio.ensure_future(b.submit(["bad"]))
        gate.set()
        with pytest.raises(ValueError, match="bad bad"):
            await bad
        return await first, await queued
    assert _run_batcher(test, run, max_queue=3, max_batch=1, max_wait=0) == (["first"], ["ok", "ok2"])
    assert "late" not in seen  # its request gave up before the model reached it


# -- a storm, overload, shutdown, the browser (slow, except shutdown) --------------------------------------------
@pytest.mark.slow
def test_a_storm_of_good_and_bad_requests_leaves_every_good_one_answered(server, data):
    want = encode_images(data.model, data.files)
    bad = bad_requests(data, big=50 * 10**6)
    tok = mm.get_tokenizer(data.model)
    with torch.no_grad():
        want_t = data.model.encode_text(tok([f"text {i}" for i in range(40)]), normalize=True).numpy()

    def one(i: int):
        with server.client() as c:
            if i % 3 == 0:
                name, path, kw, status = bad[(i // 3) % len(bad)]
                r = c.post(path, **kw)
                return name, r.status_code == status, r.status_code
            j = i % len(data.files)
            r = c.post("/v1/embed", files=files_of(data.files[j], name="images"), data={"texts": [f"text {i % 40}"]})
            ok = r.status_code == 200 and np.allclose(r.json()["images"][0], want[j], atol=1e-5) \
                and np.allclose(r.json()["texts"][0], want_t[i % 40], atol=1e-5)
            return "good", ok, r.status_code
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(240)))
    failed = [r for r in results if not r[1]]
    assert not failed, failed
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert server.proc.poll() is None


@pytest.mark.slow
def test_overload_answers_503_with_retry_after(data):
    # batches wait 3 s for company and the queue holds 8 items: a burst of 48 overflows it at once
    s = Server("--model", str(data.model_dir), "--max-queue", "8", "--max-batch", "64", "--max-wait-ms", "3000")
    try:
        want = encode_images(data.model, data.files[:1])[0]

        def one(_):
            r = httpx.post(s.url + "/v1/embed", files=files_of(data.files[0], name="images"), timeout=60)
            return r.status_code, r.headers.get("retry-after"), r.json()
        with ThreadPoolExecutor(48) as pool:
            results = list(pool.map(one, range(48)))
        codes = [c for c, _, _ in results]
        assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 8, codes
        assert all(ra and int(ra) >= 1 for c, ra, _ in results if c == 503)
        assert all(np.allclose(b["images"][0], want, atol=1e-5) for c, _, b in results if c == 200)
        assert s.metrics()['mm_rejected_total{kind="image",reason="queue_full"}'] == codes.count(503)
    finally:
        assert s.stop() == 0


def multipart_request(url: str, path: Path) -> bytes:
    """A whole HTTP/1.1 POST of ``path`` to /v1/embed, as a client writes it to its socket."""
    body = (b'--b0undary\r\nContent-Disposition: form-data; name="images"; filename="x"\r\n'
            b"Content-Type: image/png\r\n\r\n" + path.read_bytes() + b"\r\n--b0undary--\r\n")
    return (f"POST /v1/embed HTTP/1.1\r\nHost: {url.split('//')[1]}\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n").encode() + body


def test_sigterm_finishes_in_flight_requests(data):
    """Uploads half sent when SIGTERM comes: the server stops accepting connections, waits for the rest of
    those bodies, answers them correctly, then exits 0."""
    import socket

    s = Server("--model", str(data.model_dir))
    host, port = s.url.split("//")[1].rsplit(":", 1)
    raws = [multipart_request(s.url, p) for p in data.files]
    socks = [socket.create_connection((host, int(port)), timeout=60) for _ in raws]
    for sock, raw in zip(socks, raws):
        sock.sendall(raw[: len(raw) // 2])
    for _ in range(600):  # until the server handles every one of them (and this scrape)
        if s.metrics()["mm_requests_in_flight"] == len(raws) + 1:
            break
        time.sleep(0.05)
    s.proc.send_signal(signal.SIGTERM)
    for _ in range(600):  # it stops accepting new connections...
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            time.sleep(0.05)
        except OSError:
            break
    else:
        raise AssertionError("the server still accepts connections after SIGTERM")
    answers = []
    for sock, raw in zip(socks, raws):  # ...and answers the requests it had
        sock.sendall(raw[len(raw) // 2:])
        reply = b""
        while chunk := sock.recv(1 << 16):
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), reply[:300]
        answers.append(json.loads(body)["images"][0])
        sock.close()
    assert s.proc.wait(timeout=60) == 0, "".join(s.log)
    np.testing.assert_allclose(answers, encode_images(data.model, data.files), atol=1e-5)

class Chromium:
    """Headless Chromium driven over its DevTools protocol through ``--remote-debugging-pipe`` (fds 3 and 4):
    no driver package, no port. Records console errors and uncaught exceptions of the page."""

    def __init__(self, binary: str, profile: Path):
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
               "--mute-audio", "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        # the pipe ends become the browser's fd 3 (commands in) and fd 4 (replies out)
        self.proc = subprocess.Popen(["sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', "sh", *cmd],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.next_id, self.replies, self.errors = 0, {}, []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def _read(self) -> None:
        buf = b""
        while chunk := self.proc.stdout.read1(1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                method = msg.get("method", "")
                if method == "Runtime.exceptionThrown":
                    self.errors.append(msg["params"]["exceptionDetails"].get("text", "exception"))
                elif method == "Runtime.consoleAPICalled" and msg["params"]["type"] in ("error", "assert"):
                    self.errors.append(str(msg["params"]["args"]))
                elif method == "Log.entryAdded" and msg["params"]["entry"]["level"] == "error":
                    self.errors.append(msg["params"]["entry"]["text"])
                with self.cond:
                    if "id" in msg:
                        self.replies[msg["id"]] = msg
                    self.cond.notify_all()

    def send(self, method: str, session: str | None = None, **params) -> dict:
        with self.cond:
            self.next_id += 1
            i = self.next_id
        msg = {"id": i, "method": method, "params": params, **({"sessionId": session} if session else {})}
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        with self.cond:
            assert self.cond.wait_for(lambda: i in self.replies, timeout=60), f"no reply to {method}"
            reply = self.replies.pop(i)
        assert "error" not in reply, reply
        return reply["result"]

    def call(self, method: str, **params) -> dict:
        return self.send(method, self.session, **params)

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"never true: {expression}")

    def upload(self, selector: str, path: Path) -> None:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


RENDERED_HITS = ("JSON.stringify([...document.querySelectorAll('#search-results .hit')].map(h => [h.dataset.id, "
                 "Number(h.dataset.score), h.querySelector('b').textContent, h.querySelector('img') ? "
                 "h.querySelector('img').naturalWidth : -1]))")
IDLE = "document.body.dataset.busy === '0'"


@pytest.mark.slow
def test_the_page_in_headless_chromium(server, data, tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    browser = Chromium(binary, tmp_path / "profile")
    try:
        browser.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True)
        browser.call("Page.navigate", url=server.url + "/")
        browser.wait_for("document.body && document.body.dataset.ready === '1'")
        # a text search: typed, submitted, rendered as a grid of images with scores
        browser.js("document.getElementById('search-index').value = 'files'; "
                   "document.getElementById('search-k').value = '4'; document.getElementById('search-text').focus()")
        browser.call("Input.insertText", text="a red square")
        browser.js("document.querySelector('#search-form button').click()")
        browser.wait_for(f"document.querySelectorAll('#search-results .hit').length === 4 && {IDLE} && "
                         "[...document.querySelectorAll('#search-results img')].every(i => i.dataset.loaded === '1')")
        rendered = json.loads(browser.js(RENDERED_HITS))
        want = httpx.post(server.url + "/v1/search", json={"text": "a red square", "index": "files", "k": 4}).json()
        assert [r[0] for r in rendered] == [h["id"] for h in want["results"]["files"]]
        assert [r[2] for r in rendered] == [f"{h['score']:.3f}" for h in want["results"]["files"]]
        sizes = {p.name: Image.open(p).width for p in data.files}
        assert [r[3] for r in rendered] == [sizes[r[0]] for r in rendered]  # the indexed images themselves
        # an image query: uploaded through the file input
        browser.upload("#search-file", data.files[3])
        browser.wait_for(f"document.getElementById('search-status').textContent.includes('the image') && {IDLE}")
        assert json.loads(browser.js(RENDERED_HITS))[0][0] == data.files[3].name
        # zero-shot probabilities for an uploaded image
        browser.js("document.getElementById('zs-classes').value = 'red, green, blue, yellow'")
        browser.upload("#zs-file", data.files[0])
        browser.wait_for(f"document.querySelectorAll('#zs-results li').length === 4 && {IDLE}")
        shown = json.loads(browser.js("JSON.stringify([...document.querySelectorAll('#zs-results li')].map(li => "
                                      "[li.dataset.label, Number(li.dataset.prob)]))"))
        api = httpx.post(server.url + "/v1/zeroshot", files=files_of(data.files[0]),
                         data={"classes": ["red", "green", "blue", "yellow"], "k": "4"}).json()["labels"]
        assert [s[0] for s in shown] == [a["label"] for a in api]
        np.testing.assert_allclose([s[1] for s in shown], [a["prob"] for a in api], atol=1e-6)
        # a caption
        browser.upload("#cap-file", data.files[1])
        browser.wait_for(f"document.getElementById('cap-result').textContent.length > 0 && {IDLE}")
        tok = mm.get_tokenizer(data.model)
        assert browser.js("document.getElementById('cap-result').textContent") == \
            mm.caption(data.model, tok, [data.files[1]])[0]
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        out = Path(os.environ.get("MM_SCREENSHOT_DIR", tmp_path)) / "serve_page.png"
        out.write_bytes(base64.b64decode(shot["data"]))
        assert Image.open(out).width == 390 * 2
        print(f"screenshot: {out}")
        assert browser.errors == [], browser.errors
    finally:
        browser.close()
