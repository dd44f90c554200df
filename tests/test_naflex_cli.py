"""``--seq-len``: zero-shot, eval, embed, search and serve read images as NaFlex patch sequences at their own aspect
ratio, and give what the library gives for each image alone."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mm_in_process
from PIL import Image

import mm
from mm.data.aspect import generate_aspect
from mm.data.folder import load_image
from mm.data.transforms import image_transform
from mm.inference.embed import load_index
from mm.models.patches import Patches

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MM_SERVE_API_KEY": ""}
SEQ = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("naflex_cli")
    torch.manual_seed(0)
    model_dir = mm.save_pretrained(mm.create_model("tiny-clip"), d / "clip")
    generate_aspect(d / "shards", n_train=30, n_test=30, long_side=48, samples_per_shard=30, verbose=False)
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(96, 24), (24, 96), (40, 40), (70, 35), (33, 66)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / "images" / f"im{i}.png")
    return d, model_dir, mm.load_pretrained(model_dir).eval()


def _alone(model, paths, seq_len=SEQ) -> np.ndarray:
    """Each image's embedding computed on its own (no padding, no batch)."""
    pre = image_transform(model, seq_len=seq_len)
    out = []
    with torch.no_grad():
        for p in paths:
            patches, grid, _ = pre(load_image(p))
            out.append(model.encode_image(Patches.stack([(patches, grid)]), normalize=True)[0].numpy())
    return np.stack(out)


def _mm(*args: str) -> subprocess.CompletedProcess:
    return mm_in_process(*args)


def test_embed_and_search_read_images_at_their_aspect_ratio(data, tmp_path):
    d, model_dir, model = data
    paths = sorted((d / "images").glob("*.png"))
    r = _mm("embed", "--model", str(model_dir), "--images", str(d / "images"), "--out", str(tmp_path / "emb"),
            "--seq-len", str(SEQ), "--batch-size", "3", "--workers", "0")
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "emb" / "index.json").read_text())
    assert index["seq_len"] == SEQ
    emb, ids = load_index(tmp_path / "emb")
    order = [ids.index(p.name) for p in paths]
    np.testing.assert_allclose(emb[order], _alone(model, paths), atol=2e-5)  # padded batches of 3 = each alone
    square = _mm("embed", "--model", str(model_dir), "--images", str(d / "images"), "--out", str(tmp_path / "sq"),
                 "--workers", "0")
    assert square.returncode == 0 and not np.allclose(load_index(tmp_path / "sq")[0], emb)
    # a rerun into the NaFlex index without --seq-len is another run: refused by name
    again = _mm("embed", "--model", str(model_dir), "--images", str(d / "images"), "--out", str(tmp_path / "emb"))
    assert again.returncode != 0 and "seq_len" in again.stderr
    # an image query is read as the index's images were: each image finds itself first
    for p in paths[:2]:
        r = _mm("search", "--index", str(tmp_path / "emb"), "--image", str(p), "-k", "1", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["results"][0]["id"] == p.name


def test_zeroshot_and_eval_take_seq_len(data):
    d, model_dir, model = data
    shard = str(d / "shards" / "test-000000.tar.gz")
    outs = {}
    for seq in (SEQ, 64):
        r = _mm("eval", "--model", str(model_dir), "--zeroshot", shard, "--seq-len", str(seq), "--workers", "0")
        assert r.returncode == 0, r.stderr
        outs[seq] = json.loads(r.stdout)
    assert outs[SEQ]["zeroshot_n"] == 30
    r = _mm("zeroshot", "--model", str(model_dir), "--seq-len", str(SEQ), "--classes", "a,b,c", "--workers", "0",
            str(d / "images"))
    assert r.returncode == 0, r.stderr
    assert len([line for line in r.stdout.splitlines() if line.strip()]) == 5
    # bad values fail before any work, naming the flag; a model that cannot take patch sequences says why
    r = _mm("zeroshot", "--model", str(model_dir), "--seq-len", "0", "--classes", "a,b", str(d / "images"))
    assert r.returncode == 2 and "--seq-len" in r.stderr and "must be >= 1" in r.stderr
    r = _mm("zeroshot", "--model", "tiny-siglip2", "--seq-len", "16", "--classes", "a,b", str(d / "images"))
    assert r.returncode == 2 and "--seq-len" in r.stderr and "stem" in r.stderr


def test_serve_embeds_naflex_images_as_the_library_does(data):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    d, model_dir, model = data
    paths = sorted((d / "images").glob("*.png"))
    proc = subprocess.Popen([sys.executable, "-m", "mm", "serve", "--port", "0", "--model", str(model_dir),
                             "--seq-len", str(SEQ)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        url, log = None, []
        for line in proc.stderr:
            log.append(line)
            if "listening on " in line:
                url = line.split("listening on ")[1].split()[0]
                break
        assert url, "".join(log)
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=120) as c:
            r = c.post("/v1/embed", json={"images": [base64.b64encode(p.read_bytes()).decode() for p in paths]})
            assert r.status_code == 200, r.text
            got = np.array(r.json()["images"], np.float32)
            np.testing.assert_allclose(got, _alone(model, paths), atol=2e-5)
            assert c.get("/healthz").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
