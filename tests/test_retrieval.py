"""Retrieval-augmented captioning (mm.inference.retrieval, mm.data.retrieved, `mm retrieve`, `mm caption
--datastore`, data.retrieval): a datastore built from shards names each caption's sample and never returns a
training image's own captions (checked against a brute-force ranking), retrieval is deterministic, k = 0 is
exactly plain captioning (sequences, loss, generated captions), and a training run reading retrieved captions
resumes exactly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_same_run, colour_image, jpeg_bytes, sigterm_when, write_tar

import mm
from mm.cli import main as mm_main
from mm.data.retrieved import RetrievalPrompts, read_retrieved
from mm.inference.embed import embed_images, embed_texts, load_index
from mm.inference.retrieval import Datastore, caption_with_datastore, retrieve, split_id, write_retrieved

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow"]
CONTEXT = 64


def samples(n: int) -> list[tuple[str, dict[str, bytes]]]:
    """Colour squares, each with three captions naming its sample (json ``captions``; ``txt``: the first)."""
    out = []
    for i in range(n):
        c = COLOURS[i % 4]
        caps = [f"a {c} square number {i} view {j}" for j in range(3)]
        out.append((f"s{i:04d}", {"jpg": jpeg_bytes(colour_image(c, 36, seed=i)), "txt": caps[0].encode(),
                                  "json": json.dumps({"captions": caps}).encode()}))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("retrieval")
    shards = [write_tar(d / f"train-{i}.tar", samples(24)[12 * i:12 * (i + 1)]) for i in range(2)]
    spec = f"{d}/train-{{0..1}}.tar"
    torch.manual_seed(0)
    model_dir = mm.save_pretrained(mm.create_model("tiny-coca", text__context_length=CONTEXT), d / "coca")
    model = mm.load_pretrained(model_dir).eval()
    embed_texts(model, spec, d / "captions", model_spec=str(model_dir), workers=0)
    embed_images(model, [spec], d / "images", model_spec=str(model_dir), workers=0)
    return SimpleNamespace(dir=d, shards=shards, spec=spec, model_dir=model_dir, model=model)


def test_a_datastore_of_shards_names_each_captions_sample(setup):
    emb, ids = load_index(setup.dir / "captions")
    assert len(ids) == 24 * 3 and ids[4] == "s0001#1: a green square number 1 view 1"
    assert split_id(ids[4]) == ("s0001", "a green square number 1 view 1")
    assert split_id("12: a line of a text file") == (None, "a line of a text file")


def test_retrieval_leaves_out_the_images_own_captions_and_ranks_as_brute_force(setup):
    caps_emb, cap_ids = load_index(setup.dir / "captions")
    img_emb, keys = load_index(setup.dir / "images")
    store = Datastore(setup.dir / "captions")
    got = retrieve(store, img_emb, 5, keys)
    for q, key in enumerate(keys):  # the brute-force ranking: every caption's cosine, own sample's removed
        scores = caps_emb @ img_emb[q]
        order = sorted(range(len(cap_ids)), key=lambda i: (-scores[i], i))
        want = [split_id(cap_ids[i])[1] for i in order if split_id(cap_ids[i])[0] != key][:5]
        assert got[q] == want
        assert not any(f"number {int(key[1:])} view" in c for c in got[q])
    # without the exclusion an image can find its own captions: what the exclusion is for
    own = retrieve(store, img_emb, 5)
    assert own != got
    write_retrieved(setup.dir / "captions", setup.dir / "images", setup.dir / "r1.jsonl", 3)
    write_retrieved(setup.dir / "captions", setup.dir / "images", setup.dir / "r2.jsonl", 3)
    assert (setup.dir / "r1.jsonl").read_bytes() == (setup.dir / "r2.jsonl").read_bytes()  # deterministic
    found = read_retrieved(setup.dir / "r1.jsonl", 3)
    assert sorted(found) == keys and all(found[k] == got[i][:3] for i, k in enumerate(keys))


def test_prompts_fit_the_context_and_k0_is_plain_captioning(setup):
    tok = mm.get_tokenizer(setup.model)
    p = RetrievalPrompts(tok, CONTEXT, 2)
    long = "word " * 200
    ids, targets = p.sequence([long, "a blue square"], "a red square")
    assert len(ids) <= CONTEXT and ids[0] == tok.sot_id and ids[-1] == tok.eot_id
    assert tok.decode([i for i, t in zip(ids, targets) if t][:-1]) == "a red square"  # the loss: the caption only
    assert "this image shows" in tok.decode(ids) and "a blue square" in tok.decode(ids)
    with pytest.raises(ValueError, match="no room for 8 retrieved captions"):
        RetrievalPrompts(tok, 32, 8)
    # k = 0: the plain caption sequence, so the decoder's loss is plain CoCa's
    zero = RetrievalPrompts(tok, CONTEXT, 0)
    tokens, targets = zero.tensors(*zero.sequence([], "a red square number 3"))
    plain = tok(["a red square number 3"])[0]
    assert torch.equal(tokens, plain)
    x = torch.stack([mm.image_transform(setup.model)(colour_image("red", 36))])
    with torch.no_grad():
        a = setup.model(x, plain[None])
        b = setup.model(x, plain[None], decoder_tokens=tokens[None], decoder_targets=targets[None])
    assert torch.equal(a.caption_labels, b.caption_labels)
    torch.testing.assert_close(a.caption_logits, b.caption_logits, rtol=0, atol=1e-6)


def test_captions_with_a_datastore_and_k0_equal_plain_captions(setup):
    model, tok = setup.model, mm.get_tokenizer(setup.model)
    images = [colour_image(c, 36, seed=50 + i) for i, c in enumerate(COLOURS)]
    store = Datastore(setup.dir / "captions")
    plain = mm.caption(model, tok, images, method="greedy", max_new_tokens=8)
    zero, found = caption_with_datastore(model, tok, images, store, model, 0, method="greedy", max_new_tokens=8)
    assert zero == plain and found == [[]] * 4
    caps, found = caption_with_datastore(model, tok, images, store, model, 2, method="greedy", max_new_tokens=8)
    assert len(caps) == 4 and all(len(f) == 2 for f in found)
    x = torch.stack([mm.image_transform(model)(im) for im in images])
    with torch.no_grad():
        assert found == retrieve(store, model.encode_image(x, normalize=True).numpy(), 2)


def test_retrieve_and_caption_commands(setup, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert mm_main(["retrieve", "--datastore", str(setup.dir / "captions"), "--queries", str(setup.dir / "images"),
                    "--out", str(out), "--k", "2"]) == 0
    assert len(read_retrieved(out, 2)) == 24
    assert mm_main(["retrieve", "--datastore", str(setup.dir / "images"), "--queries", str(setup.dir / "images"),
                    "--out", str(out)]) == 2
    assert "a datastore holds captions" in capsys.readouterr().err
    img = tmp_path / "red.jpg"
    colour_image("red", 36, seed=99).save(img)
    assert mm_main(["caption", "--model", str(setup.model_dir), str(img), "--datastore", str(setup.dir / "captions"),
                    "--k", "2", "--method", "greedy", "--max-new-tokens", "6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(row["retrieved"]) == 2 and isinstance(row["caption"], str)


def _config(tmp_path: Path, setup: SimpleNamespace, out: str, retrieved: Path) -> Path:
    cfg = {"model": "tiny-coca",
           "data": {"train": setup.spec, "workers": 2, "shuffle_buffer": 8, "batch_size": 6,
                    "retrieval": {"captions": str(retrieved), "k": 2}},
           "train": {"steps": 6, "warmup_steps": 1, "lr": 1e-3, "checkpoint_every": 0, "log_every": 1, "seed": 3},
           "output_dir": str(tmp_path / out)}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SMALL = [f"model.text.context_length={CONTEXT}", "model.vision.transformer.depth=2"]


def _train(config: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), str(config), *SMALL], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_a_run_without_retrieved_captions_for_its_data_fails_before_work(setup, tmp_path, capsys):
    cfg = _config(tmp_path, setup, "bad", tmp_path / "missing.jsonl")
    assert mm_main(["train", str(cfg), *SMALL]) == 2
    assert "data.retrieval.captions: file" in capsys.readouterr().err


@pytest.mark.slow
def test_a_retrieval_augmented_run_resumes_exactly(setup, tmp_path):
    """A SIGTERM after step 3 of 6: the resumed run has the same losses and ends with the same weights as an
    uninterrupted run, bit for bit (the prompts are read by sample key: nothing to store)."""
    retrieved = tmp_path / "r.jsonl"
    write_retrieved(setup.dir / "captions", setup.dir / "images", retrieved, 2)
    _train(_config(tmp_path, setup, "full", retrieved))
    cfg = _config(tmp_path, setup, "split", retrieved)
    sigterm_when([sys.executable, str(ROOT / "train.py"), str(cfg), *SMALL], tmp_path / "split" / "metrics.jsonl",
                 '"step": 3', ROOT)
    _train(cfg)
    assert_same_run(tmp_path / "full", tmp_path / "split", 6, keys=("loss", "caption_loss"))


def test_the_training_stream_gives_the_decoder_each_samples_retrieved_captions(setup, tmp_path):
    from mm.config import from_dict
    from mm.data.decode import BadSample
    from mm.data.retrieved import RetrievalDecoder
    from mm.data.wds import iter_shard
    from mm.train.config import RunConfig
    from mm.train.feed import DataState, build_train_stream

    retrieved = tmp_path / "r.jsonl"
    write_retrieved(setup.dir / "captions", setup.dir / "images", retrieved, 2)
    found = read_retrieved(retrieved, 2)
    cfg = from_dict(RunConfig, {"model": "tiny-coca", "data": {"train": setup.spec, "workers": 0, "batch_size": 4,
                                                                "retrieval": {"captions": str(retrieved), "k": 2}}})
    stream = build_train_stream(cfg, setup.model, 0, 1, DataState())
    batch = next(iter(stream))
    tok = mm.get_tokenizer(setup.model)
    for key, text, seq, tgt in zip(batch["keys"], batch["texts"], batch["decoder_tokens"], batch["decoder_targets"]):
        prompts = RetrievalPrompts(tok, CONTEXT, 2)
        want, want_t = prompts.tensors(*prompts.sequence(found[key], text))
        assert torch.equal(seq, want) and torch.equal(tgt, want_t)
        assert found[key][0].split(" view")[0] in tok.decode(seq.tolist())
    # a sample the file does not hold is skipped, named (the stream counts it as a bad sample)
    retrieved.write_text("")
    decoder = RetrievalDecoder(mm.image_transform(setup.model), RetrievalPrompts(tok, CONTEXT, 2), retrieved,
                               image_keys=["jpg"])
    with pytest.raises(BadSample, match=r"no retrieved captions.*'s0000' is not in"):
        decoder(next(iter_shard(str(setup.shards[0]), warn=print)))


@pytest.mark.slow  # a server process (~10 s on 2 cores): the second CI step
def test_serve_captions_with_a_datastore(setup, tmp_path):
    pytest.importorskip("fastapi")
    from test_serve import Server, b64

    img = tmp_path / "blue.png"
    colour_image("blue", 36, seed=77).save(img)
    model, tok = setup.model, mm.get_tokenizer(setup.model)
    store = Datastore(setup.dir / "captions")
    want, found = caption_with_datastore(model, tok, [mm.data.folder.load_image(img)], store, model, 2,
                                         method="greedy", max_new_tokens=6)
    plain = mm.caption(model, tok, [mm.data.folder.load_image(img)], method="greedy", max_new_tokens=6)
    server = Server("--model", str(setup.model_dir), "--datastore", str(setup.dir / "captions"), "--k", "2")
    try:
        with server.client() as c:
            body = {"image": b64(img), "method": "greedy", "max_new_tokens": 6}
            r = c.post("/v1/caption", json=body)
            assert r.status_code == 200, r.text
            assert r.json() == {"caption": want[0], "retrieved": found[0]}
            r = c.post("/v1/caption", json={**body, "k": 0})  # no retrieval: the plain caption
            assert r.json() == {"caption": plain[0]}
            r = c.post("/v1/caption", json={**body, "k": -1})
            assert r.status_code == 422 and "k" in r.json()["detail"]
    finally:
        assert server.stop() == 0
