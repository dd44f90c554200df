"""Shard writing (mm.data.shards) and the built-in synthetic set (mm.data.synthetic): tars read back by hand."""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import mm.tokenizer
from mm.cli import shards as sources
from mm.data import synthetic
from mm.data.shards import ShardWriter
from mm.data.sources import from_img2dataset, from_table


def _image(path: Path, size: int = 16, seed: int = 0, fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, fmt, quality=90)
    return path


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _read(out_dir: Path, pattern: str = "*.tar*") -> dict[str, dict[str, bytes]]:
    """All samples of all shards, checking members are grouped by key and in sorted key order."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out_dir.glob(pattern)):
        keys = []
        with tarfile.open(path) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                assert (m.mtime, m.uid, m.gid, m.mode) == (0, 0, 0, 0o644)
                if not keys or keys[-1] != key:
                    assert key not in samples, f"{key} not grouped"
                    keys.append(key)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
        assert keys == sorted(keys)
    return samples


def _write_table(path: Path, rows: list[dict], fmt: str) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    _image(root / "a.png", seed=1)
    _image(root / "sub" / "b.jpg", seed=2)
    _image(root / "c.png", size=12, seed=3)
    ramp = np.linspace(0, 255, 16, dtype=np.uint8)  # smooth, so a JPEG re-encode stays close in pixels
    Image.fromarray(np.stack([ramp[None].repeat(16, 0), ramp[:, None].repeat(16, 1), np.full((16, 16), 90, np.uint8)],
                             -1)).save(root / "d.bmp")  # not JPEG/PNG/WebP: re-encoded to JPEG
    return root


# (table suffix, writer format): extension-detected CSV, TSV, JSONL and a sniffed tab-separated .txt
@pytest.mark.parametrize("suffix,fmt", [(".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".txt", "tsv")])
def test_table_round_trip(tmp_path, images, suffix, fmt):
    rows = [
        {"image": "a.png", "caption": "a noisy square, café", "label": "dog"},
        {"image": "sub/b.jpg", "caption": "the second image", "label": "cat"},
        {"image": "a.png", "caption": "another caption for a", "label": "dog"},
        {"image": "c.png", "caption": "third", "label": "cat"},
        {"image": str(images / "d.bmp"), "caption": "absolute path", "label": "bird"},
    ]
    table = tmp_path / f"pairs{suffix}"
    _write_table(table, rows, fmt)
    info = from_table(table, images, tmp_path / "out", label_col="label", verbose=False)
    assert info["num_samples"] == 4 and info["skipped"] == {}
    assert info["classes"] == ["bird", "cat", "dog"]  # names indexed in sorted order
    assert info["shards"] == [{"name": "train-000000.tar", "num_samples": 4}]
    on_disk = json.loads((tmp_path / "out" / "info.json").read_text())
    assert on_disk["num_samples"] == 4 and on_disk["classes"] == info["classes"]

    samples = list(_read(tmp_path / "out").values())
    a, b, c, d = samples
    assert set(a) == {"png", "txt", "cls", "json"}
    assert np.array_equal(_pixels(a["png"]), np.asarray(Image.open(images / "a.png").convert("RGB")))
    assert a["txt"].decode() == "a noisy square, café"
    meta = json.loads(a["json"])
    assert meta["captions"] == ["a noisy square, café", "another caption for a"]
    assert (meta["source"], meta["width"], meta["height"]) == ("a.png", 16, 16)
    assert b["jpg"] == (images / "sub" / "b.jpg").read_bytes()  # JPEG bytes copied unchanged
    assert "captions" not in json.loads(b["json"])  # a single caption lives in txt only
    assert [int(s["cls"]) for s in samples] == [2, 1, 1, 0]
    assert json.loads(c["json"])["width"] == 12
    assert set(d) >= {"jpg"}
    bmp = np.asarray(Image.open(images / "d.bmp").convert("RGB"), dtype=np.int16)
    assert np.abs(_pixels(d["jpg"]).astype(np.int16) - bmp).mean() < 4  # q=95 JPEG of the same picture


def test_integer_labels_and_caption_lists(tmp_path, images):
    table = tmp_path / "t.jsonl"
    _write_table(table, [{"image": "a.png", "caption": ["one", "", "two"], "label": 3},
                         {"image": "c.png", "caption": "x", "label": "0"}], "jsonl")
    info = from_table(table, images, tmp_path / "out", label_col="label", verbose=False)
    assert "classes" not in info and info["num_classes"] == 4  # integer labels: indices, names unknown
    a, c = _read(tmp_path / "out").values()
    assert (a["cls"], c["cls"]) == (b"3", b"0")
    assert a["txt"] == b"one" and json.loads(a["json"])["captions"] == ["one", "two"]

    info = from_table(table, images, tmp_path / "named", label_col="label", classes=["a", "b", "c", "d"],
                      verbose=False)
    assert info["classes"] == ["a", "b", "c", "d"]


def test_bad_inputs_are_skipped_and_counted(tmp_path, images, monkeypatch):
    # A process that relaxed PIL's globals (common with webdataset) must not let truncated files through.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    good_jpeg = _image(images / "big_noise.jpg", size=96, seed=9).read_bytes()
    (images / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    _image(images / "huge.png", size=97)  # 97 * 97 pixels > max_pixels below
    rows = [("a.png", "ok 1"), ("missing.png", "gone"), ("corrupt.jpg", "bad bytes"), ("truncated.jpg", "cut"),
            ("sub/b.jpg", "ok 2"), ("c.png", "   "), ("huge.png", "too big"), ("big_noise.jpg", "ok 3"),
            ("", "no path at all")]
    table = tmp_path / "t.csv"
    _write_table(table, [{"image": i, "caption": c} for i, c in rows], "csv")
    info = from_table(table, images, tmp_path / "out", max_pixels=96 * 96, verbose=False)
    assert info["skipped"] == {"missing file": 2, "undecodable image": 2, "empty caption": 1, "too many pixels": 1}
    assert info["num_samples"] == 3
    assert [json.loads(s["json"])["source"] for s in _read(tmp_path / "out").values()] == \
        ["a.png", "sub/b.jpg", "big_noise.jpg"]
    assert any("truncated.jpg" in f for f in info["skipped_files"]["undecodable image"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_missing_table_root_and_column_are_clear_errors(tmp_path, images):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        from_table(tmp_path / "nope.csv", images, tmp_path / "out")
    table = tmp_path / "t.csv"
    _write_table(table, [{"image": "a.png", "text": "x"}], "csv")
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        from_table(table, tmp_path / "no_such_root", tmp_path / "out")
    with pytest.raises(ValueError, match="'caption'.*text"):
        from_table(table, images, tmp_path / "out")


def _write_n(out_dir: Path, n: int, per_shard: int, compress: bool = False) -> dict:
    with ShardWriter(out_dir, "train", per_shard, compress, classes=["x", "y"], extras={"templates": ["{}"]},
                     verbose=False) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.full((4, 4, 3), i * 20, np.uint8)).save(buf, "PNG")
            w.write(f"{i:04d}", buf.getvalue(), "png", f"caption {i}", i % 2, {"i": i})
        w.skip("empty caption", "some/path.png")
    return w.info


@pytest.mark.parametrize("compress", [False, True])
def test_rollover_and_deterministic_bytes(tmp_path, compress):
    info = _write_n(tmp_path / "one", 7, 3, compress)
    ext = ".tar.gz" if compress else ".tar"
    assert [(s["name"], s["num_samples"]) for s in info["shards"]] == \
        [(f"train-00000{i}{ext}", n) for i, n in enumerate([3, 3, 1])]
    assert info["num_samples"] == 7 and info["templates"] == ["{}"] and info["skipped"] == {"empty caption": 1}
    samples = _read(tmp_path / "one")
    assert [s["txt"].decode() for s in samples.values()] == [f"caption {i}" for i in range(7)]
    _write_n(tmp_path / "two", 7, 3, compress)
    for s in info["shards"]:
        data = (tmp_path / "one" / s["name"]).read_bytes()
        assert data == (tmp_path / "two" / s["name"]).read_bytes()
        if compress:  # gzip header: no mtime (bytes 4-8), no file name (flag 0x08) that could vary
            assert data[4:8] == b"\0\0\0\0" and not data[3] & 0x08
    assert not list((tmp_path / "one").glob("*.tmp"))


def test_writer_rejects_bad_keys_and_interrupted_run_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, samples_per_shard=2, verbose=False) as w:
        for i in range(3):
            w.write(f"{i}", b"img", "jpg", "c")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]  # no partial, no info.json
    w = ShardWriter(tmp_path / "k", verbose=False)
    with pytest.raises(ValueError, match="dots"):
        w.write("a.b", b"img", "jpg")
    w.write("b", b"img", "jpg")
    with pytest.raises(ValueError, match="increasing"):
        w.write("a", b"img", "jpg")


def test_stale_shards_of_a_larger_earlier_run_are_removed(tmp_path):
    _write_n(tmp_path, 7, 2)
    (tmp_path / "test-000009.tar").write_bytes(b"other prefix: kept")
    info = _write_n(tmp_path, 3, 2)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["test-000009.tar", "train-000000.tar",
                                                              "train-000001.tar"]
    assert info["num_samples"] == 3


def test_img2dataset_files_layout(tmp_path):
    src = tmp_path / "dl"
    (src / "00000").mkdir(parents=True)
    (src / "00000.parquet").write_bytes(b"PAR1")
    (src / "00000_stats.json").write_text("{}")
    for i in range(4):
        _image(src / "00000" / f"00000000{i}.jpg", seed=i)
        (src / "00000" / f"00000000{i}.json").write_text(json.dumps({"url": f"http://x/{i}", "caption": f"json {i}"}))
    (src / "00000" / "000000000.txt").write_text("first caption\n")
    (src / "00000" / "000000002.jpg").write_bytes(b"broken")
    (src / "00000" / "000000003.json").write_text(json.dumps({"caption": ""}))
    info = from_img2dataset(src, tmp_path / "out", verbose=False)
    assert info["num_samples"] == 2 and info["skipped"] == {"empty caption": 1, "undecodable image": 1}
    s0, s1 = _read(tmp_path / "out").values()
    assert s0["txt"] == b"first caption" and s1["txt"] == b"json 1"  # txt wins; else the json caption
    assert s0["jpg"] == (src / "00000" / "000000000.jpg").read_bytes()
    assert json.loads(s1["json"])["url"] == "http://x/1"


def test_img2dataset_tar_layout_revalidates_and_keeps_labels(tmp_path, images):
    table = tmp_path / "t.csv"
    _write_table(table, [{"image": n, "caption": f"c {n}", "label": lab}
                         for n, lab in [("a.png", "x"), ("c.png", "y"), ("sub/b.jpg", "x")]], "csv")
    from_table(table, images, tmp_path / "src", samples_per_shard=2, label_col="label", verbose=False)
    with tarfile.open(tmp_path / "src" / "train-000001.tar", "a") as tf:  # append a corrupt sample
        ti = tarfile.TarInfo("zzz.jpg")
        ti.size = 5
        tf.addfile(ti, io.BytesIO(b"nope!"))
        ti = tarfile.TarInfo("zzz.txt")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"c"))
    info = from_img2dataset(tmp_path / "src", tmp_path / "out", verbose=False)
    assert info["num_samples"] == 3 and info["skipped"] == {"undecodable image": 1}
    assert info["classes"] == ["x", "y"]
    original, copied = _read(tmp_path / "src"), _read(tmp_path / "out")
    assert [(s.get("png", s.get("jpg")), s["txt"], s["cls"]) for s in copied.values()] == \
        [(s.get("png", s.get("jpg")), s["txt"], s["cls"]) for k, s in original.items() if k != "zzz"]


def test_synthetic_is_deterministic_labelled_and_split(tmp_path):
    # Equal split sizes: only the seeding can make train and test differ.
    info = synthetic.generate(tmp_path / "a", n_train=60, n_test=60, samples_per_shard=25, verbose=False)
    synthetic.generate(tmp_path / "b", n_train=60, n_test=60, samples_per_shard=25, verbose=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["info.json"] + [f"{split}-00000{i}.tar.gz" for split in ("test", "train") for i in range(3)]
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    on_disk = json.loads((tmp_path / "a" / "info.json").read_text())
    assert on_disk["train"]["num_samples"] == 60 and on_disk["test"]["num_samples"] == 60
    classes = on_disk["classes"]
    assert classes == info["classes"] and len(classes) == 30 and "red circle" in classes
    assert on_disk["templates"] and not set(on_disk["templates"]) & set(on_disk["caption_templates"])
    train, test = _read(tmp_path / "a", "train-*"), _read(tmp_path / "a", "test-*")
    for s in list(train.values()) + list(test.values()):
        color, shape = classes[int(s["cls"])].split()
        caption = s["txt"].decode()
        assert color in caption and shape in caption
        meta = json.loads(s["json"])
        assert (meta["color"], meta["shape"]) == (color, shape)
        assert _pixels(s["jpg"]).shape == (32, 32, 3)
    train_px = {_pixels(s["jpg"]).tobytes() for s in train.values()}
    assert not train_px & {_pixels(s["jpg"]).tobytes() for s in test.values()}
    assert len({int(s["cls"]) for s in train.values()}) == 30  # balanced: 60 samples = every class twice
    other = synthetic.generate(tmp_path / "c", n_train=60, n_test=0, seed=1, verbose=False)
    assert other["train"]["num_samples"] == 60
    first = "train-000000.tar.gz"
    assert (tmp_path / "c" / first).read_bytes() != (tmp_path / "a" / first).read_bytes()


def test_synthetic_shape_is_drawn_in_its_colour():
    rng = np.random.default_rng(0)
    img = synthetic.draw("red", "square", "large", "center", rng).astype(int)
    center = img[12:20, 12:20].reshape(-1, 3).mean(0)
    assert center[0] > 150 and center[1] < 110 and center[2] < 110
    left = synthetic.draw("blue", "circle", "small", "left", rng).astype(int)
    blue = left[..., 2] - left[..., :2].mean(-1) > 100  # the object's blue, beyond any muted background tint
    assert blue[:, :14].sum() >= 20 and blue[:, 18:].sum() == 0


def test_every_generated_caption_parses_back_to_its_attributes():
    """parse_caption inverts the generator: every caption template with every colour, shape, size word and
    position phrase (the tokenizer's lower-cased, space-before-punctuation form too) states exactly its
    attributes, and None for those its template leaves out."""
    tok = mm.tokenizer.get_tokenizer("tiny-coca")
    checked = 0
    for template in synthetic.CAPTION_TEMPLATES:
        for color, shape in itertools.product(synthetic.COLORS, synthetic.SHAPES):
            for size, words in synthetic.SIZE_WORDS.items():
                for position, phrases in synthetic.POSITION_PHRASES.items():
                    for word, where in itertools.product(words, phrases):
                        text = template.format(size=word, color=color, shape=shape, where=where,
                                               where_cap=where[0].upper() + where[1:])
                        want = {"color": color, "shape": shape, "size": size if "{size}" in template else None,
                                "position": position if "{where" in template else None}
                        assert synthetic.parse_caption(text) == want, (template, text)
                        checked += 1
        ids = tok([text])[0].tolist()
        decoded = tok.decode(ids[1 : ids.index(tok.eot_id)])  # as a generated caption reads
        assert synthetic.parse_caption(decoded) == want, decoded
    assert checked == len(synthetic.CAPTION_TEMPLATES) * 30 * 5 * 15
    # what a model may get wrong: a missing attribute, two of one kind
    assert synthetic.parse_caption("a red circle") == {"color": "red", "shape": "circle", "size": None,
                                                       "position": None}
    assert synthetic.parse_caption("a big red or blue star on the left")["color"] is None
    truth = {"color": "red", "shape": "star", "size": "large", "position": "left"}
    acc = synthetic.attribute_accuracy(["a big red star on the left", "a red circle", "a small blue star",
                                        "a large red star at the top"], [truth] * 4)
    assert acc == {"color": 0.75, "shape": 0.75, "size": 0.5, "position": 0.25, "all": 0.25}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm")
    sources.add_parser(p.add_subparsers(dest="command"))
    return p


@pytest.mark.parametrize("command", ["csv", "img2dataset", "builtin"])
def test_cli_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["shards", command, "--help"])
    assert exc.value.code == 0
    assert "example" in capsys.readouterr().out


def test_cli_runs_and_reports_errors(tmp_path, images, capsys):
    table = tmp_path / "t.csv"
    _write_table(table, [{"image": "a.png", "caption": "x"}, {"image": "gone.png", "caption": "y"}], "csv")
    args = _parser().parse_args(["shards", "csv", str(table), str(tmp_path / "out"), "--image-root", str(images),
                                 "--samples-per-shard", "5", "--gzip"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "wrote 1 samples" in out and "gone.png" in out
    assert (tmp_path / "out" / "train-000000.tar.gz").is_file()
    args = _parser().parse_args(["shards", "csv", str(tmp_path / "missing.csv"), str(tmp_path / "o2")])
    assert args.fn(args) == 2
    assert "missing.csv" in capsys.readouterr().err
    args = _parser().parse_args(["shards", "builtin", str(tmp_path / "bi"), "--n-train", "30", "--n-test", "30"])
    assert args.fn(args) == 0
    assert json.loads((tmp_path / "bi" / "info.json").read_text())["test"]["num_samples"] == 30
