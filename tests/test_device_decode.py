"""data.decode: device -- JPEGs decoded and augmented in the main process on the training device
(torchvision's decode_jpeg; nvJPEG on CUDA). Checked here on the CPU device against the worker path."""
from __future__ import annotations

import io
import random

import pytest
import torch
from conftest import colour_image, jpeg_bytes, png_bytes
from PIL import Image

import mm
from mm.data.decode import BadSample
from mm.data.gpu import (
    DeferredImage,
    DeferredTrainTransform,
    GpuImageDecoder,
    PendingImages,
)
from mm.data.transforms import TrainTransform

CFG = mm.get_preset("tiny-clip").vision


def photo(w: int = 96, h: int = 72, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: a JPEG that survives compression without huge per-pixel error."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    rgb = torch.stack([x, y, (x + y) / 2]) * 200 + torch.rand(3, h, w, generator=g) * 40
    return Image.fromarray(rgb.clamp(0, 255).byte().permute(1, 2, 0).numpy())


def transforms():
    cpu = TrainTransform(CFG.image_size, CFG.image_mean, CFG.image_std, scale=(0.5, 1.0))
    return cpu, DeferredTrainTransform(cpu, max_pixels=10**8), GpuImageDecoder(CFG.image_size, CFG.image_mean, CFG.image_std)


def test_jpegs_are_deferred_with_the_crop_the_worker_path_would_draw():
    cpu, deferred, decoder = transforms()
    data = jpeg_bytes(photo())
    out = deferred(data, random.Random(5))
    assert isinstance(out, DeferredImage)
    assert out.box == cpu.crop_params(96, 72, random.Random(5))
    assert bytes(out.data.numpy()) == data


def test_device_decoding_matches_the_worker_path():
    cpu, deferred, decoder = transforms()
    datas = [jpeg_bytes(photo(seed=s)) for s in range(4)]
    pending = PendingImages.collate([deferred(d, random.Random(i)) for i, d in enumerate(datas)])
    on_device = decoder(pending, "cpu")
    reference = torch.stack([cpu(Image.open(io.BytesIO(d)).convert("RGB"), random.Random(i)) for i, d in enumerate(datas)])
    assert on_device.shape == reference.shape == (4, 3, CFG.image_size, CFG.image_size)
    # same crop, same decoder family; only PIL's uint8 rounding and the two bicubic kernels differ
    diff = (on_device - reference).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.25, (diff.mean(), diff.max())
    assert (on_device - reference[[1, 2, 3, 0]]).abs().mean() > 0.05  # order matters: the test can fail


def test_other_formats_and_rotated_photos_are_finished_in_the_worker():
    cpu, deferred, decoder = transforms()
    png = png_bytes(colour_image("red", 50))
    assert torch.equal(deferred(png, random.Random(1)), cpu(Image.open(io.BytesIO(png)).convert("RGB"), random.Random(1)))
    img = photo()
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: nvJPEG would ignore it
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert isinstance(deferred(buf.getvalue(), random.Random(1)), torch.Tensor)
    # a batch mixing both keeps every image in its place
    items = [deferred(png, random.Random(0)), deferred(jpeg_bytes(photo()), random.Random(0))]
    pending = PendingImages.collate(items)
    out = decoder(pending, "cpu")
    assert pending.ready_pos == [0] and pending.jpeg_pos == [1]
    assert torch.equal(out[0], items[0])


def test_corrupt_jpeg_bodies_are_bad_samples_in_the_worker():
    _, deferred, _ = transforms()
    data = jpeg_bytes(photo(200, 150))
    with pytest.raises(BadSample, match="undecodable image"):
        deferred(data[: len(data) // 2], random.Random(0))  # header intact, body cut
    with pytest.raises(BadSample, match="too many pixels"):
        DeferredTrainTransform(transforms()[0], max_pixels=100)(data, random.Random(0))


def test_training_with_device_decoding_runs_and_counts_bad_images(tmp_path):
    from conftest import colour_samples, write_tar
    from test_train import metrics, train, write_config

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        samples = colour_samples(16, start=16 * s)
        if s == 1:
            cut = samples[0][1]["jpg"]
            samples.append(("cut", {"jpg": cut[: len(cut) // 2], "txt": b"half a jpeg"}))
        write_tar(shards / f"train-{s:04d}.tar", samples)
    cfg = write_config(tmp_path, shards, "dev", data={"train": f"{shards}/train-{{0000..0002}}.tar", "batch_size": 4,
                                                      "workers": 2, "shuffle_buffer": 8, "decode": "device"})
    train(cfg, "train.steps=12")
    recs = metrics(tmp_path / "dev")
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert [r for r in recs if r.get("final")][0]["skipped_by_reason"] == {"undecodable image": 1}
