"""VisionConfig.resize_mode / interpolation: mm's eval transform is pixel-identical to open_clip's for every
combination, the defaults keep the old pixels, and training (worker and device paths) and export follow them."""
from __future__ import annotations

import dataclasses
import io
import random
import types

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes
from PIL import Image

import mm
from mm.data.transforms import EvalTransform, TrainTransform, image_transform

MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")
# (width, height): landscape, portrait, square, smaller than the target, odd sizes, the target itself, a
# strip whose short side becomes 1 pixel in longest mode, a one-pixel-wide column, and a strip whose short
# side rounds to 0 pixels in longest mode; the last two give a side of exactly x.5 in longest mode (at 48 and at
# 32): Python rounds it to even, as open_clip does
SIZES = [(64, 40), (37, 83), (50, 50), (20, 13), (77, 49), (48, 48), (48, 31), (200, 7), (1, 60), (33, 48), (300, 2),
         (96, 49), (49, 64)]


def noisy_gradient(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Gradient + uniform noise: both smooth and sharp content, so every resampling difference shows."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rgb = np.stack([x, y, 1 - (x + y) / 2], -1) * 170 + rng.integers(0, 86, (h, w, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").convert(mode)


def vision(size: int = 48, **kw) -> mm.models.VisionConfig:
    return dataclasses.replace(mm.get_preset("tiny-clip").vision, image_size=size, **kw)


def open_clip_eval(v, fill_color: int = 0):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(size=v.image_size, mode="RGB", mean=v.image_mean, std=v.image_std,
                        interpolation=v.interpolation, resize_mode=v.resize_mode, fill_color=fill_color)
    return image_transform_v2(cfg, is_train=False)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("resize_mode", MODES)
@pytest.mark.parametrize("target", [48, 32])
def test_eval_transform_is_pixel_identical_to_open_clip(resize_mode, interpolation, target):
    v = vision(target, resize_mode=resize_mode, interpolation=interpolation)
    ours, ref = image_transform(v, train=False), open_clip_eval(v)
    assert (ours.resize_mode, ours.interpolation) == (resize_mode, interpolation)
    checked = 0
    for k, (w, h) in enumerate(SIZES):
        for mode in ("RGB", "L"):  # open_clip resizes (and pads) in the image's own mode, converts after
            img = noisy_gradient(w, h, seed=k, mode=mode)
            try:
                want = ref(img)
            except ValueError:  # open_clip's longest mode rounds a side to 0 pixels and PIL refuses it
                assert resize_mode == "longest" and min(w, h) * target <= max(w, h) / 2
                assert ours(img).shape == (3, target, target)  # mm keeps a 1-pixel side instead
                continue
            got = ours(img)
            assert got.shape == (3, target, target)
            assert torch.equal(got, want), (resize_mode, interpolation, (w, h), mode, (got - want).abs().max())
            checked += 1
    assert checked >= 2 * len(SIZES) - 4


def test_the_settings_change_the_pixels():
    """Guards the test above: each mode and each interpolation gives different pixels on these images."""
    img = noisy_gradient(77, 49)
    outs = {(m, i): image_transform(vision(resize_mode=m, interpolation=i))(img) for m in MODES for i in INTERPOLATIONS}
    for a in outs:
        for b in outs:
            assert a == b or not torch.equal(outs[a], outs[b]), (a, b)


def _old_eval(img: Image.Image, size: int, mean, std) -> torch.Tensor:
    """EvalTransform.__call__ before resize_mode / interpolation existed, verbatim."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC)
    w, h = img.size
    s = size
    if w < s or h < s:
        canvas = Image.new(img.mode, (max(w, s), max(h, s)))
        canvas.paste(img, ((max(w, s) - w) // 2, (max(h, s) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    if (w, h) != (s, s):
        img = img.crop((left, top, left + s, top + s))
    x = torch.from_numpy(np.array(img.convert("RGB"), np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
    return x.sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))


@pytest.mark.parametrize("preset", ["tiny-clip", "ViT-B-32"])
def test_default_config_keeps_the_old_pixels(preset):
    v = mm.get_preset(preset).vision
    assert (v.resize_mode, v.interpolation) == ("shortest", "bicubic")
    t = image_transform(mm.get_preset(preset), train=False)
    for k, (w, h) in enumerate(SIZES[:7] + [(300, 225)]):
        img = noisy_gradient(w, h, seed=k)
        assert torch.equal(t(img), _old_eval(img, v.image_size, v.image_mean, v.image_std)), (w, h)


def test_train_transform_resamples_with_the_configured_interpolation():
    from torchvision.transforms import functional as TF

    img = noisy_gradient(70, 50, seed=3)
    outs = {}
    for interp, mode in (("bicubic", TF.InterpolationMode.BICUBIC), ("bilinear", TF.InterpolationMode.BILINEAR)):
        t = image_transform(vision(32, interpolation=interp, resize_mode="squash"), train=True)
        assert isinstance(t, TrainTransform) and t.interpolation == interp
        i, j, h, w = t.crop_params(70, 50, random.Random(9))
        ref = TF.normalize(TF.to_tensor(TF.resized_crop(img, i, j, h, w, [32, 32], mode)),
                           t.mean.flatten().tolist(), t.std.flatten().tolist())
        outs[interp] = t(img, random.Random(9))
        assert torch.equal(outs[interp], ref), interp
    assert not torch.equal(outs["bicubic"], outs["bilinear"])
    # the crop sampling does not depend on the settings
    a = image_transform(vision(32), train=True).crop_params(70, 50, random.Random(4))
    assert a == image_transform(vision(32, interpolation="bilinear"), train=True).crop_params(70, 50, random.Random(4))


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="resize_mode"):
        EvalTransform(32, (0.5,) * 3, (0.5,) * 3, resize_mode="crop")
    with pytest.raises(ValueError, match="interpolation"):
        TrainTransform(32, (0.5,) * 3, (0.5,) * 3, interpolation="nearest")


def test_device_decoding_follows_the_interpolation():
    from test_device_decode import photo

    from mm.data.gpu import DeferredTrainTransform, GpuImageDecoder, PendingImages

    v = vision(32)
    decoder = GpuImageDecoder(v.image_size, v.image_mean, v.image_std)
    datas = [jpeg_bytes(photo(seed=s)) for s in range(3)]
    cpu = {i: TrainTransform(32, v.image_mean, v.image_std, scale=(0.3, 0.6), interpolation=i) for i in INTERPOLATIONS}
    worker = {i: torch.stack([cpu[i](Image.open(io.BytesIO(d)).convert("RGB"), random.Random(k))
                              for k, d in enumerate(datas)]) for i in INTERPOLATIONS}
    for interp in INTERPOLATIONS:
        deferred = DeferredTrainTransform(cpu[interp], max_pixels=10**8)
        items = [deferred(d, random.Random(k)) for k, d in enumerate(datas)]
        assert all(x.interpolation == interp for x in items)
        on_device = decoder(PendingImages.collate(items), "cpu")
        diff = (on_device - worker[interp]).abs()
        assert diff.mean() < 0.02 and diff.max() < 0.25, (interp, diff.mean(), diff.max())
        other = "bilinear" if interp == "bicubic" else "bicubic"  # the test can tell the two apart
        assert diff.mean() < 0.5 * (on_device - worker[other]).abs().mean(), interp


@pytest.mark.parametrize("resize_mode", MODES)
def test_export_manifest_and_readme_describe_the_preprocessing(resize_mode):
    from mm.inference.export import _manifest, _readme

    cfg = dataclasses.replace(mm.get_preset("tiny-clip"), vision=vision(32, resize_mode=resize_mode,
                                                                        interpolation="bilinear"))
    m = _manifest(types.SimpleNamespace(config=cfg), "onnx", {"image": "image_encoder.onnx"}, True, "tiny")
    p = m["image_encoder"]["preprocess"]
    assert (p["resize_mode"], p["interpolation"], p["image_size"]) == (resize_mode, "bilinear", 32)
    assert "bilinear" in p["resize"] and "bicubic" not in p["resize"]
    line = next(x for x in _readme(m).splitlines() if x.startswith("- preprocessing"))
    assert "bilinear" in line and "bicubic" not in line
    assert {"shortest": "center crop 32x32", "longest": "pad to 32x32", "squash": "32x32 ignoring"}[resize_mode] in line
    default = _manifest(types.SimpleNamespace(config=mm.get_preset("tiny-clip")), "onnx", {"image": "x"}, True, None)
    assert default["image_encoder"]["preprocess"]["resize"].startswith("shortest side to image_size")
    assert "bicubic, antialiased" in default["image_encoder"]["preprocess"]["resize"]
