"""NaFlex interop: mm's image tower on padded patch batches (mm.models.patches.Patches: aspect ratios 1:4, 1:2, 1:1,
2:1, 4:1 and a small image, padded to sequence lengths 64 / 256 / 576) equals timm's NaFlexVit (converted by
mm.hub.timm_naflex) and Hugging Face's Siglip2 (imported by mm.hub.from_hf) on the same batches, to 1e-5 in fp32.
Small random models are built offline and every tensor perturbed (so a swapped mapping cannot pass). The Hugging Face
tests are marked `hf` and skip without transformers; timm is a core dependency."""
from __future__ import annotations

import math

import pytest
import torch

from mm.hub import ConversionError, from_hf
from mm.hub.timm_naflex import convert_timm_naflex, from_timm_naflex
from mm.models import VisionTower
from mm.models.patches import Patches, patchify

TOL = 1e-5
RATIOS = ((1, 4), (1, 2), (1, 1), (2, 1), (4, 1))  # rows : cols
LENGTHS = (64, 256, 576)
NEEDS_TRANSFORMERS = "needs the optional transformers extra: pip install 'mm[hf]'"


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def grids(length: int) -> list[tuple[int, int]]:
    """Per aspect ratio the largest grid of exactly that ratio within ``length`` patches (some fill the sequence,
    some leave padding), then a small 2x3 grid (mostly padding; the table shrinks in both directions)."""
    out = []
    for a, b in RATIOS:
        k = math.isqrt(length // (a * b))
        out.append((a * k, b * k))
    return [*out, (2, 3)]


def batch(length: int, patch: int, seed: int = 0) -> Patches:
    """Random images of :func:`grids`' shapes, cut into ``patch``-pixel patches (mm's and both peers' layout:
    row-major, channels last inside a patch) and padded to ``length``."""
    g = torch.Generator().manual_seed(seed)
    return Patches.stack([patchify(torch.randn(3, r * patch, c * patch, generator=g), patch)
                          for r, c in grids(length)], length)


def test_grids_mix_aspect_ratios_and_padding():
    for length in LENGTHS:
        shapes = grids(length)
        assert [r * b == c * a for (r, c), (a, b) in zip(shapes, RATIOS)] == [True] * len(RATIOS)
        p = batch(length, 4)
        assert p.padded and p.shape[1] == length and int(p.lengths().max()) <= length
        assert any(r * c == length for r, c in shapes) and any(r * c < length for r, c in shapes)


# ------------------------------------------------------------------------------------------------ timm NaFlexVit

# a SigLIP-like tower (map pooling, no class token, no head); mean pooling over the patches with a class token, a
# pre-norm, qk-norm and LayerScale; a class token pooled with a classifier head; map pooling that includes the class token,
# bilinear table resizing, patches flattened channels first, tanh-GELU and a pool of its own shape
TIMM_CONFIGS = {
    "siglip_map": dict(global_pool="map"),
    "avg_cls_prenorm": dict(global_pool="avg", class_token=True, pre_norm=True, init_values=0.1, qk_norm=True),
    "token_head": dict(global_pool="token", class_token=True, num_classes=10),
    "map_cls_bilinear": dict(global_pool="map", class_token=True, pool_include_prefix=True,
                             pos_embed_interp_mode="bilinear", patchify_channels_last=False, act_layer="gelu_tanh",
                             mlp_ratio=3.0, attn_pool_num_heads=2, attn_pool_mlp_ratio=2.0),
}


def tiny_naflexvit(seed: int = 0, num_classes: int = 0, **kw):
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    torch.manual_seed(seed)
    cfg = NaFlexVitCfg(patch_size=8, embed_dim=64, depth=2, num_heads=4, pos_embed_grid_size=(8, 8), **kw)
    return cfg, perturbed(NaFlexVit(cfg=cfg, num_classes=num_classes), seed)


def timm_naflex(model, p: Patches) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's pooled features (its logits with a head) and final tokens of ``p``, fed as its NaFlex dict input."""
    pixels = p.pixels
    if not model.embeds.channels_last:  # the same patches flattened (channel, row, column)
        b, n, d = pixels.shape
        k = math.isqrt(d // 3)
        pixels = pixels.reshape(b, n, k, k, 3).permute(0, 1, 4, 2, 3).reshape(b, n, d)
    feats = model.forward_features(pixels, patch_coord=p.coords, patch_valid=p.valid)
    pooled = model.forward_head(feats["patches"], pre_logits=model.num_classes == 0, patch_valid=feats["patch_valid"])
    assert torch.equal(pooled, model({"patches": pixels, "patch_coord": p.coords, "patch_valid": p.valid}))
    return pooled, feats["patches"][:, model.num_prefix_tokens:]


@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_naflexvit_converts_exactly(name):
    kw = dict(TIMM_CONFIGS[name])
    cfg, model = tiny_naflexvit(num_classes=kw.pop("num_classes", 0), **kw)
    tower = from_timm_naflex(model)
    v = tower.cfg
    assert v.grid == 8 and v.patch_size == 8 and v.class_token == cfg.class_token
    assert v.pos_interpolation == cfg.pos_embed_interp_mode
    assert (v.proj == "none") == (model.num_classes == 0) and tower.transformer.blocks[0].ffn.fc1.out_features == \
        model.blocks[0].mlp.fc1.out_features
    if cfg.class_token:  # timm's class token has no position: mm's row 0 is zero
        assert not tower.pos_embed[0].any()
    # the same conversion from the config and state dict
    vision, embed_dim, sd = convert_timm_naflex(cfg, model.state_dict())
    assert vision == v and embed_dim == (model.num_classes or 64)
    assert all(torch.equal(sd[k], x) for k, x in tower.state_dict().items())
    diffs = []
    with torch.no_grad():
        for length in LENGTHS:
            p = batch(length, 8, seed=length)
            pooled, tokens = timm_naflex(model, p)
            out = tower(p)
            # tokens after the final norm (with fc_norm, timm's norm follows pooling: un-normed in both)
            d_pool, d_tok = max_diff(pooled, out.emb), max_diff(tokens[p.valid], out.tokens[out.valid])
            diffs.append((length, d_pool, d_tok))
            assert d_pool < TOL and d_tok < TOL, (length, d_pool, d_tok)
    print(f"timm NaFlexVit {name}: " + ", ".join(f"L{n} pooled {a:.2g} tokens {b:.2g}" for n, a, b in diffs))


def test_naflexvit_square_images_equal_mm_square_path():
    """Whole square images: timm patchifies them itself, mm runs its convolution; a conv patch embedding
    (embed_proj_type conv) converts too."""
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for proj in ("linear", "conv"):
        torch.manual_seed(0)
        cfg = NaFlexVitCfg(patch_size=8, embed_dim=64, depth=2, num_heads=4, pos_embed_grid_size=(8, 8),
                           global_pool="map", embed_proj_type=proj)
        model = perturbed(NaFlexVit(cfg=cfg, num_classes=0))
        tower = from_timm_naflex(model)
        with torch.no_grad():
            d = max_diff(model(images), tower(images).emb)
        assert d < TOL, (proj, d)


@pytest.mark.parametrize(("changes", "field"), [
    (dict(reg_tokens=1), "reg_tokens"),
    (dict(pos_embed="factorized"), "pos_embed"),
    (dict(rope_type="axial", pos_embed="none"), "rope_type"),
    (dict(global_pool="avgmax"), "global_pool"),
    (dict(class_token=True, global_pool="map"), "pool_include_prefix"),
    (dict(class_token=True, global_pool="avg", pool_include_prefix=True), "pool_include_prefix"),
    (dict(global_pool="map", fc_norm=True), "fc_norm"),
    (dict(final_norm=False), "final_norm"),
    (dict(pos_embed_grid_size=(8, 6)), "pos_embed_grid_size"),
    (dict(pos_embed_use_grid_sample=True), "pos_embed_use_grid_sample"),
    (dict(pos_embed_ar_preserving=True), "pos_embed_ar_preserving"),
    (dict(pos_embed_antialias=False), "pos_embed_antialias"),
    (dict(pos_embed_interp_mode="nearest"), "pos_embed_interp_mode"),
    (dict(proj_bias=False), "proj_bias"),
    (dict(swiglu_mlp=True), "blocks.0"),
    (dict(embed_norm_layer="layernorm"), "embed_norm_layer"),
])
def test_naflexvit_refuses_what_mm_cannot_express(changes, field):
    from timm.models.naflexvit import NaFlexVitCfg

    cfg = NaFlexVitCfg(**{**dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, pos_embed_grid_size=(8, 8)),
                          **changes})
    with pytest.raises(ConversionError, match=f"{field}: "):
        convert_timm_naflex(cfg, {})


def test_naflexvit_state_dict_mismatch_names_the_tensor():
    cfg, model = tiny_naflexvit(global_pool="map")
    sd = dict(model.state_dict())
    sd["blocks.1.mlp.fc1.weight"] = sd["blocks.1.mlp.fc1.weight"][:-1]
    del sd["attn_pool.latent"]
    with pytest.raises(ConversionError, match=r"'blocks.1.mlp.fc1.weight' has shape.*missing key.*'attn_pool.latent'"):
        convert_timm_naflex(cfg, sd)


# ------------------------------------------------------------------------------------------------ Hugging Face Siglip2

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)


TEXT = {"hidden_size": 48, "intermediate_size": 76, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 100, "max_position_embeddings": 16}
# patch 4 (48 values per patch), a 16x16 position table
VISION = {"hidden_size": 48, "intermediate_size": 76, "num_hidden_layers": 2, "num_attention_heads": 4,
          "patch_size": 4, "num_patches": 256}


@pytest.fixture(scope="module")
def siglip2(transformers):
    """A small random Siglip2Model, the Siglip2VisionModel with its image tower's weights, and the mm import."""
    torch.manual_seed(0)
    hf = perturbed(transformers.Siglip2Model(transformers.Siglip2Config(text_config=TEXT, vision_config=VISION)))
    vision = transformers.Siglip2VisionModel(hf.config.vision_config).eval()
    vision.vision_model.load_state_dict(hf.vision_model.state_dict())
    return hf, vision, from_hf(hf, tokenizer="hf:some-org/some-tokenizer").eval()


def hf_inputs(p: Patches) -> dict[str, torch.Tensor]:
    """The same padded batch as Siglip2's processor gives it: patches, their mask, each image's grid."""
    return {"pixel_values": p.pixels, "pixel_attention_mask": p.valid.long(), "spatial_shapes": p.shapes}


@pytest.mark.hf
@pytest.mark.parametrize("length", LENGTHS)
def test_siglip2_naflex_equals_transformers(siglip2, length):
    hf, vision, model = siglip2
    assert model.config.vision.pos_interpolation == "bilinear" and model.config.vision.grid == 16
    p = batch(length, 4, seed=length)
    with torch.no_grad():
        emb = model.encode_image(p)
        out = model.vision(p)
        ref_emb = hf.get_image_features(**hf_inputs(p))
        ref_tokens = vision(**hf_inputs(p)).last_hidden_state
    d_emb = max_diff(ref_emb, emb)
    d_tok = max_diff(ref_tokens[p.valid], out.tokens[out.valid])
    print(f"Siglip2 L{length}: image embedding {d_emb:.2g}, tokens {d_tok:.2g}")
    assert d_emb < TOL and d_tok < TOL


@pytest.mark.hf
def test_siglip2_needs_bilinear_positions(siglip2):
    """The test above can tell the resize apart: bicubic positions (timm's) give other embeddings."""
    hf, _, model = siglip2
    tower = VisionTower(model.config.vision, model.config.embed_dim)
    tower.load_state_dict(model.vision.state_dict())
    tower.cfg.pos_interpolation = "bicubic"
    p = batch(64, 4)
    with torch.no_grad():
        assert max_diff(hf.get_image_features(**hf_inputs(p)), tower.eval()(p).emb) > 1e-3


@pytest.mark.hf
def test_siglip2_resize_at_the_table_grid_is_the_identity(transformers):
    """HF resizes the table even at its own grid; mm adds it as it is: the same numbers, bit for bit (CPU, fp32)."""
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    for g, width in ((16, 48), (16, 768), (24, 1152)):
        table = torch.randn(g, g, width, generator=torch.Generator().manual_seed(g))
        out = Siglip2VisionEmbeddings.resize_positional_embeddings(table, torch.tensor([[g, g]]), g * g)
        assert torch.equal(out[0], table.reshape(g * g, width))


@pytest.mark.hf
def test_naflex_size_is_the_siglip2_processor_rule(transformers):
    """mm's NaFlex size rule is Hugging Face's (Siglip2ImageProcessor's get_image_size_for_max_num_patches), so an
    imported SigLIP 2 sees images at the sizes its processor makes."""
    import random

    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    from mm.data.transforms import naflex_size

    rng = random.Random(0)
    cases = [(rng.randint(1, 2000), rng.randint(1, 2000), rng.choice([14, 16]), rng.choice([64, 256, 576, 1024]))
             for _ in range(400)] + [(1, 1, 16, 256), (10, 4000, 16, 256), (4000, 10, 16, 64), (224, 224, 16, 256)]
    for h, w, patch, n in cases:
        assert naflex_size(h, w, patch, n) == get_image_size_for_max_num_patches(h, w, patch, n), (h, w, patch, n)
