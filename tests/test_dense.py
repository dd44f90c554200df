"""The dense linear probe (mm/eval/dense.py): patch labels, the class map's geometry, mIoU, and the whole probe on
shards with class maps."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import mm
from mm.data.scenes import generate_scenes
from mm.data.transforms import EvalTransform
from mm.eval.dense import _SegTransform, dense_probe, miou, patch_features, patch_labels, predict
from mm.eval.probe import fit_logistic


def test_patch_labels_are_each_patchs_majority_class():
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 4, (3, 12, 16), generator=g)
    got = patch_labels(seg, 4)
    assert got.shape == (3, 12)
    for b in range(3):
        for i in range(3):
            for j in range(4):
                block = seg[b, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4].flatten().tolist()
                counts = [block.count(c) for c in range(4)]
                assert got[b, i * 4 + j] == counts.index(max(counts))  # ties: the smaller id, as argmax


def test_miou_counts_every_class_present():
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    target = torch.tensor([0, 1, 1, 1, 2, 0])
    m, per = miou(pred, target, 4)
    assert per[0] == pytest.approx(1 / 3) and per[1] == pytest.approx(2 / 3) and per[2] == pytest.approx(1 / 2)
    assert per[3] is None and m == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_class_maps_follow_the_images_geometry(mode):
    """A map whose classes are the image's colours: after the map's transform, each class sits where its colour is
    in the transformed image."""
    w, h = 40, 24
    seg = np.zeros((h, w), np.uint8)
    seg[:, 10:20], seg[5:15, 25:35] = 1, 2
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    img = Image.fromarray(colours[seg])
    t = EvalTransform(16, (0, 0, 0), (1, 1, 1), resize_mode=mode, interpolation="bilinear")
    mapped = np.asarray(_SegTransform(t)(Image.fromarray(seg)))
    pixels = (t(img) * 255).round().permute(1, 2, 0).numpy()
    red = (pixels[..., 0] > 200) & (pixels[..., 2] < 50)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 50)
    assert mapped.shape == (16, 16)
    assert (mapped[red] == 1).mean() > 0.9 and (mapped[blue] == 2).mean() > 0.9


def test_a_linear_probe_on_separable_patch_features_segments_perfectly():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (20, 16), generator=g)
    feats = torch.nn.functional.one_hot(labels, 3).float() * 4 + 0.1 * torch.randn(20, 16, 3, generator=g)
    W, b = fit_logistic(feats.flatten(0, 1), labels.flatten(), 3, 1e-4, max_iter=200)
    m, _ = miou(predict(feats, W, b).flatten(), labels.flatten(), 3)
    assert m == 1.0


def test_dense_probe_on_shards_with_class_maps(tmp_path):
    generate_scenes(tmp_path, n_train=24, n_test=8, image_size=32, samples_per_shard=24, verbose=False)
    torch.manual_seed(0)
    model = mm.create_model("tiny-siglip2", vision__image_size=32, vision__transformer__depth=1,
                            text__transformer__depth=1)
    from mm.eval.config import ShardReading

    one = ShardReading(workers=0)  # shard order (with workers, the samples of one shard are split between them)
    x, y = patch_features(model, f"{tmp_path}/test-000000.tar.gz", reading=one)
    assert x.shape == (8, 16, 192) and y.shape == (8, 16)
    with torch.no_grad():
        from mm.data.wds import check_urls
        from mm.eval.dense import seg_batches

        batch = next(iter(seg_batches(model, check_urls(f"{tmp_path}/test-000000.tar.gz", "t"), batch_size=8,
                                       reading=one)))
        assert torch.allclose(x, model.vision(batch["images"]).tokens, atol=1e-5)
    # the labels are the stored maps' own majority per 8 x 8 patch (the model's input is the stored 32 px image)
    import tarfile

    with tarfile.open(tmp_path / "test-000000.tar.gz") as tar:
        segs = [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
                for m in sorted(tar.getmembers(), key=lambda m: m.name) if m.name.endswith(".seg.png")]
    assert torch.equal(y, patch_labels(torch.from_numpy(np.stack(segs)).long(), 8))
    r = dense_probe(model, f"{tmp_path}/train-000000.tar.gz", f"{tmp_path}/test-000000.tar.gz", n_classes=6,
                    max_iter=50)
    assert r["n_train"] == 24 * 16 and r["n_test"] == 8 * 16 and 0 <= r["dense_miou"] <= 1
    assert r["dense_acc"] == pytest.approx((predict(x, r["W"], r["b"]) == y).double().mean().item())
    coca = mm.create_model("tiny-coca")
    with pytest.raises(ValueError, match="patch tokens"):
        patch_features(coca, f"{tmp_path}/test-000000.tar.gz")
