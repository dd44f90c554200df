"""NaFlex: images at their own aspect ratio as padded patch sequences (mm/models/patches.py) through the same image
tower as square images."""
from __future__ import annotations

import pytest
import torch

from mm.config import apply_overrides
from mm.models import build_model, get_preset
from mm.models.patches import Patches, patchify, square_patches

# (preset, overrides): every kind of position and pooling the tower has
TOWERS = [
    ("tiny-clip", {}),  # learned positions, class token
    ("tiny-clip", {"vision.pos_embed": "sincos2d"}),
    ("tiny-clip", {"vision.pos_embed": "rope2d"}),
    ("tiny-clip", {"vision.pool": "mean", "vision.class_token": False}),
    ("tiny-clip", {"vision.final_ln_after_pool": True, "vision.pool": "mean"}),
    ("tiny-siglip2", {"vision.stem": "patch"}),  # map pooling, no class token
    ("tiny-coca", {}),  # attentional pooling
]
GRIDS = [(2, 8), (4, 4), (8, 2), (3, 5), (1, 16), (16, 1)]  # aspect ratios 1:8 ... 8:1, 15-16 patches


def _tower(name, overrides, seed=0):
    torch.manual_seed(seed)
    cfg = apply_overrides(get_preset(name), overrides) if overrides else get_preset(name)
    return build_model(cfg).eval()


def _ids(t):
    return "-".join([t[0]] + [f"{k.split('.')[-1]}={v}" for k, v in t[1].items()])


@pytest.mark.parametrize("tower", TOWERS, ids=_ids)
def test_square_batch_through_the_naflex_path_is_the_square_path(tower):
    """A square batch as Patches gives exactly (bit for bit) the square path's embedding and tokens."""
    model = _tower(*tower)
    v = model.config.vision
    x = torch.randn(3, 3, v.image_size, v.image_size)
    with torch.no_grad():
        a, b = model.vision(x), model.vision(square_patches(x, v.patch_size))
    assert b.valid is None
    assert torch.equal(a.emb, b.emb) and torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("tower", TOWERS, ids=_ids)
def test_an_image_in_a_padded_batch_is_the_image_alone(tower):
    """Mixed grids padded to one length: each image's embedding (and its tokens) equals its own unpadded run;
    padding changes nothing an image computes."""
    model = _tower(*tower)
    p = model.config.vision.patch_size
    torch.manual_seed(1)
    items = [patchify(torch.randn(3, p * r, p * c), p) for r, c in GRIDS]
    with torch.no_grad():
        batch = model.vision(Patches.stack(items, length=20))
        alone = [model.vision(Patches.stack([it])) for it in items]
    for i, one in enumerate(alone):
        torch.testing.assert_close(batch.emb[i], one.emb[0], atol=1e-5, rtol=1e-5)
        if model.config.vision.pool != "attn":
            n = one.tokens.shape[1]
            torch.testing.assert_close(batch.tokens[i, :n], one.tokens[0], atol=1e-5, rtol=1e-5)
            assert batch.valid[i].sum() == n and batch.valid[i, :n].all()
    assert not torch.allclose(batch.emb[0], batch.emb[2])  # 2x8 and 8x2 grids: positions differ


def test_positions_are_resized_to_each_grid_and_learn():
    """A grid other than the table's reads a resized table: different grids give different embeddings of the same
    patches, and the position table gets a gradient through the resize."""
    model = _tower("tiny-clip", {})
    p = model.config.vision.patch_size
    patches = torch.randn(16, p * p * 3)
    shapes = [(2, 8), (8, 2), (4, 4)]
    batch = Patches.stack([(patches, s) for s in shapes])
    model.train()
    out = model.vision(batch)
    assert not torch.allclose(out.emb[0], out.emb[1]) and not torch.allclose(out.emb[0], out.emb[2])
    out.emb.sum().backward()
    g = model.vision.pos_embed.grad
    assert g is not None and g[1:].abs().sum(1).gt(0).all()  # every patch row of the table reached


def test_patch_dropout_drops_padding_first():
    """FLIP patch dropout on a padded batch keeps real patches before padding: with 16 of 24 positions kept, an
    image of 16 or fewer patches keeps all of them, so its training-mode output is its output without dropout
    (map pooling: no class token to hide an image whose real patches were all dropped)."""
    model = _tower("tiny-siglip2", {"vision.stem": "patch", "vision.patch_dropout": 1 / 3})
    p = model.config.vision.patch_size
    items = [patchify(torch.randn(3, p * r, p * c), p) for r, c in GRIDS]
    batch = Patches.stack(items, length=24)
    with torch.no_grad():
        want = model.vision(batch).emb
        model.train()
        got = model.vision(batch).emb
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    out = model.vision(batch)
    out.emb.square().sum().backward()
    assert torch.isfinite(model.vision.patch_embed.weight.grad).all()


def test_coca_decoder_attends_to_real_tokens_only():
    """A CoCa whose decoder reads the ViT's own tokens (map pooling): a padded batch's caption logits equal each
    image's own; generation refuses a padded batch by name instead of attending to padding."""
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("tiny-coca"), {"vision.pool": "map", "vision.class_token": False})
    model = build_model(cfg).eval()
    p = cfg.vision.patch_size
    items = [patchify(torch.randn(3, p * r, p * c), p) for r, c in [(2, 8), (4, 4)]]
    tokens = torch.randint(1, 1000, (2, 12))
    tokens[:, 0], tokens[:, 9], tokens[:, 10:] = cfg.text.sot_id, cfg.text.eot_id, cfg.text.pad_id
    with torch.no_grad():
        both = model(Patches.stack(items, length=20), tokens)
        ones = [model(Patches.stack([it]), tokens[i : i + 1]) for i, it in enumerate(items)]
    per_row = both.caption_logits.shape[0] // 2
    for i, one in enumerate(ones):
        torch.testing.assert_close(both.caption_logits[i * per_row : (i + 1) * per_row], one.caption_logits,
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one at a time"):
        model.image_tokens(Patches.stack(items, length=20))


def test_patches_slice_and_move():
    """Slicing a batch trims it to its rows' longest sequence (gradient caching's chunks), ``to`` keeps the grid
    shapes on the host."""
    items = [(torch.randn(r * c, 12), (r, c)) for r, c in [(2, 2), (4, 4), (1, 3)]]
    batch = Patches.stack(items)
    assert batch.padded and batch.shape == (3, 16, 12)
    first = batch[0:1]
    assert first.shape == (1, 4, 12) and not first.padded and torch.equal(first.pixels[0], items[0][0])
    pair = batch[torch.tensor([0, 2])]
    assert pair.shape == (2, 4, 12) and pair.padded and pair.valid[1].sum() == 3
    moved = batch.to(dtype=torch.float64)
    assert moved.pixels.dtype == torch.float64 and moved.shapes.device.type == "cpu"
    assert batch.padding_fraction() == pytest.approx(1 - 23 / 48)
    with pytest.raises(ValueError, match="2x2 grid"):
        Patches.stack([(torch.randn(5, 12), (2, 2))])


def test_axial_rope_and_conv_stem_refuse_patch_sequences():
    model = _tower("tiny-siglip2", {})  # conv stem
    p = model.config.vision.patch_size
    with pytest.raises(ValueError, match="stem"):
        model.vision(Patches.stack([patchify(torch.randn(3, p * 2, p * 4), p)]))
    model = _tower("tiny-clip", {"vision.rope.temperature": 100.0})  # timm's axial RoPE scales to a fixed grid
    p = model.config.vision.patch_size
    with pytest.raises(ValueError, match="axial RoPE"):
        model.vision(Patches.stack([patchify(torch.randn(3, p * 2, p * 4), p)]))


def test_compiled_tower_stops_recompiling_after_each_length_is_seen():
    """Under torch.compile, batches of new grids at lengths already seen add no graph: the per-grid position resize
    runs outside the graph, and the rest sees one shape per sequence length (dynamo only: backend eager). (An
    unpadded batch, every image filling the length, takes the unmasked graph: at most one more per length.)"""
    import random

    from torch._dynamo.utils import counters

    from mm.data.transforms import naflex_size

    torch._dynamo.reset()
    counters.clear()
    model = _tower("tiny-clip", {})
    tower = torch.compile(model.vision, backend="eager")
    rng = random.Random(0)

    def batch(length, size):  # the first image 2:1, which leaves padding at every length here: always masked
        items = []
        for i in range(size):
            a = 2.0 if i == 0 else rng.choice([0.25, 0.5, 1.0, 2.0, 4.0])
            w, h = (128, round(128 / a)) if a >= 1 else (round(128 * a), 128)
            th, tw = naflex_size(h, w, 4, length)
            items.append(patchify(torch.randn(3, th, tw), 4))
        return Patches.stack(items, length=length)

    plan = [(16, 8), (36, 4), (64, 2)]
    for length, size in plan:
        tower(batch(length, size)).emb.sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    for length, size in plan * 2:  # new images, new grids, the same lengths
        tower(batch(length, size)).emb.sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
