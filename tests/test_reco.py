"""Retrieval-augmented zero-shot (RECO; mm.models.reco, mm.inference.reco, `mm reco`, `mm zeroshot --datastore`): an
untrained fusion is the identity (zero-shot equals plain zero-shot), a pair's neighbours are the brute-force nearest
with its own sample left out, training is deterministic for a seed and lowers its loss, and a datastore made with
another model is refused."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import colour_samples, make_colour_shards, write_tar

import mm
from mm.cli import main as mm_main
from mm.inference import reco
from mm.inference.embed import EmbedError, embed_images, embed_texts
from mm.models.reco import RecoConfig, RecoFusion


@pytest.fixture(scope="module")
def pairs(model_dir, model, tmp_path_factory):
    d = tmp_path_factory.mktemp("reco")
    shards = make_colour_shards(d / "shards", shards=2, per_shard=24)
    spec = f"{shards}/train-{{0000..0001}}.tar"
    embed_images(model, [spec], d / "store" / "images", model_spec=str(model_dir), workers=0)
    embed_texts(model, spec, d / "store" / "texts", model_spec=str(model_dir), workers=0)
    return d, shards, spec, reco.PairStore(d / "store" / "images", d / "store" / "texts")


def test_pairs_join_captions_to_their_images_and_neighbours_leave_the_own_sample_out(pairs):
    _, _, _, store = pairs
    assert len(store) == 48 and store.keys[5] == "0/s00005"
    q = store.images[:10]
    got = reco.PairStore.nearest(store, q, "image", 4, exclude=store.key_ids[:10])
    for i in range(10):  # brute force: every other sample's pair by cosine, ties to the earlier row
        scores = store.images @ q[i]
        want = [j for j in sorted(range(len(store)), key=lambda j: (-float(scores[j]), j))
                if store.key_ids[j] != store.key_ids[i]][:4]
        assert got[i].tolist() == want
    plain = store.nearest(q, "image", 1)
    assert plain[:, 0].tolist() == list(range(10))  # without the exclusion each finds itself first


def test_an_untrained_fusion_is_plain_zero_shot(pairs, model):
    _, _, _, store = pairs
    fused = reco.RecoModel(model, RecoFusion(RecoConfig(dim=model.config.embed_dim, k=4)).eval(), store)
    size = model.config.vision.image_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = mm.get_tokenizer(model)(["a red square", "a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(fused.encode_image(x), model.encode_image(x, normalize=True), rtol=0, atol=1e-6)
        torch.testing.assert_close(fused.encode_text(tokens), model.encode_text(tokens, normalize=True), rtol=0,
                                   atol=1e-6)


def test_fusion_training_is_deterministic_and_learns(pairs):
    _, _, _, store = pairs
    cfg = RecoConfig(dim=store.images.shape[1], k=4, heads=4)
    a, log = reco.train_fusion(store, cfg, steps=30, batch_size=16, lr=3e-3, seed=1, log_every=5)
    b, _ = reco.train_fusion(store, cfg, steps=30, batch_size=16, lr=3e-3, seed=1, log_every=5)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    first = sum(r["loss"] for r in log[:2]) / 2
    last = sum(r["loss"] for r in log[-2:]) / 2
    assert last < first


def test_reco_and_zeroshot_commands(pairs, model_dir, tmp_path, capsys):
    _, shards, spec, _ = pairs
    out = tmp_path / "reco"
    assert mm_main(["reco", "--model", str(model_dir), "--images", spec, "--out", str(out), "--k", "4",
                    "--steps", "20", "--batch-size", "16"]) == 0
    info = json.loads((out / "reco.json").read_text())
    assert info["pairs"] == 48 and info["config"]["k"] == 4 and len(info["training"]["log"]) >= 1
    capsys.readouterr()
    test = str(shards / "test-0000.tar")
    assert mm_main(["zeroshot", "--model", str(model_dir), test, "--datastore", str(out), "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out.lower()
    torch.manual_seed(5)
    other = mm.save_pretrained(mm.create_model("tiny-clip"), tmp_path / "other")
    assert mm_main(["zeroshot", "--model", str(other), test, "--datastore", str(out), "--workers", "0"]) == 2
    assert "made with the model" in capsys.readouterr().err
    assert mm_main(["zeroshot", "--model", str(model_dir), test, "--datastore", str(tmp_path), "--workers", "0"]) == 2
    assert "not a RECO datastore" in capsys.readouterr().err


def test_sources_whose_keys_repeat_stay_apart_and_bad_stores_are_refused(pairs, model, tmp_path):
    d, _, _, one = pairs
    img, txt = d / "store" / "images", d / "store" / "texts"
    two = reco.PairStore([img, img], [txt, txt])  # two sources with the same keys (two sets numbered from 0)
    assert len(two) == 2 * len(one) and two.keys[0] == "0/s00000" and two.keys[len(one)] == "1/s00000"
    got = two.nearest(two.images[:1], "image", 1, exclude=two.key_ids[:1])
    assert got[0, 0] == len(one)  # its twin in the other source is another sample: not left out
    with pytest.raises(EmbedError, match="must hold images"):
        reco.PairStore(txt, txt)
    dup = write_tar(tmp_path / "dup.tar", colour_samples(3) + colour_samples(2))  # s00000, s00001 twice
    embed_images(model, [str(dup)], tmp_path / "i", workers=0)
    embed_texts(model, str(dup), tmp_path / "t", workers=0)
    with pytest.raises(EmbedError, match=r"sample key 's00000' appears twice"):
        reco.PairStore(tmp_path / "i", tmp_path / "t")
