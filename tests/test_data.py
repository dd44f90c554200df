"""Decoding odd images, shard reading, and the stream's determinism and resume positions."""
from __future__ import annotations

import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import colour_image, colour_samples, jpeg_bytes, png_bytes, write_tar
from PIL import Image

import mm
from mm.data.decode import BadSample, SampleDecoder, decode_image, decode_text
from mm.data.wds import (
    Collate,
    ShardStream,
    check_urls,
    expand_urls,
    iter_shard,
    make_loader,
)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header announcing a huge image, with a tiny (incomplete) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def test_decode_odd_modes_to_rgb():
    # 16-bit grayscale: values scaled, not clipped to white
    arr16 = np.full((8, 8), 32768, dtype=np.uint16)
    img = decode_image(png_bytes(Image.fromarray(arr16)), 10**8)
    assert img.mode == "RGB" and abs(np.asarray(img)[0, 0, 0] - 128) <= 1
    # RGBA: transparent pixels become white, opaque keep their colour
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (255, 0, 0, 255)
    out = np.asarray(decode_image(png_bytes(Image.fromarray(rgba, "RGBA")), 10**8))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[3, 3]) == (255, 255, 255)
    # CMYK JPEG -> RGB close to the source colour
    cmyk = Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK")
    out = np.asarray(decode_image(jpeg_bytes(cmyk), 10**8)).astype(int)
    assert out.shape == (16, 16, 3) and abs(out[8, 8, 0] - 200) < 20 and out[8, 8, 1] < 60
    # palette with transparency, grayscale
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    pal.info["transparency"] = 0
    assert tuple(np.asarray(decode_image(png_bytes(pal), 10**8))[0, 0]) in {(255, 255, 255), (0, 0, 255)}
    assert decode_image(png_bytes(Image.new("L", (3, 3), 77)), 10**8).getpixel((0, 0)) == (77, 77, 77)


def test_decode_applies_exif_orientation():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(jpeg_bytes(img, exif=exif.tobytes()), 10**8)
    assert out.size == (10, 20)


@pytest.mark.parametrize("data, reason", [
    (b"not an image at all", "undecodable image"),
    (jpeg_bytes(colour_image("red", 64))[:300], "undecodable image"),  # truncated JPEG
    (bomb_png(), "too many pixels"),
])
def test_bad_images_are_rejected_with_a_reason(data, reason):
    with pytest.raises(BadSample) as e:
        decode_image(data, 89_478_485)
    assert e.value.reason == reason


@pytest.mark.parametrize("data, reason", [(None, "no caption"), (b"  \n", "empty caption"),
                                          (b"\xff\xfe caf\xe9", "caption not UTF-8")])
def test_bad_captions_are_rejected_with_a_reason(data, reason):
    with pytest.raises(BadSample) as e:
        decode_text(data)
    assert e.value.reason == reason


def test_truncated_shard_keeps_complete_samples_and_warns(tmp_path):
    import tarfile

    path = write_tar(tmp_path / "a.tar", colour_samples(10))
    with tarfile.open(path) as tar:
        cut = tar.getmember("s00006.jpg").offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])  # cut off inside sample 6's image
    warnings = []
    got = list(iter_shard(str(path), warnings.append))
    assert [s["__key__"] for s in got] == [f"s{i:05d}" for i in range(6)]  # 0..5 complete, 6 lost
    assert len(warnings) == 1 and str(path) in warnings[0] and "cut off" in warnings[0]


def test_url_expansion_and_missing_shard_error(colour_shards):
    urls = expand_urls(f"{colour_shards}/train-{{0000..0002}}.tar::{colour_shards}/test-0000.tar")
    assert len(urls) == 4
    with pytest.raises(mm.ConfigError, match=r"data.train: shard .*train-0003.tar.* not found \(5 of 8"):
        check_urls(f"{colour_shards}/train-{{0000..0007}}.tar", "data.train")


def _stream(shards, rank=0, world=1, batch_size=4, **kw):
    model_cfg = mm.get_preset("tiny-clip")
    dec = SampleDecoder(mm.image_transform(model_cfg, train=True), image_keys=["jpg"], need=("text", "label"))
    urls = expand_urls(f"{shards}/train-{{0000..0002}}.tar")
    return ShardStream(urls, dec, Collate(mm.get_tokenizer("tiny-clip")), batch_size, seed=3, shuffle_buffer=6,
                       rank=rank, world=world, **kw)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_visits_every_sample_once_across_ranks_and_workers(colour_shards, workers):
    seen = Counter()
    for rank in range(2):
        loader = make_loader(_stream(colour_shards, rank=rank, world=2, batch_size=1), workers)
        # 3 shards over 2 ranks (x 2 workers): split by shard or, with fewer shards than workers, by sample
        for b in _take(loader, 40):
            if b["meta"]["epoch"] == 0:
                seen.update(b["keys"])
    assert len(seen) == 48 and set(seen.values()) == {1}


def test_stream_is_deterministic_and_epochs_reshuffle(colour_shards):
    a = _take(make_loader(_stream(colour_shards), 2), 16)
    b = _take(make_loader(_stream(colour_shards), 2), 16)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        torch.testing.assert_close(x["images"], y["images"], atol=0, rtol=0)  # same augmentation
    order = [k for x in a for k in x["keys"]]
    assert order[:48] != order[48:]  # epoch 1 in another order
    assert sorted(order[:24]) != sorted(order[24:48]) or order[:24] != order[24:48]


@pytest.mark.parametrize("consumed", [1, 5, 6, 7])
def test_resuming_from_consumed_positions_continues_the_exact_batch_sequence(colour_shards, consumed):
    workers = 2
    full = _take(make_loader(_stream(colour_shards), workers), consumed + 6)
    positions = {}
    for b in full[:consumed]:
        positions[b["meta"]["worker"]] = (b["meta"]["epoch"], b["meta"]["pos"])
    resumed = _take(make_loader(_stream(colour_shards, start=positions, rotation=consumed % workers), workers), 6)
    for x, y in zip(full[consumed:], resumed):
        assert x["keys"] == y["keys"]
        torch.testing.assert_close(x["images"], y["images"], atol=0, rtol=0)
        torch.testing.assert_close(x["tokens"], y["tokens"], atol=0, rtol=0)


def test_bad_samples_are_counted_and_named(tmp_path):
    good = colour_samples(6)
    bad = [("bad_jpeg", {"jpg": b"garbage", "txt": b"x"}), ("no_caption", {"jpg": good[0][1]["jpg"]}),
           ("latin1", {"jpg": good[0][1]["jpg"], "txt": b"caf\xe9"})]
    path = write_tar(tmp_path / "a.tar", good[:3] + bad + good[3:])
    dec = SampleDecoder(mm.image_transform(mm.get_preset("tiny-clip")), image_keys=["jpg"], need=("text",))
    stream = ShardStream([str(path)], dec, Collate(), 3, train=False)
    batches = list(stream)
    assert sum(len(b["keys"]) for b in batches) == 6
    skipped = Counter()
    for b in batches:
        skipped.update(b["meta"]["skipped"])
    assert skipped == {"undecodable image": 1, "no caption": 1, "caption not UTF-8": 1}
    names = [line for b in batches for line in b["meta"]["bad"]]
    assert any("bad_jpeg" in n and "a.tar" in n for n in names) and len(names) == 3


def test_bad_samples_after_the_last_full_batch_are_still_reported(tmp_path):
    good = colour_samples(4)
    path = write_tar(tmp_path / "a.tar", good + [("tail_bad", {"jpg": b"garbage", "txt": b"x"})])
    dec = SampleDecoder(mm.image_transform(mm.get_preset("tiny-clip")), image_keys=["jpg"], need=("text",))
    batches = list(ShardStream([str(path)], dec, Collate(), 4, train=False))
    assert [len(b.get("keys", [])) for b in batches] == [4, 0]
    assert "images" not in batches[1] and batches[1]["meta"]["skipped"] == {"undecodable image": 1}
    assert any("tail_bad" in line for line in batches[1]["meta"]["bad"])


def test_all_bad_shards_raise_instead_of_hanging(tmp_path):
    path = write_tar(tmp_path / "a.tar", [(f"k{i}", {"jpg": b"junk", "txt": b"x"}) for i in range(5)])
    dec = SampleDecoder(mm.image_transform(mm.get_preset("tiny-clip")), image_keys=["jpg"], need=("text",))
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(ShardStream([str(path)], dec, Collate(), 2, train=True)))


def test_train_transform_is_a_function_of_the_rng():
    import random

    t = mm.image_transform(mm.get_preset("tiny-clip"), train=True)
    img = colour_image("blue", 64, seed=1)
    a, b = t(img, random.Random(5)), t(img, random.Random(5))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert a.shape == (3, 32, 32)
    assert not torch.equal(a, t(img, random.Random(6)))


@pytest.mark.parametrize("size", [(40, 40), (64, 48), (31, 90), (20, 20), (32, 32), (500, 375)])
def test_eval_transform_matches_open_clip_preprocessing(size):
    import open_clip

    _, _, ref = open_clip.create_model_and_transforms("ViT-B-32", device="meta")  # its 224 px eval pipeline
    ours = mm.image_transform(mm.get_preset("ViT-B-32"), train=False)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
    torch.testing.assert_close(ours(img), ref(img), atol=0, rtol=0)


def test_train_transform_matches_torchvision_resized_crop():
    import random

    from torchvision.transforms import functional as TF

    t = mm.image_transform(mm.get_preset("tiny-clip"), train=True)
    img = colour_image("green", 70, seed=2).resize((70, 50))
    i, j, h, w = t.crop_params(70, 50, random.Random(9))
    ref = TF.normalize(TF.to_tensor(TF.resized_crop(img, i, j, h, w, [32, 32], TF.InterpolationMode.BICUBIC)),
                       t.mean.flatten().tolist(), t.std.flatten().tolist())
    torch.testing.assert_close(t(img, random.Random(9)), ref, atol=0, rtol=0)


def test_pipe_urls_and_resampled_mode(colour_shards):
    dec = SampleDecoder(mm.image_transform(mm.get_preset("tiny-clip")), image_keys=["jpg"], need=("text",))
    urls = [f"pipe:cat {colour_shards}/train-0000.tar", f"pipe:cat {colour_shards}/train-0001.tar"]
    once = list(ShardStream(urls, dec, Collate(), 8, train=False))
    assert sum(len(b["keys"]) for b in once) == 32
    stream = ShardStream(urls, dec, Collate(), 8, train=True, resampled=True, seed=1)
    it = iter(stream)
    keys = [k for _ in range(12) for k in next(it)["keys"]]  # 96 samples from 32: drawn with replacement
    assert len(keys) == 96 and len(set(keys)) <= 32
