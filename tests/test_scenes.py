"""The built-in scenes (mm/data/scenes.py, `mm shards builtin --scenes`): deterministic bytes, regions in
mm.data.regions' format, boxes that agree with the shape map, unique referring expressions, balanced labels."""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mm.cli import main as mm_main
from mm.data import scenes
from mm.data.regions import parse_regions
from mm.data.synthetic import CLASSES, COLORS, SHAPES
from mm.data.wds import iter_shard

N = 40


def _samples(out, prefix="train"):
    info = json.loads((out / "info.json").read_text())
    warnings: list[str] = []
    samples = [s for shard in info[prefix]["shards"] for s in iter_shard(str(out / shard["name"]), warnings.append)]
    assert not warnings
    return samples


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    scenes.generate_scenes(out, n_train=N, n_test=10, image_size=64, seed=3, samples_per_shard=16, verbose=False)
    return out


def test_generation_is_deterministic_byte_for_byte(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        scenes.generate_scenes(out, n_train=N, n_test=8, seed=1, samples_per_shard=16, verbose=False)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert "train-000002.tar.gz" in files and "test-000000.tar.gz" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    scenes.generate_scenes(tmp_path / "c", n_train=N, n_test=8, seed=2, samples_per_shard=16, verbose=False)
    assert (tmp_path / "c" / "train-000000.tar.gz").read_bytes() != (a / "train-000000.tar.gz").read_bytes()


def test_info_and_members(scene_dir):
    info = json.loads((scene_dir / "info.json").read_text())
    assert info["scenes"] is True and info["seg_classes"] == ["background", *SHAPES]
    assert info["classes"] == CLASSES and info["shapes"] == SHAPES and info["colors"] == list(COLORS)
    assert info["image_size"] == 64 and info["seed"] == 3
    assert info["train"]["num_samples"] == N and info["test"]["num_samples"] == 10
    for s in _samples(scene_dir) + _samples(scene_dir, "test"):
        assert {"jpg", "txt", "cls", "json", "seg.png"} <= set(s), sorted(s)
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.format == "JPEG" and im.size == (64, 64)
        with Image.open(io.BytesIO(s["seg.png"])) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (64, 64)


def test_regions_parse_and_objects_are_a_large_main_one_and_small_distractors(scene_dir):
    for s in _samples(scene_dir):
        meta = json.loads(s["json"])
        assert meta["source"] == "builtin-scenes" and (meta["width"], meta["height"]) == (64, 64)
        regions, problems = parse_regions(meta, meta["width"], meta["height"])
        assert problems == [] and len(regions) == len(meta["objects"]) == len(meta["regions"])
        objs = meta["objects"]
        assert 2 <= len(objs) <= 3
        assert [o["size"] for o in objs] == ["large"] + ["small"] * (len(objs) - 1)
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)  # distinct pairs within a scene
        for o, r in zip(objs, meta["regions"]):
            assert r["box"] == o["box"]
            assert all(isinstance(v, float) for v in o["box"])
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        # the main object is clearly the large one: compared by their pixels in the shape map where shapes differ
        seg = np.asarray(Image.open(io.BytesIO(s["seg.png"])))
        shapes = [o["shape"] for o in objs]
        area = {sh: int((seg == 1 + SHAPES.index(sh)).sum()) for sh in shapes if shapes.count(sh) == 1}
        for o in objs[1:]:
            if objs[0]["shape"] in area and o["shape"] in area:
                assert area[objs[0]["shape"]] > 2 * area[o["shape"]], (s["__key__"], area)
        main = objs[0]
        assert (meta["color"], meta["shape"], meta["size"]) == (main["color"], main["shape"], "large")
        assert meta["position"] in ("left", "right", "top", "bottom", "center")


def test_boxes_and_the_shape_map_agree(scene_dir):
    for s in _samples(scene_dir):
        meta = json.loads(s["json"])
        objs = meta["objects"]
        seg = np.asarray(Image.open(io.BytesIO(s["seg.png"])))
        assert set(np.unique(seg).tolist()) <= set(range(len(SHAPES) + 1))
        ys, xs = np.mgrid[0:64, 0:64] + 0.5  # pixel centres

        def inside(box):
            return (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])

        # every pixel of a shape lies in some box of that shape
        for value in np.unique(seg[seg > 0]).tolist():
            shape = SHAPES[value - 1]
            boxes = [o["box"] for o in objs if o["shape"] == shape]
            assert boxes, f"{s['__key__']}: {shape} in the shape map but in no object"
            covered = np.logical_or.reduce([inside(b) for b in boxes])
            assert not ((seg == value) & ~covered).any(), f"{s['__key__']}: {shape} pixels outside every {shape} box"
        for k, o in enumerate(objs):
            value = 1 + SHAPES.index(o["shape"])
            x0, y0, x1, y1 = o["box"]
            mine = (seg == value) & inside(o["box"])
            assert mine.sum() >= 0.3 * (x1 - x0) * (y1 - y0), f"{s['__key__']}: object {k} barely in its box"
            if sum(q["shape"] == o["shape"] for q in objs) == 1:
                # its shape is its own: all its pixels are in its box, and the box is tight around them, unless
                # a shape drawn later hides part of it
                assert not ((seg == value) & ~inside(o["box"])).any()
                if k == len(objs) - 1:
                    rows, cols = np.flatnonzero(mine.any(1)), np.flatnonzero(mine.any(0))
                    got = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
                    # the box is the 4x mask's: it also holds edge pixels covered less than half (thin tips)
                    assert np.abs(np.subtract(got, o["box"])).max() <= 1.5, (got, o["box"])


def test_region_captions_are_unique_and_name_colour_and_shape(scene_dir):
    for s in _samples(scene_dir):
        meta = json.loads(s["json"])
        captions = [r["caption"] for r in meta["regions"]]
        assert len(set(captions)) == len(captions)
        for o, c in zip(meta["objects"], captions):
            words = c.split()
            assert o["color"] in words and o["shape"] in words, c
            # unique in the scene: no other object has both this colour and this shape word
            assert not any(q is not o and q["color"] in words and q["shape"] in words for q in meta["objects"])


def test_scene_captions_name_every_object_and_the_label_is_the_main_object(scene_dir):
    samples = _samples(scene_dir)
    labels = Counter()
    for s in samples:
        meta = json.loads(s["json"])
        caps = meta["captions"]
        assert len(caps) >= 3 and s["txt"].decode() == caps[0] and len(set(caps)) == len(caps)
        for c in caps:
            low = c.lower()
            for o in meta["objects"]:
                assert o["color"] in low and o["shape"] in low, (c, o)
        assert any(w in caps[0].lower() for w in ("large", "big", "small", "little", "tiny")) or \
            any(w in c.lower() for c in caps for w in ("large", "big"))
        label = int(s["cls"])
        assert CLASSES[label] == f"{meta['color']} {meta['shape']}"
        labels[label] += 1
    assert len(labels) == len(CLASSES) and max(labels.values()) - min(labels.values()) <= 1  # balanced


def test_main_object_is_drawn_in_its_colour_under_its_box(scene_dir):
    s = _samples(scene_dir)[0]
    meta = json.loads(s["json"])
    img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.float32)
    seg = np.asarray(Image.open(io.BytesIO(s["seg.png"])))
    main = meta["objects"][0]
    x0, y0, x1, y1 = (int(round(v)) for v in main["box"])
    m = np.zeros_like(seg, dtype=bool)
    m[y0:y1, x0:x1] = seg[y0:y1, x0:x1] == 1 + SHAPES.index(main["shape"])
    mean = img[m].mean(0)
    dists = {c: float(np.linalg.norm(mean - np.asarray(rgb))) for c, rgb in COLORS.items()}
    assert min(dists, key=dists.get) == main["color"]


def test_cli_writes_the_scenes(tmp_path, capsys):
    out = tmp_path / "cli"
    assert mm_main(["shards", "builtin", str(out), "--scenes", "--n-train", "30", "--n-test", "5",
                    "--samples-per-shard", "10", "--no-gzip"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["scenes"] is True and info["image_size"] == 64  # 64 px is the default with --scenes
    assert [s["name"] for s in info["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(3)]
    assert "seg.png" in _samples(out, "test")[0]
    assert mm_main(["shards", "builtin", str(tmp_path / "small"), "--scenes", "--image-size", "48",
                    "--n-train", "3", "--n-test", "1"]) == 0
    assert json.loads((tmp_path / "small" / "info.json").read_text())["image_size"] == 48
    # without --scenes: the one-shape set at its own default size, as before
    assert mm_main(["shards", "builtin", str(tmp_path / "plain"), "--n-train", "3", "--n-test", "1"]) == 0
    plain = json.loads((tmp_path / "plain" / "info.json").read_text())
    assert plain["image_size"] == 32 and "scenes" not in plain
    assert mm_main(["shards", "builtin", str(tmp_path / "bad"), "--scenes", "--image-size", "8"]) == 2


def test_reader_decodes_the_scenes(scene_dir):
    """The training reader reads the shards (image, caption, label) with the extra seg member in each sample."""
    import mm
    from mm.data.decode import SampleDecoder
    from mm.data.wds import Collate, ShardStream

    info = json.loads((scene_dir / "info.json").read_text())
    urls = [str(scene_dir / s["name"]) for s in info["test"]["shards"]]
    dec = SampleDecoder(mm.image_transform(mm.get_preset("tiny-clip")), image_keys=["jpg"], need=("text",))
    batches = list(ShardStream(urls, dec, Collate(), 5, train=False))
    assert sum(len(b["keys"]) for b in batches) == 10
    raw = next(iter_shard(urls[0], print))
    seg = np.asarray(Image.open(io.BytesIO(raw["seg.png"])))
    assert seg.shape == (64, 64) and seg.max() > 0
