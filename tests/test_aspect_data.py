"""The built-in mixed-aspect set (mm/data/aspect.py, `mm shards builtin --aspect`): deterministic bytes, every
declared aspect drawn at its size, the object inside the canvas and of its class, balanced labels, a centre square
crop that misses elongated canvases' objects, and the command."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import mm_in_process
from PIL import Image

from mm.data import aspect
from mm.data.synthetic import CLASSES, COLORS, SHAPES, ZERO_SHOT_TEMPLATES, parse_caption
from mm.data.wds import iter_shard

N = 60  # 2 per class, 12 per default aspect


def _samples(out, prefix="train"):
    info = json.loads((out / "info.json").read_text())
    warnings: list[str] = []
    samples = [s for shard in info[prefix]["shards"] for s in iter_shard(str(out / shard["name"]), warnings.append)]
    assert not warnings
    return samples


def _image(sample) -> np.ndarray:
    with Image.open(io.BytesIO(sample["jpg"])) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        return np.asarray(im)


@pytest.fixture(scope="module")
def aspect_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("aspect")
    aspect.generate_aspect(out, n_train=N, n_test=10, long_side=96, seed=3, samples_per_shard=25, verbose=False)
    return out


def test_generation_is_deterministic_byte_for_byte(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        aspect.generate_aspect(out, n_train=30, n_test=8, long_side=64, seed=1, samples_per_shard=12, verbose=False)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert "train-000002.tar.gz" in files and "test-000000.tar.gz" in files and "info.json" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    aspect.generate_aspect(tmp_path / "c", n_train=30, n_test=8, long_side=64, seed=2, samples_per_shard=12,
                           verbose=False)
    assert (tmp_path / "c" / "train-000000.tar.gz").read_bytes() != (a / "train-000000.tar.gz").read_bytes()


def test_info_is_the_builtin_sets_plus_the_aspects(aspect_dir):
    info = json.loads((aspect_dir / "info.json").read_text())
    assert info["aspect"] is True and info["aspects"] == list(aspect.ASPECTS)
    assert info["classes"] == CLASSES and info["templates"] == ZERO_SHOT_TEMPLATES
    assert info["shapes"] == SHAPES and info["colors"] == list(COLORS)
    assert info["long_side"] == 96 and info["seed"] == 3
    assert info["train"]["num_samples"] == N and info["test"]["num_samples"] == 10
    assert [s["num_samples"] for s in info["train"]["shards"]] == [25, 25, 10]


def test_zero_shot_evaluation_reads_its_classes_and_templates(aspect_dir):
    """What `mm zeroshot` / `mm eval` do with shards: class names and templates from the info.json beside them."""
    from mm.eval.classify import resolve_shards

    urls, classnames, templates = resolve_shards(str(aspect_dir / "test-000000.tar.gz"), None, None, "shards")
    assert urls == [str(aspect_dir / "test-000000.tar.gz")]
    assert classnames == CLASSES and list(templates) == ZERO_SHOT_TEMPLATES


def test_every_aspect_occurs_at_its_declared_size(aspect_dir):
    for prefix, n in (("train", N), ("test", 10)):
        samples = _samples(aspect_dir, prefix)
        counts = Counter(json.loads(s["json"])["aspect"] for s in samples)
        assert set(counts) == set(aspect.ASPECTS)  # every declared aspect occurs, and no other
        assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == n  # balanced
        for s in samples:
            meta = json.loads(s["json"])
            h, w, _ = _image(s).shape
            assert (meta["width"], meta["height"]) == (w, h)
            a = meta["aspect"]
            assert max(w, h) == 96 and (w >= h) == (a >= 1)  # long side along the aspect's long axis
            assert abs(min(w, h) - 96 * min(a, 1 / a)) <= 0.5  # short side: the rounded declared ratio
            assert abs(w / h - a) <= a / min(w, h)  # within the rounding of the short side


def test_custom_aspects_and_the_minimum_short_side(tmp_path):
    aspect.generate_aspect(tmp_path, n_train=12, n_test=0, long_side=40, seed=0, samples_per_shard=100,
                           verbose=False, aspects=(0.1, 1.5, 3))
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["aspects"] == [0.1, 1.5, 3.0] and info["test"]["num_samples"] == 0
    sizes = {json.loads(s["json"])["aspect"]: _image(s).shape[:2] for s in _samples(tmp_path)}
    assert sizes == {0.1: (40, 8), 1.5: (27, 40), 3.0: (13, 40)}  # (h, w); 40 * 0.1 = 4 px is raised to 8
    for bad in ((), (0.5, 0.0), (float("nan"),)):
        with pytest.raises(ValueError, match="aspects"):
            aspect.generate_aspect(tmp_path / "bad", n_train=1, n_test=0, aspects=bad, verbose=False)
    with pytest.raises(ValueError, match="long side"):
        aspect.generate_aspect(tmp_path / "bad", n_train=1, n_test=0, long_side=12, verbose=False)


def test_members_labels_and_captions_agree(aspect_dir):
    samples = _samples(aspect_dir)
    labels = [int(s["cls"]) for s in samples]
    assert Counter(labels) == {c: N // len(CLASSES) for c in range(len(CLASSES))}  # balanced
    for s, label in zip(samples, labels):
        assert {"jpg", "txt", "cls", "json"} == set(s) - {"__key__", "__url__"}
        meta = json.loads(s["json"])
        assert meta["source"] == "builtin-aspect"
        assert f"{meta['color']} {meta['shape']}" == CLASSES[label]
        captions = meta["captions"]
        assert len(captions) == len(set(captions)) == aspect.N_CAPTIONS and s["txt"].decode() == captions[0]
        for text in captions:  # each caption states the json's attributes, or leaves them out
            stated = parse_caption(text)
            assert stated["color"] == meta["color"] and stated["shape"] == meta["shape"]
            assert stated["size"] in (None, meta["size"]) and stated["position"] in (None, meta["position"])


def test_the_object_is_inside_the_canvas_sized_by_the_short_side_and_of_its_colour(aspect_dir):
    for s in _samples(aspect_dir) + _samples(aspect_dir, "test"):
        meta, img = json.loads(s["json"]), _image(s).astype(np.float32)
        w, h, short = meta["width"], meta["height"], min(meta["width"], meta["height"])
        x0, y0, x1, y1 = meta["box"]
        assert all(isinstance(v, float) and (4 * v).is_integer() for v in meta["box"])  # quarter-pixel steps
        assert 0 < x0 < x1 < w and 0 < y0 < y1 < h  # inside, not touching the frame: never cut off
        # nominal radius 0.30-0.40 of the short side: the box spans a good part of it, on both axes alike
        assert 0.4 * short <= max(x1 - x0, y1 - y0) <= 0.9 * short
        assert 0.5 <= (x1 - x0) / (y1 - y0) <= 2.0  # undistorted: not stretched along the long axis
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        mean = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)  # the box's middle is the shape's
        dists = {c: float(np.linalg.norm(mean - np.asarray(rgb))) for c, rgb in COLORS.items()}
        assert min(dists, key=dists.get) == meta["color"]


def test_a_centre_square_crop_misses_objects_on_elongated_canvases(aspect_dir):
    assert aspect.center_square_fraction([0, 0, 32, 32], 128, 32) == 0.0  # far left of a 4:1 canvas
    assert aspect.center_square_fraction([48, 0, 80, 32], 128, 32) == 1.0  # the centre square itself
    assert aspect.center_square_fraction([40, 0, 56, 32], 128, 32) == 0.5
    kept: dict[float, list[float]] = {}
    for s in _samples(aspect_dir) + _samples(aspect_dir, "test"):
        meta = json.loads(s["json"])
        kept.setdefault(meta["aspect"], []).append(aspect.center_square_fraction(meta["box"], meta["width"],
                                                                                 meta["height"]))
    assert all(f == 1.0 for f in kept[1.0])  # square canvases: the crop is the whole image
    elongated = kept[4.0] + kept[0.25]
    assert sum(f < 0.5 for f in elongated) / len(elongated) > 0.4  # most 4:1 / 1:4 objects are lost (~70 %)
    assert min(elongated) == 0.0  # some entirely


def test_cli_writes_the_aspect_set(tmp_path):
    def mm(*args):
        return mm_in_process("shards", "builtin", *args)

    out = tmp_path / "cli"
    proc = mm(str(out), "--aspect", "--n-train", "20", "--n-test", "5", "--samples-per-shard", "10", "--no-gzip")
    assert proc.returncode == 0, proc.stderr
    assert "20 train + 5 test mixed-aspect images" in proc.stdout
    info = json.loads((out / "info.json").read_text())
    assert info["aspect"] is True and info["long_side"] == 128  # 128 px long side is the default with --aspect
    assert [s["name"] for s in info["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(2)]
    assert {max(_image(s).shape[:2]) for s in _samples(out, "test")} == {128}
    proc = mm(str(tmp_path / "small"), "--aspect", "--image-size", "48", "--n-train", "5", "--n-test", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "small" / "info.json").read_text())["long_side"] == 48
    bad = mm(str(tmp_path / "bad"), "--aspect", "--image-size", "8")
    assert bad.returncode == 2 and "long side" in bad.stderr and "Traceback" not in bad.stderr
    both = mm(str(tmp_path / "both"), "--aspect", "--scenes")  # one kind of set at a time
    assert both.returncode == 2 and "not allowed with" in both.stderr
    assert not (tmp_path / "both").exists() and not (tmp_path / "bad" / "info.json").exists()
