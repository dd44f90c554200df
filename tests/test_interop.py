"""open_clip <-> mm conversion: converted models compute what open_clip computes, state dicts round-trip
bit for bit, and a mismatched name or state dict fails naming the offending key."""
from __future__ import annotations

import copy

import pytest
import torch

import mm
from mm.hub import (
    ConversionError,
    convert_state_dict,
    export_state_dict,
    from_open_clip,
    open_clip_config,
    to_open_clip,
)
from mm.layers import text_valid_mask
from mm.models import resolve_config

open_clip = pytest.importorskip("open_clip")

# no "!": CLIP's tokenizer gives it id 0, the padding id, which open_clip's id-based CoCa masks treat
# as padding while mm's correct mask goes by position
CAPTIONS = ["a photo of a cat", "two small dogs playing in the snow next to a red house"]
ATOL = 1e-5

# mm's tiny-coca in open_clip's model-config format (what open_clip.CoCa(**cfg) takes)
TINY_COCA = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 192, "layers": 6, "head_width": 64,
                   "attentional_pool": True, "attn_pooler_queries": 64, "attn_pooler_heads": 4,
                   "output_tokens": True},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Finish open_clip's random init for testing. It sets LayerNorms to (1, 0) and biases to 0, so a
    mapping that swapped two of them would still match: give every vector (and scalar) parameter
    distinct random values. It never initialises CoCa's decoder projection (``torch.empty``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        if hasattr(model, "text_decoder"):
            proj = model.text_decoder.text_projection
            proj.copy_(torch.randn(proj.shape, generator=g) * proj.shape[0] ** -0.5)
    return model.eval()


def _inputs(model: mm.CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.config.vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return images, mm.get_tokenizer(model)(CAPTIONS)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def _assert_same_outputs(ref: torch.nn.Module, model: mm.CLIP) -> None:
    """encode_image / encode_text (unnormalised) and, for CoCa, the caption logits agree to ATOL."""
    images, tokens = _inputs(model)
    assert _max_diff(model.encode_image(images), ref.encode_image(images, normalize=False)) < ATOL
    assert _max_diff(model.encode_text(tokens), ref.encode_text(tokens, normalize=False)) < ATOL
    if model.config.decoder is not None:
        # open_clip returns logits for all context - 1 positions; mm only those that predict a real
        # token (up to the end token), packed in row-major order
        text = model.config.text
        predicts_real = text_valid_mask(tokens, eot_id=text.eot_id, pad_id=text.pad_id)[:, 1:]
        ref_logits = ref(images, tokens)["logits"][predicts_real]
        assert _max_diff(model(images, tokens).caption_logits, ref_logits) < ATOL


def _assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.fixture(scope="module", params=["ViT-B-32", "ViT-B-16", "ViT-B-32-quickgelu", "coca_ViT-B-32"])
def pair(request) -> tuple[str, torch.nn.Module, mm.CLIP]:
    """(name, random open_clip model, the mm model converted from it), built once per name."""
    torch.manual_seed(0)
    ref = _randomise(open_clip.create_model(request.param), seed=0)
    return request.param, ref, from_open_clip(ref, request.param).eval()


def test_outputs_match_open_clip(pair):
    _, ref, model = pair
    _assert_same_outputs(ref, model)


def test_state_dict_round_trips_bit_identical(pair):
    _, ref, model = pair
    sd = ref.state_dict()
    # open_clip's causal masks are non-persistent buffers: nothing to carry over
    assert not any(k.endswith("attn_mask") for k in sd)
    _assert_bit_identical(to_open_clip(model), sd)


def _arch(model: torch.nn.Module) -> list[tuple[str, int | None]]:
    return [(type(m).__name__, getattr(m, "num_heads", None)) for m in model.modules()]


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "ViT-L-14-336", "ViT-H-14", "coca_ViT-B-32"])
def test_open_clip_config_builds_the_open_clip_model(name):
    cfg = open_clip_config(name)
    assert cfg["quick_gelu"] == name.endswith("quickgelu")
    with torch.device("meta"):
        ours = (open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CLIP)(**cfg)
        theirs = open_clip.create_model(name, device="meta")
    assert type(ours) is type(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    # what shapes do not show: activations (module types) and attention heads
    assert _arch(ours) == _arch(theirs)


def _meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes only: the errors come before any tensor is read
        return open_clip.create_model(name, device="meta").state_dict()


def test_wrong_name_names_first_mismatched_key_and_shapes():
    sd = _meta_state_dict("ViT-B-32")
    with pytest.raises(ConversionError, match=r"'visual\.positional_embedding' has shape \(50, 768\), "
                                              r"expected \(197, 768\)"):
        from_open_clip(sd, "ViT-B-16")


def test_missing_and_unexpected_keys_are_named():
    sd = dict(_meta_state_dict("ViT-B-32"))
    del sd["ln_final.bias"]
    sd["visual.extra"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"1 missing key\(s\): 'ln_final\.bias'; 1 unexpected key\(s\): "
                                              r"'visual\.extra'"):
        convert_state_dict(sd, "ViT-B-32")
    with torch.device("meta"):
        mm_sd = dict(mm.create_model("ViT-B-32").state_dict())
    del mm_sd["text.norm.weight"]
    with pytest.raises(ConversionError, match=r"missing key\(s\): 'text\.norm\.weight'"):
        export_state_dict(mm_sd, "ViT-B-32")


def test_settings_outside_the_state_dict_are_checked():
    with torch.device("meta"):
        quick = open_clip.create_model("ViT-B-32-quickgelu", device="meta")
    with pytest.raises(ConversionError, match=r"visual\.transformer\.resblocks\.0\.mlp\.gelu is QuickGELU"):
        from_open_clip(quick, "ViT-B-32")
    with pytest.raises(ConversionError, match=r"vision\.transformer\.moe"):
        export_state_dict({}, "tiny-moe")


def _tiny_coca_cfg(variant: str) -> mm.ModelConfig:
    if variant == "packed_pool":  # ViT width == embed_dim: open_clip's pooler packs in_proj_weight
        return resolve_config("tiny-coca", vision__transformer__width=128, vision__transformer__heads=2)
    if variant == "legacy_mask":
        return resolve_config("tiny-coca", text__cls_mask="open_clip")
    return resolve_config("tiny-coca")


def _open_clip_tiny_coca(variant: str) -> torch.nn.Module:
    cfg = copy.deepcopy(TINY_COCA)
    if variant == "packed_pool":
        cfg["vision_cfg"]["width"] = 128
    model = open_clip.CoCa(**cfg)
    # mm's tiny-coca uses the correct class-token mask; open_clip 3.3 has no config key for it, only
    # this attribute (False, open_clip's legacy mask, is mm's text.cls_mask "open_clip")
    model.text.correct_cls_mask = variant != "legacy_mask"
    return model


@pytest.mark.parametrize("variant", ["tiny-coca", "legacy_mask", "packed_pool"])
def test_tiny_coca_from_open_clip(variant):
    cfg = _tiny_coca_cfg(variant)
    torch.manual_seed(0)
    ref = _randomise(_open_clip_tiny_coca(variant), seed=1)
    model = from_open_clip(ref, "tiny-coca" if variant == "tiny-coca" else cfg).eval()
    # the mm model owns its tensors: training it leaves open_clip's untouched
    assert model.text.token_embedding.weight.data_ptr() != ref.text.token_embedding.weight.data_ptr()
    _assert_same_outputs(ref, model)
    _assert_bit_identical(to_open_clip(model), ref.state_dict())


def test_tiny_coca_to_open_clip():
    """mm -> open_clip: a random mm model's weights make open_clip compute what mm computes; bare
    state dicts convert both ways in half precision too, keeping the dtype."""
    torch.manual_seed(0)
    model = mm.create_model("tiny-coca").eval()
    ref = open_clip.CoCa(**open_clip_config("tiny-coca")).eval()
    ref.text.correct_cls_mask = True
    ref.load_state_dict(to_open_clip(model), strict=True)
    _assert_same_outputs(ref, model)
    half = {k: v.half() for k, v in model.state_dict().items()}
    _assert_bit_identical(convert_state_dict(export_state_dict(half, "tiny-coca"), "tiny-coca"), half)
    _assert_bit_identical(from_open_clip(ref.state_dict(), "tiny-coca").state_dict(), model.state_dict())


def test_tiny_clip_with_layer_scale_and_logit_bias():
    """Plain CLIP (text tower at the top level of open_clip's state dict) with the optional parts the
    presets above lack: LayerScale in every block and a SigLIP logit bias."""
    cfg = resolve_config("tiny-siglip", vision__transformer__layer_scale=0.1, text__transformer__layer_scale=0.1)
    torch.manual_seed(0)
    ref = _randomise(open_clip.CLIP(
        embed_dim=128, init_logit_scale=cfg.init_logit_scale, init_logit_bias=cfg.init_logit_bias,
        vision_cfg={"image_size": 32, "patch_size": 4, "width": 192, "layers": 6, "head_width": 64,
                    "ls_init_value": 0.1},
        text_cfg={"context_length": 32, "width": 128, "heads": 2, "layers": 4, "ls_init_value": 0.1},
    ), seed=2)
    model = from_open_clip(ref, cfg).eval()
    assert model.logit_bias is not None
    _assert_same_outputs(ref, model)
    _assert_bit_identical(to_open_clip(model), ref.state_dict())


def test_cls_mask_mismatch_is_reported():
    legacy = _open_clip_tiny_coca("legacy_mask")
    with pytest.raises(ConversionError, match=r"correct_cls_mask is False.*text\.cls_mask is 'correct'"):
        from_open_clip(legacy, "tiny-coca")


@pytest.mark.parametrize("name", ["ViT-B-32-256", "ViT-B-16-quickgelu", "ViT-L-14", "ViT-L-14-quickgelu",
                                  "ViT-L-14-336", "ViT-H-14", "coca_ViT-L-14"])
def test_every_open_clip_named_preset_maps_every_key(name):
    """The table covers the larger presets too: open_clip's state dict (shapes only, on the meta device)
    converts to exactly the mm model's keys and shapes, and back to open_clip's."""
    import open_clip

    from mm.hub.open_clip import convert_state_dict, export_state_dict

    with torch.device("meta"):
        oc_sd = open_clip.create_model(name, device="meta").state_dict()
        ours = mm.create_model(name).state_dict()
    converted = convert_state_dict(oc_sd, name)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    back = export_state_dict(converted, name)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in oc_sd.items()}
