"""`mm curate` (mm.inference.curate, curate_rules, dedup): scores are the model's own image-caption cosines; corrupt
samples are named in the skip log and the run goes on; a killed scoring run resumes to identical outputs; each rule
keeps what it says (checked against the pool's own columns); SemDeDup removes planted near-duplicates and nothing
else; DataComp's clustering filter keeps the target's clusters; recipes with an unknown rule or a value out of range
fail before any work; resharding keeps exactly the kept samples, byte for byte; data.keep trains on kept keys only."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_image, jpeg_bytes, png_bytes, two_gloo_ranks, write_tar
from PIL import Image

import mm
from mm.cli import main as mm_main
from mm.data.wds import iter_shard, shard_keys
from mm.inference import dedup
from mm.inference.curate import balanced_sizes
from mm.inference.curate_rules import Pool
from mm.inference.embed import load_index, model_fingerprint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
COLOURS = ["red", "green", "blue", "yellow"]
COPIES = {"p00016": "p00000", "p00017": "p00005", "p00018": "p00005", "p00019": "p00007"}  # exact image copies
BAD = {"p00009": "undecodable image", "p00010": "no caption", "p00011": "empty caption"}


def _sample(i: int, size: tuple[int, int] = (40, 40), caption: str | None = None) -> dict[str, bytes]:
    """A noisy colour image of ``size`` (every third a PNG, the others JPEG) and its caption."""
    c = COLOURS[i % 4]
    img = colour_image(c, max(size), seed=i).resize(size)
    out = {"png": png_bytes(img)} if i % 3 == 0 else {"jpg": jpeg_bytes(img)}
    out["txt"] = (caption if caption is not None else f"a {c} square number {i}").encode()
    return out


def _pool_samples() -> list[list[tuple[str, dict[str, bytes]]]]:
    """Four shards: plain samples of several sizes, aspect ratios and caption lengths; corrupt ones; captions shared
    by three samples; exact copies of images under new keys (one a .jpeg with a json); a shard cut off mid-file."""
    s0 = [(f"p{i:05d}", _sample(i)) for i in range(8)]
    s0[1] = ("p00001", _sample(1, (24, 24)))
    s0[2] = ("p00002", _sample(2, (120, 30)))
    s0[3] = ("p00003", _sample(3, caption="red"))
    s0[4] = ("p00004", _sample(4, caption="a very long caption with many many words in it ok"))
    s1 = [(f"p{i:05d}", _sample(i)) for i in range(8, 16)]
    s1[1] = ("p00009", {"jpg": b"\xff\xd8\xff\xe0 not a JPEG at all", "txt": b"a broken image"})
    s1[2] = ("p00010", {"jpg": _sample(10)["jpg"]})
    s1[3] = ("p00011", {"jpg": _sample(11)["jpg"], "txt": b"   "})
    for j, cap in ((4, "a photo of a thing"), (5, "A  photo of a THING"), (6, "a photo of a thing")):
        s1[j] = (f"p{8 + j:05d}", _sample(8 + j, caption=cap))
    first = dict(s0)
    s2 = []
    for key, src in COPIES.items():
        image = next(v for k, v in first[src].items() if k != "txt")
        members = {"txt": f"a copy of {src}".encode()}
        if key == "p00019":
            members.update({"jpeg": image, "json": b'{"source": "p00007", "note": "re-uploaded"}'})
        else:
            members["jpg" if image[:2] == b"\xff\xd8" else "png"] = image
        s2.append((key, members))
    s3 = [(f"p{i:05d}", _sample(i)) for i in range(20, 24)]
    return [s0, s1, s2, s3]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pool")
    for n, samples in enumerate(_pool_samples()):
        write_tar(d / f"pool-{n:04d}.tar", samples)
    last = d / "pool-0003.tar"
    with tarfile.open(last) as tar:
        m = tar.getmember("p00023.jpg")
    data = last.read_bytes()
    last.write_bytes(data[:m.offset_data + m.size // 2])  # cut off inside p00023's image
    return d


def _good_keys() -> list[str]:
    keys = [k for shard in _pool_samples() for k, _ in shard if k not in BAD]
    return [k for k in keys if k != "p00023"]


SPEC = "pool-{0000..0003}.tar"


@pytest.fixture(scope="module")
def scored(pool_dir, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scored") / "scores"
    assert mm_main(["curate", "score", "--model", str(model_dir), "--data", str(pool_dir / SPEC), "--out", str(out),
                    "--batch-size", "3", "--workers", "1"]) == 0
    return out


def _reference(model, pool_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, str, tuple[int, int]]]:
    """Per good sample: (encode_image, encode_text, caption, size), straight from the model."""
    pre, tok = mm.image_transform(model, train=False), mm.get_tokenizer(model)
    out = {}
    for shard in sorted(pool_dir.glob("pool-*.tar")):
        for s in iter_shard(str(shard), lambda m: None):
            if s["__key__"] in BAD:
                continue
            img = Image.open(io.BytesIO(next(s[k] for k in ("jpg", "jpeg", "png") if k in s))).convert("RGB")
            cap = s["txt"].decode().strip()
            with torch.no_grad():
                i = model.encode_image(pre(img)[None], normalize=True)[0].numpy()
                t = model.encode_text(tok([cap]), normalize=True)[0].numpy()
            out[s["__key__"]] = (i, t, cap, img.size)
    return out


def _pool_columns(scored: Path) -> dict[str, dict]:
    """key -> {score, caption, width, height}, read from the part files directly."""
    index = json.loads((scored / "scores.json").read_text())
    cols = {}
    for p in index["parts"]:
        meta = json.loads((scored / p["meta"]).read_text())
        for k, s, c, w, h in zip(meta["keys"], np.load(scored / p["scores"]), meta["captions"], meta["width"],
                                 meta["height"]):
            cols[k] = {"score": float(s), "caption": c, "width": w, "height": h}
    return cols


def test_scores_are_the_models_image_caption_cosines(scored, model, model_dir, pool_dir, capsys):
    ref = _reference(model, pool_dir)
    keys = _good_keys()
    assert sorted(ref) == sorted(keys)
    img, img_ids = load_index(scored / "images")
    txt, txt_ids = load_index(scored / "texts")
    assert img_ids == keys  # shard order, then order in the shard; bad samples and the cut-off one left out
    assert txt_ids == [f"{k}#0: {ref[k][2]}" for k in keys]  # a caption datastore's ids
    np.testing.assert_allclose(img, np.stack([ref[k][0] for k in keys]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(txt, np.stack([ref[k][1] for k in keys]), atol=1e-5, rtol=0)
    cols = _pool_columns(scored)
    want = np.array([float(ref[k][0] @ ref[k][1]) for k in keys])
    np.testing.assert_allclose([cols[k]["score"] for k in keys], want, atol=1e-5, rtol=0)
    assert all((cols[k]["width"], cols[k]["height"]) == ref[k][3] for k in keys)
    assert (cols["p00002"]["width"], cols["p00002"]["height"]) == (120, 30)
    index = json.loads((scored / "scores.json").read_text())
    assert index["count"] == len(keys) and index["model_fingerprint"] == model_fingerprint(model)
    assert index["model"] == str(model_dir.resolve()) and index["repeated_keys"] == 0
    for sub in ("images", "texts"):  # embed outputs in their own right: search answers from them
        assert json.loads((scored / sub / "index.json").read_text())["model_fingerprint"] == index["model_fingerprint"]
    assert mm_main(["search", "--index", str(scored / "texts"), "--json", "a photo of a thing", "-k", "2"]) == 0
    found = [r["id"].split("#")[0] for r in json.loads(capsys.readouterr().out)["results"]]
    assert set(found) <= {"p00012", "p00013", "p00014"}  # the three samples with that caption (case aside)


def test_corrupt_samples_are_named_in_the_skip_log_and_the_run_goes_on(scored, pool_dir):
    lines = (scored / "skipped.txt").read_text().splitlines()
    by_key = {line.split("\t")[0].rsplit(":", 1)[1]: line.split("\t")[1] for line in lines if ".tar:" in line}
    assert {k: v.split(":")[0] for k, v in by_key.items()} == BAD
    cut = [line for line in lines if line.startswith(f"{pool_dir / 'pool-0003.tar'}\t")]
    assert len(cut) == 1 and "cut off or unreadable after 3 samples" in cut[0]  # its 3 complete samples scored
    assert json.loads((scored / "scores.json").read_text())["skipped"] == len(lines) == 4
    assert {"p00020", "p00021", "p00022"} <= set(load_index(scored / "images")[1])


def test_a_rerun_into_the_directory_must_ask_the_same(scored, pool_dir, capsys, tmp_path):
    """Another model or other shards: refused before the model is loaded (a preset name would load in no time, a
    missing directory would fail to load: the message is the plan's); input that is not shards: refused."""
    spec = str(pool_dir / SPEC)
    assert mm_main(["curate", "score", "--model", str(tmp_path / "nope"), "--data", spec, "--out", str(scored)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {scored} holds a scoring run with different model") and err.count("\n") == 1
    assert mm_main(["curate", "score", "--model", str(tmp_path / "nope"), "--data", str(pool_dir),
                    "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow  # a real process killed and rerun (~15 s on 2 cores)
def test_a_killed_scoring_run_resumes_to_identical_outputs(model_dir, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for s in range(12):
        write_tar(d / f"s-{s:04d}.tar", [(f"k{s:02d}{i:03d}", _sample(s * 8 + i)) for i in range(8)])
    cmd = [sys.executable, "-m", "mm", "curate", "score", "--model", str(model_dir), "--data",
           str(d / "s-{0000..0011}.tar"), "--batch-size", "2", "--workers", "0"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    meta = tmp_path / "killed" / "meta"
    while proc.poll() is None and not (meta.is_dir() and any(meta.glob("*.json"))):
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, proc.stdout.read()  # killed mid-run, not finished
    done = len(list(meta.glob("*.json")))
    assert 0 < done < 12 and not (tmp_path / "killed" / "scores.json").exists()
    runs = {out: subprocess.run([*cmd, "--out", str(tmp_path / out)], cwd=ROOT, env=ENV, capture_output=True,
                                text=True, timeout=600) for out in ("killed", "once")}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr[-3000:] for r in runs.values()]
    assert f"resuming: {done} of 12 shards already scored" in runs["killed"].stderr
    assert "resuming" not in runs["once"].stderr
    a, b = tmp_path / "killed", tmp_path / "once"
    assert sorted(p.name for p in (a / "meta").iterdir()) == sorted(p.name for p in (b / "meta").iterdir())
    for sub in ("images", "texts"):
        (ea, ia), (eb, ib) = load_index(a / sub), load_index(b / sub)
        assert ia == ib and len(ia) == 96 and np.array_equal(ea, eb)
    for p in (b / "meta").iterdir():
        same = np.array_equal(np.load(p), np.load(a / "meta" / p.name)) if p.suffix == ".npy" else \
            p.read_bytes() == (a / "meta" / p.name).read_bytes()
        assert same, p.name
    ja, jb = (json.loads((x / "scores.json").read_text()) for x in (a, b))
    assert ja == jb


@pytest.mark.slow  # two processes under accelerate launch (~20 s on 2 cores)
def test_two_processes_score_every_shard_exactly_once(pool_dir, model_dir, scored, tmp_path):
    out = tmp_path / "two"
    cmd = two_gloo_ranks("-m", "mm.cli", "curate", "score", "--model", str(model_dir), "--data", str(pool_dir / SPEC),
                         "--out", str(out), "--batch-size", "3", "--workers", "1")
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    index = json.loads((out / "scores.json").read_text())
    # shard c by rank c % 2: really two ranks, not two single-process runs each doing everything
    assert [p["meta"] for p in index["parts"]] == [f"meta/part-{c % 2:03d}-{c:06d}.json" for c in range(4)]
    for sub in ("images", "texts"):
        (e2, i2), (e1, i1) = load_index(out / sub), load_index(scored / sub)
        assert i2 == i1 and len(set(i2)) == len(_good_keys())
        np.testing.assert_allclose(e2, e1, atol=1e-6, rtol=0)
    one, two = _pool_columns(scored), _pool_columns(out)
    assert one.keys() == two.keys() and all(abs(one[k]["score"] - two[k]["score"]) < 1e-6 for k in one)
    assert sorted((out / "skipped.txt").read_text().splitlines()) == \
        sorted((scored / "skipped.txt").read_text().splitlines())


def _filter(scored: Path, out: Path, *args: str) -> tuple[list[str], dict]:
    assert mm_main(["curate", "filter", "--scores", str(scored), "--out", str(out), *args]) == 0
    return (out / "keep.txt").read_text().split(), json.loads((out / "report.json").read_text())


def test_each_rule_keeps_what_it_says_and_the_report_counts_removals_in_order(scored, tmp_path, capsys):
    cols = _pool_columns(scored)
    keys = _good_keys()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rules:\n  - caption_words: {min: 2, max: 8}\n  - image_size: {min_side: 30}\n"
                      "  - aspect_ratio: {max: 2}\n  - clip_score: {top: 0.5}\n  - caption_duplicates\n")
    kept, report = _filter(scored, tmp_path / "k", "--recipe", str(recipe))
    table = capsys.readouterr().out
    words = [k for k in keys if 2 <= len(cols[k]["caption"].split()) <= 8]
    assert "p00003" not in words and "p00004" not in words
    sized = [k for k in words if min(cols[k]["width"], cols[k]["height"]) >= 30]
    assert "p00001" not in sized
    aspect = [k for k in sized if max(cols[k]["width"], cols[k]["height"]) <= 2 * min(cols[k]["width"],
                                                                                     cols[k]["height"])]
    assert "p00002" not in aspect and "p00002" in sized
    ranked = sorted(keys, key=lambda k: (-cols[k]["score"], keys.index(k)))  # the pool's top half
    top = set(ranked[:round(0.5 * len(keys))])
    scored_ok = [k for k in aspect if k in top]
    groups: dict[str, list[str]] = {}
    for k in scored_ok:
        groups.setdefault(" ".join(cols[k]["caption"].lower().split()), []).append(k)
    want = [k for k in scored_ok if k == max(groups[" ".join(cols[k]["caption"].lower().split())],
                                              key=lambda j: (cols[j]["score"], -keys.index(j)))]
    assert kept == want and report["kept"] == len(want) and report["pool"] == len(keys)
    lefts = [len(words), len(sized), len(aspect), len(scored_ok), len(want)]
    assert [s["left"] for s in report["steps"]] == lefts
    assert [s["removed"] for s in report["steps"]] == [a - b for a, b in zip([len(keys)] + lefts, lefts)]
    assert [s["rule"] for s in report["steps"]] == ["caption_words", "image_size", "aspect_ratio", "clip_score",
                                                    "caption_duplicates"]
    removed = dict(line.split("\t") for line in (tmp_path / "k" / "removed.tsv").read_text().splitlines())
    assert sorted(removed) == sorted(set(keys) - set(want)) and removed["p00001"] == "image_size"
    assert "caption_words min=2 max=8" in table and f"kept {len(want)} of {len(keys)}" in table
    # a threshold by flag (the median score); the caption group keeps its best-scored sample among those left
    t = sorted(cols[k]["score"] for k in keys)[len(keys) // 2]
    kept, _ = _filter(scored, tmp_path / "t", "--min-score", repr(t), "--dedup-captions")
    left = [k for k in keys if cols[k]["score"] >= t]
    things = [k for k in left if k in ("p00012", "p00013", "p00014")]
    best = max(things, key=lambda k: (cols[k]["score"], -keys.index(k))) if things else None
    assert len(left) == len(keys) - len(keys) // 2
    assert kept == [k for k in left if k not in things or k == best]


def test_semdedup_removes_the_planted_duplicate_images_and_nothing_else(scored, tmp_path):
    """Exact copies of images under new keys (a re-upload): of each group one stays, the copies' count goes; a random
    tiny-clip's distinct images are at most ~0.99998 apart, a copy at 1 - 1e-7, so eps = 1e-6 separates them."""
    keys = _good_keys()
    kept, report = _filter(scored, tmp_path / "d", "--semdedup-eps", "1e-6", "--semdedup-clusters", "3")
    removed = set(keys) - set(kept)
    groups = [{"p00000", "p00016"}, {"p00005", "p00017", "p00018"}, {"p00007", "p00019"}]
    planted = set().union(*groups)
    precision = len(removed & planted) / max(len(removed), 1)
    recall = len(removed & planted) / (len(planted) - len(groups))  # all but one of each group are duplicates
    assert (precision, recall) == (1.0, 1.0), removed
    assert all(len(g - removed) == 1 for g in groups)
    assert report["steps"][0]["removed"] == 4 and report["steps"][0]["clusters"] == 3


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_embed(d: Path, x: np.ndarray, fingerprint: str = "f") -> tuple[Path, list[dict]]:
    """An `mm embed` output holding ``x`` in two parts."""
    d.mkdir(parents=True)
    half = len(x) // 2
    parts = []
    for c, rows in enumerate((x[:half], x[half:])):
        np.save(d / f"part-000-{c:06d}.npy", rows)
        (d / f"part-000-{c:06d}.ids.json").write_text(json.dumps({"ids": [str(i) for i in range(len(rows))],
                                                                  "skipped": []}))
        parts.append({"file": f"part-000-{c:06d}.npy", "ids": f"part-000-{c:06d}.ids.json", "rows": len(rows)})
    (d / "index.json").write_text(json.dumps({"format": "mm-embed", "kind": "images", "model": "m", "embed_dim":
                                              x.shape[1], "count": len(x), "model_fingerprint": fingerprint,
                                              "parts": parts, "dtype": "float32", "normalized": True}))
    return d, parts


def test_semdedup_precision_and_recall_on_planted_near_duplicates(tmp_path):
    """400 unit vectors around 8 centres (within a cluster, cosines of about 0.92) and 60 planted near-duplicates
    (cosine > 0.9999 with their original; groups of 2 to 4): removal has precision and recall 1 at eps 0.01."""
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((8, 64)))  # the cluster structure of real embeddings
    base = _unit(centres[rng.integers(0, 8, 400)] + 0.3 * rng.standard_normal((400, 64)) / 8)
    origins = rng.choice(400, 30, replace=False)
    dups, group_of = [], {}
    for n, o in enumerate(origins):
        for _ in range(1 + n % 3):
            group_of[400 + len(dups)] = o
            dups.append(base[o] + 0.005 * rng.standard_normal(64) / 8)
    x = np.concatenate([base, _unit(np.array(dups))])
    perm = rng.permutation(len(x))  # duplicates spread through the rows
    x = x[perm]
    where = {old: new for new, old in enumerate(perm)}
    groups = {}
    for d, o in group_of.items():
        groups.setdefault(where[o], {where[o]}).add(where[d])
    emb, parts = _write_embed(tmp_path / "e", x)
    rows = np.arange(len(x))
    removed, stats = dedup.semdedup(emb, parts, rows, eps=0.01, clusters=8, seed=1)
    planted = set().union(*groups.values())
    removed = set(removed.tolist())
    precision = len(removed & planted) / len(removed)
    recall = len(removed & planted) / (len(planted) - len(groups))
    assert (precision, recall) == (1.0, 1.0) and all(len(g - removed) == 1 for g in groups.values())
    assert stats["clusters"] == 8
    # only the rows given take part: without the originals, a lone duplicate stays, and of the others all but one go
    alone = np.array(sorted(set(rows.tolist()) - set(groups)))
    removed2, _ = dedup.semdedup(emb, parts, alone, eps=0.01, clusters=8, seed=1)
    assert set(removed2.tolist()) <= planted - set(groups)
    assert len(removed2) == sum(len(g) - 2 for g in groups.values())


def test_near_duplicates_keep_the_member_least_similar_to_the_centroid():
    """SemDeDup's choice within a group: the member farthest from the cluster centroid stays."""
    centroid = _unit(np.array([[1.0, 0, 0, 0]]))[0]
    a = _unit(np.array([[1.0, 0.30, 0.0, 0.0], [1.0, 0.3005, 0.0, 0.0], [1.0, 0.2995, 0.0, 0.0],  # a group of 3
                        [1.0, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, -0.6]]))  # two distinct members
    gone = dedup.near_duplicates(a, centroid, eps=1e-4)
    assert gone.tolist() == [True, False, True, False, False]  # row 1: cosine 0.9578 to the centroid, the group's least


def test_kmeans_is_seeded_and_finds_well_separated_clusters():
    rng = np.random.default_rng(3)
    centres = _unit(rng.standard_normal((5, 32)))
    truth = rng.integers(0, 5, 500)
    x = _unit(centres[truth] + 0.05 * rng.standard_normal((500, 32)))
    a, b = dedup.kmeans(x, 5, seed=7), dedup.kmeans(x, 5, seed=7)
    assert np.array_equal(a, b)
    labels, _ = dedup.assign(x, torch.from_numpy(a))
    assert all(len(set(labels[truth == t])) == 1 for t in range(5)) and len(set(labels)) == 5  # a relabelling
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="6 clusters of 5 rows"):
        dedup.kmeans(x[:5], 6)


def test_image_clusters_keep_the_pool_clusters_nearest_to_the_target(tmp_path, scored, capsys):
    """DataComp's image-based filter: a pool of 4 well-separated groups, a target near two of them: exactly those two
    groups' samples stay. A scoring run's own images as the target keep everything; a target of another model is
    refused before any work."""
    rng = np.random.default_rng(5)
    centres = _unit(rng.standard_normal((4, 16)))
    truth = rng.integers(0, 4, 300)
    pool, parts = _write_embed(tmp_path / "pool", _unit(centres[truth] + 0.05 * rng.standard_normal((300, 16))))
    target, tparts = _write_embed(tmp_path / "target", _unit(centres[[1, 3, 3]] + 0.05 * rng.standard_normal((3, 16))))
    mask, stats = dedup.cluster_filter(pool, parts, target, tparts, clusters=4, seed=0)
    assert np.array_equal(mask, np.isin(truth, [1, 3])) and stats["target_clusters"] == 2
    kept, _ = _filter(scored, tmp_path / "all", "--target", str(scored), "--target-clusters", "4")
    assert kept == _good_keys()
    other, _ = _write_embed(tmp_path / "other", _unit(rng.standard_normal((4, 128))), fingerprint="another")
    assert mm_main(["curate", "filter", "--scores", str(scored), "--out", str(tmp_path / "o"), "--target",
                    str(other)]) == 2
    assert "weights differ" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("recipe,message", [
    ("rules:\n  - clip_scor: {min: 0.3}\n", "rule 1: unknown rule 'clip_scor' (rules: clip_score,"),
    ("rules:\n  - caption_words: {min: 2}\n  - clip_score: {min: 1.3}\n",
     "rule 2: clip_score.min: must be a cosine between -1 and 1, got 1.3"),
    ("rules:\n  - clip_score: {top: 0}\n", "clip_score.top: must be a fraction in (0, 1], got 0"),
    ("rules:\n  - semdedup: {eps: 1.5}\n", "semdedup.eps: must be in (0, 1)"),
    ("rules:\n  - semdedup: {epsilon: 0.1}\n", "unknown config key 'semdedup.epsilon'"),
    ("rules:\n  - aspect_ratio: {max: 0.5}\n", "aspect_ratio.max: must be >= 1"),
    ("rules:\n  - clip_score: {min: high}\n", "clip_score.min: expected float, got 'high'"),
    ("clip_score: {min: 0.3}\n", "expected one key, rules"),
])
def test_a_bad_recipe_fails_before_any_work(recipe, message, tmp_path, capsys):
    """One line, exit 2, before the scores are even opened (the directory given does not exist) or anything is
    written."""
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    assert mm_main(["curate", "filter", "--scores", str(tmp_path / "no-scores"), "--out", str(tmp_path / "out"),
                    "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_filter_options_name_the_option(scored, tmp_path, capsys):
    for args, message in ((["--min-score", "2"], "error: --min-score: must be a cosine between -1 and 1, got 2.0"),
                          (["--top-fraction", "1.5"], "error: --top-fraction: must be a fraction in (0, 1]"),
                          (["--semdedup-eps", "0"], "error: --semdedup-eps: must be in (0, 1)"),
                          (["--target-clusters", "4"], "error: --target: name the target set's embeddings"),
                          (["--target", str(scored), "--target-clusters", "1000"],
                           f"error: image_clusters.clusters: 1000 clusters of a pool of {len(_good_keys())} samples"),
                          ([], "error: no rules")):
        assert mm_main(["curate", "filter", "--scores", str(scored), "--out", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
    try:  # caption language needs py3langid: without it, one line before any work
        import py3langid  # noqa: F401
    except ImportError:
        assert mm_main(["curate", "filter", "--scores", str(scored), "--out", str(tmp_path / "o"), "--language",
                        "en"]) == 2
        assert "needs the py3langid package" in capsys.readouterr().err and not (tmp_path / "o").exists()
    else:
        kept, _ = _filter(scored, tmp_path / "lang", "--language", "en")
        assert set(kept) <= set(_good_keys()) and "p00012" in kept


def _members(shards: list[Path]) -> list[tuple[str, dict[str, bytes]]]:
    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
            for shard in shards for s in iter_shard(str(shard), lambda m: None)]


def test_write_reshards_exactly_the_kept_samples_byte_for_byte(pool_dir, tmp_path, capsys):
    keep = ["p00000", "p00002", "p00005", "p00009", "p00012", "p00016", "p00017", "p00019", "p00021", "missing"]
    (tmp_path / "keep.txt").write_text("\n".join(keep) + "\n")
    out = tmp_path / "out"
    assert mm_main(["curate", "write", "--data", str(pool_dir / SPEC), "--keep", str(tmp_path / "keep.txt"),
                    "--out", str(out), "--samples-per-shard", "4"]) == 0
    assert "wrote 9 samples in 3 shards of 3 samples" in capsys.readouterr().out
    shards = sorted(out.glob("train-*.tar"))
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    got = _members(shards)
    source = dict(_members(sorted(pool_dir.glob("pool-*.tar"))))
    assert [k for k, _ in got] == keep[:-1]  # in input order, the missing key aside
    assert all(members == source[k] for k, members in got)  # every member, byte for byte (the .jpeg one too)
    assert set(dict(got)["p00019"]) == {"jpeg", "json", "txt"}
    info = json.loads((out / "info.json").read_text())
    assert info["num_samples"] == 9 and [s["num_samples"] for s in info["shards"]] == [3, 3, 3]
    assert info["keep_missing"] == 1
    # keys that do not increase in the order given cannot make sorted shards: refused before writing
    assert mm_main(["curate", "write", "--data", f"{pool_dir / 'pool-0001.tar'}::{pool_dir / 'pool-0000.tar'}",
                    "--keep", str(tmp_path / "keep.txt"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data: kept sample keys must increase") and not list(tmp_path.glob("bad/*.tar"))
    assert mm_main(["curate", "write", "--data", str(pool_dir / SPEC), "--keep", str(tmp_path / "none.txt"),
                    "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.startswith("error: --keep: file")


def test_balanced_sizes_and_shard_keys(pool_dir):
    assert balanced_sizes(9, 4) == [3, 3, 3] and balanced_sizes(10, 4) == [4, 3, 3] and balanced_sizes(8, 4) == [4, 4]
    assert balanced_sizes(0, 4) == [] and balanced_sizes(5, 100) == [5]
    assert shard_keys(str(pool_dir / "pool-0002.tar")) == list(COPIES)
    assert shard_keys(str(pool_dir / "pool-0003.tar")) is None  # cut off: read as a stream instead


def test_data_keep_trains_on_the_kept_samples_only(pool_dir, tmp_path, capsys):
    from mm.train.feed import DataState, build_train_stream
    from mm.train.preflight import load_run_config

    keep = ["p00000", "p00005", "p00008", "p00012", "p00017", "p00021"]
    (tmp_path / "keep.txt").write_text("\n".join(keep) + "\n\n")
    overrides = [f"data.train={pool_dir / SPEC}", f"data.keep={tmp_path / 'keep.txt'}", "model=tiny-clip",
                 "data.batch_size=4", "data.workers=0", "data.shuffle_buffer=4"]
    cfg = load_run_config(None, overrides)
    model = mm.create_model("tiny-clip")
    stream = iter(build_train_stream(cfg, model, 0, 1, DataState()))
    seen = [k for _ in range(6) for k in next(stream)["keys"]]  # 24 samples: 4 passes over the kept 6
    assert set(seen) == set(keep) and len(seen) == 24
    assert all(seen.count(k) == 4 for k in keep)
    # the list is checked before any work: a missing or empty file is one line naming data.keep
    for bad, message in ((tmp_path / "nope.txt", "data.keep: file"), (tmp_path / "empty.txt", "lists no sample key")):
        if bad.name == "empty.txt":
            bad.write_text("\n")
        assert mm_main(["train", *overrides[:1], f"data.keep={bad}", "model=tiny-clip"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: data.keep: ") and message in err, err


def test_a_pool_with_repeated_keys_cannot_be_filtered(model_dir, tmp_path, capsys):
    """A keep list names keys: samples sharing a key across shards could not be told apart, so filtering refuses."""
    for n in range(2):
        write_tar(tmp_path / f"r-{n}.tar", [("same", _sample(n)), (f"own{n}", _sample(n + 2))])
    out = tmp_path / "scores"
    assert mm_main(["curate", "score", "--model", str(model_dir), "--data", str(tmp_path / "r-{0..1}.tar"), "--out",
                    str(out), "--workers", "0"]) == 0
    pool = Pool(out)
    assert pool.count == 4 and pool.index["repeated_keys"] == 1
    capsys.readouterr()
    assert mm_main(["curate", "filter", "--scores", str(out), "--out", str(tmp_path / "k"), "--min-score", "0"]) == 2
    assert "keys repeat across its shards (e.g. 'same')" in capsys.readouterr().err
