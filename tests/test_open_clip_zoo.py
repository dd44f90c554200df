"""open_clip's model zoo in mm: every registry config translates (mm.hub.open_clip_configs) into an mm model
that computes what open_clip computes, or runs through open_clip itself (mm.hub.wrapped).

* parity: every distinct combination of config switches in open_clip's registry, at reduced width and depth,
  every tensor perturbed: encode_image / encode_text (and CoCa's caption logits) equal open_clip's to 1e-5, the
  state dict round-trips bit for bit, and a deliberately swapped mapping fails;
* coverage (slow): every (model, tag) pair of ``open_clip.list_pretrained()`` is native (equal parameter count,
  every key and shape mapped both ways, on the meta device) or wrapped, never both; at least 128 native, and the
  counts are the ones docs/open_clip_zoo.md and the README state.

The registry is translated when a test runs (the ``architectures`` fixture), not when the module is collected.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import re
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

import mm
from mm.hub import from_open_clip, open_clip_config, to_open_clip
from mm.hub import open_clip as oc_hub
from mm.hub.wrapped import OpenClipModel, build_open_clip, is_wrapped, wrapped_config
from mm.layers import text_valid_mask
from mm.models import NotNative, model_class
from mm.hub import open_clip_configs as occ

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

ATOL = 1e-5
CLIP_VOCAB = 49408
ROOT = Path(__file__).resolve().parents[1]


# -- reduced copies of the registry's configs --------------------------------------------------------------
def _reduce(cfg: dict) -> dict:
    """A registry config at reduced width and depth with every switch kept (activations, norms, pooling, masks,
    biases, layer scale, custom text, logit bias, tokenizer). Image towers built by timm are reduced by
    :func:`_reduced_trunk`."""
    cfg = copy.deepcopy(cfg)
    coca = "multimodal_cfg" in cfg
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    # a timm trunk without a projection (SigLIP's map head) hands on its width (64) as the embedding
    cfg["embed_dim"] = 32 if coca else 64 if v.get("timm_proj") == "none" else 48
    if not v.get("timm_model_name") and not isinstance(v.get("layers"), list):
        # CoCa's decoder cross-attends to the image tokens: their width (the ViT's, or embed_dim after an
        # attentional pool) is the decoder's, so a CoCa ViT is as narrow as its text tower
        v.update(width=32 if coca else 64, head_width=16 if coca else 32, layers=2, patch_size=8, image_size=32)
        if "attn_pooler_queries" in v or v.get("attentional_pool"):
            v.update(attn_pooler_queries=6)
    clip_bpe = not t.get("hf_tokenizer_name")
    t.update(width=32, heads=2, layers=2, context_length=12)
    if not clip_bpe:  # a SentencePiece / Gemma vocabulary: a small one (its special ids stay inside)
        t["vocab_size"] = 1000
    if coca:
        cfg["multimodal_cfg"].update(width=32, heads=2, layers=1, context_length=12)
        cfg["multimodal_cfg"].pop("dim_head", None)
        cfg["multimodal_cfg"].pop("n_queries", None)
    return cfg


# (reduced timm kwargs) per timm model family; Eva's RoPE reference grid differs from the grid so that its
# rescaling is exercised
def _trunk_kwargs(name: str) -> dict:
    kw = dict(depth=2, embed_dim=64, num_heads=2)
    if name.startswith("vit_pe_core"):
        kw.update(img_size=32, patch_size=8, ref_feat_shape=(6, 6))
    elif name.startswith("eva"):
        kw.update(img_size=28, patch_size=14)
    elif "384" in name and "so400m" in name:  # 384 px / 14: a grid with a remainder (patch_remainder)
        kw.update(img_size=30, patch_size=7)
    else:
        kw.update(img_size=32, patch_size=8)
    return kw


def _reduced_open_clip(name: str) -> tuple[torch.nn.Module, dict]:
    """open_clip's model of registry ``name`` at reduced size (random weights, every tensor perturbed) and its
    config dict (with the reduced trunk's image size)."""
    cfg = _reduce(occ.registry_config(name))
    v = cfg["vision_cfg"]
    torch.manual_seed(0)
    if v.get("timm_model_name"):
        v["image_size"] = _trunk_kwargs(v["timm_model_name"])["img_size"]
        create = timm.create_model

        def reduced(name: str, **kw):  # open_clip's TimmModel builds its trunk (and head) at reduced size
            return create(name, **kw, **_trunk_kwargs(name))

        with mock.patch.object(timm, "create_model", reduced):
            model = build_open_clip(cfg)
    else:
        model = build_open_clip(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if hasattr(model, "text_decoder"):  # open_clip leaves CoCa's decoder projection uninitialised
            proj = model.text_decoder.text_projection
            proj.copy_(torch.randn(proj.shape, generator=g) * proj.shape[0] ** -0.5)
    return model.eval(), cfg


def _family(cfg: dict) -> str:
    """The family of a registry config, read from the config alone (what the issue counts by)."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    timm_name = v.get("timm_model_name") or ""
    if t.get("hf_model_name"):
        return "hf-text"
    if "multimodal_cfg" in cfg:
        return "coca"
    if isinstance(v.get("layers"), list):
        return "resnet"
    if not timm_name:
        return "vit"
    if "_mci" in timm_name or timm_name.startswith("mci"):
        return "mci"  # MobileCLIP's ViT with a convolutional stem, and its FastViT towers
    for prefix, family in (("vit_pe_core", "pe"), ("eva", "eva"), ("convnext", "convnext"), ("vitamin", "vitamin"),
                           ("fastvit", "fastvit")):
        if timm_name.startswith(prefix):
            return family
    if "siglip" in timm_name:
        return "siglip"
    return "timm-vit" if timm_name.startswith("vit_") else "timm-other"


NATIVE_FAMILIES = {"vit", "coca", "siglip", "pe", "timm-vit"}


def _signature(cfg: mm.ModelConfig) -> str:
    d = dataclasses.asdict(cfg)
    d["open_clip"]["name"] = None
    return json.dumps(d, sort_keys=True, default=str)


def _distinct_native_architectures() -> list[str]:
    """One registry name per distinct reduced architecture (the mm config of its reduced copy): every combination
    of switches the registry's native models use."""
    seen: dict[str, str] = {}
    for name in occ.open_clip_model_names():
        cfg = occ.registry_config(name)
        if _family(cfg) not in NATIVE_FAMILIES | {"eva"}:
            continue
        if cfg["vision_cfg"].get("timm_model_name"):
            if cfg["vision_cfg"].get("timm_proj", "linear") in ("linear", "mlp"):
                continue  # an open_clip projection head on the trunk: not native (test_not_native_names_say_why)
            try:
                reduced = _reduce(cfg)
                mm_cfg = occ.from_open_clip_config(reduced, name, trunk=_trunk(reduced))
            except NotNative:
                continue
        else:
            try:
                mm_cfg = occ.from_open_clip_config(_reduce(cfg), name)
            except NotNative:
                continue
        seen.setdefault(_signature(mm_cfg), name)
    return sorted(seen.values())


def _trunk(cfg: dict) -> torch.nn.Module:
    v = cfg["vision_cfg"]
    return _reduced_trunk(v["timm_model_name"], 0 if v.get("timm_proj") == "none" else cfg["embed_dim"],
                               v.get("timm_pool", "avg"))


@functools.lru_cache(maxsize=None)
def _reduced_trunk(name: str, num_classes: int, pool: str) -> torch.nn.Module:
    return timm.create_model(name, num_classes=num_classes, global_pool=pool, **_trunk_kwargs(name))


@pytest.fixture(scope="module")
def architectures() -> list[str]:
    """The distinct native architectures, translated when a test first asks (once per module): a translation error
    is then that test's failure, not an error collecting the module, and collecting translates nothing."""
    return _distinct_native_architectures()


def _inputs(model: mm.CLIP, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images, and token ids ending in the end token then padding (lengths differ per row)."""
    g = torch.Generator().manual_seed(2)
    v, t = model.config.vision, model.config.text
    images = torch.randn(n, 3, v.image_size, v.image_size, generator=g)
    low = max(t.sot_id, t.eot_id, t.pad_id) + 1 if t.tokenizer != "clip" else 1
    high = t.vocab_size - 2 if t.tokenizer == "clip" else t.vocab_size
    tokens = torch.randint(low, high, (n, t.context_length), generator=g)
    if t.tokenizer == "clip":
        tokens[:, 0] = t.sot_id
    for i in range(n):
        end = t.context_length - 1 - 2 * i
        tokens[i, end] = t.eot_id
        tokens[i, end + 1:] = t.pad_id
    return images, tokens


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@torch.no_grad()
def _compare(ref: torch.nn.Module, model: mm.CLIP) -> dict[str, float]:
    images, tokens = _inputs(model)
    out = {"image": _diff(model.encode_image(images), ref.encode_image(images, normalize=False)),
           "text": _diff(model.encode_text(tokens), ref.encode_text(tokens, normalize=False))}
    if model.config.decoder is not None:
        text = model.config.text
        real = text_valid_mask(tokens, eot_id=text.eot_id, pad_id=text.pad_id)[:, 1:]
        out["caption"] = _diff(model(images, tokens).caption_logits, ref(images, tokens)["logits"][real])
    return out


def test_registry_has_every_native_family(architectures):
    families = {_family(occ.registry_config(n)) for n in architectures}
    assert families == NATIVE_FAMILIES | {"eva"}, families
    assert len(architectures) >= 20  # the registry's switch combinations (quick_gelu, pools, norms, masks, ...)


def test_native_architectures_match_open_clip(architectures):
    """Every distinct architecture is checked (one test, as the list is known only once translated); the failures
    are reported together, each under its registry name (``_check_architecture(name)`` reruns one)."""
    failures: dict[str, str] = {}
    for name in architectures:
        try:
            _check_architecture(name)
        except Exception as e:  # recorded: the assertion below fails naming every architecture that differs
            failures[name] = f"{type(e).__name__}: {e}"
    assert not failures, f"{len(failures)} of {len(architectures)} architectures differ from open_clip's: {failures}"


def _check_architecture(name: str) -> None:
    ref, cfg = _reduced_open_clip(name)
    model = from_open_clip(ref, cfg).eval()
    assert not is_wrapped(model)
    diffs = _compare(ref, model)
    assert all(d < ATOL for d in diffs.values()), diffs
    back = to_open_clip(model)
    want = ref.state_dict()
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())


def _swap_rule(rules: list, a: str, b: str) -> list:
    """``rules`` with the mm targets of the rules whose mm keys end in ``a`` and ``b`` exchanged."""
    ia = next(i for i, r in enumerate(rules) if r.mm[0].endswith(a))
    ib = next(i for i, r in enumerate(rules) if r.mm[0].endswith(b))
    out = list(rules)
    out[ia] = dataclasses.replace(rules[ia], mm=rules[ib].mm)
    out[ib] = dataclasses.replace(rules[ib], mm=rules[ia].mm)
    return out


@pytest.mark.parametrize("name, layout, a, b", [
    ("ViT-B-32", "vit", "norm1.weight", "norm2.weight"),
    ("ViT-B-16-SigLIP2", "timm_vit", "attn_pool.norm.weight", "vision.norm.weight"),
    ("PE-Core-B-16", "timm_pe", "attn.proj.bias", "ffn.fc2.bias"),
])
def test_a_swapped_mapping_fails(monkeypatch, name, layout, a, b):
    """What the parity test guards against: with two same-shaped tensors' mappings exchanged the conversion
    still succeeds (shapes fit) but the outputs differ far beyond the tolerance."""
    ref, cfg = _reduced_open_clip(name)
    assert max(_compare(ref, from_open_clip(ref, cfg).eval()).values()) < ATOL
    monkeypatch.setitem(oc_hub.VISION_RULES, layout, _swap_rule(oc_hub.VISION_RULES[layout], a, b))
    swapped = from_open_clip(ref, cfg).eval()
    assert _compare(ref, swapped)["image"] > 1e-3


def test_rope_channel_order_is_needed(monkeypatch):
    """The Perception Encoder's queries and keys are permuted per head (timm's interleaved RoPE pairs -> mm's
    rotate_half pairs); copying them unpermuted gives other features."""
    ref, cfg = _reduced_open_clip("PE-Core-B-16")
    monkeypatch.setattr(oc_hub, "_rope_qkv", lambda cfg: oc_hub.COPY)
    monkeypatch.setitem(oc_hub.VISION_RULES, "timm_pe", oc_hub._timm_trunk_rules(oc_hub._eva_block(
        f"{oc_hub._TRUNK}.blocks.{{i}}", "vision.transformer.blocks.{i}", "timm_pe")))
    assert _compare(ref, from_open_clip(ref, cfg).eval())["image"] > 1e-3


def test_pe_rope_tables_equal_timms():
    """mm's axial RoPE angles, brought to timm's interleaved layout, are timm's RotaryEmbeddingCat tables bit for
    bit (grid 4 on a reference grid of 6, offset 1, xy order: the Perception Encoder's settings)."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    from mm.layers.position import axial_rope_angles

    for order, offset in (("xy", 1.0), ("ij", 0.0)):
        rope = RotaryEmbeddingCat(dim=32, in_pixels=False, feat_shape=[4, 4], ref_feat_shape=[6, 6], grid_offset=offset,
                                  grid_indexing=order)
        sin_t, cos_t = rope.get_embed().chunk(2, -1)
        ang = axial_rope_angles(32, 4, ref_grid=6, offset=offset, column_first=order == "xy")
        perm = oc_hub._rope_pairs(32)  # mm channel m holds timm channel perm[m]
        assert torch.equal(ang.sin(), sin_t[:, perm]) and torch.equal(ang.cos(), cos_t[:, perm])


def test_defaults_are_open_clips():
    """The copies of open_clip's config defaults equal its dataclasses' (a new open_clip that changes one fails
    here rather than translating silently wrong)."""
    from open_clip.coca_model import MultimodalCfg
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    def defaults(cls):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}

    assert defaults(CLIPVisionCfg) == occ.VISION_DEFAULTS
    assert defaults(CLIPTextCfg) == occ.TEXT_DEFAULTS
    assert defaults(MultimodalCfg) == occ.MULTIMODAL_DEFAULTS


def test_registry_is_read_without_importing_open_clip():
    ours, theirs = set(occ.open_clip_model_names()), set(open_clip.list_models())
    assert len(ours) > 100 and ours <= theirs
    assert theirs - ours <= set(mm.models.list_models())  # other tests register mm presets with open_clip
    assert occ.registry_config("ViT-B-32") == open_clip.get_model_config("ViT-B-32")


def test_create_model_translates_names_and_user_configs(tmp_path):
    """A registry name and a user's JSON in open_clip's format build the same network as open_clip; a tower mm does
    not build comes back as open_clip's own model behind mm's interface."""
    siglip2 = mm.models.resolve_config("ViT-B-16-SigLIP2")  # (the model itself has 375 M parameters)
    assert siglip2.vision.pool == "map" and siglip2.text.tokenizer == "hf:timm/ViT-B-16-SigLIP2"
    assert model_class(siglip2) is mm.CLIP
    user = _reduce(occ.registry_config("ViT-B-32-quickgelu"))
    (tmp_path / "mine.json").write_text(json.dumps(user))
    ours = mm.create_model(str(tmp_path / "mine.json"))
    assert ours.config.vision.transformer.act == "quick_gelu" and ours.config.vision.transformer.depth == 2
    rn = mm.create_model({"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
                          "text_cfg": {"context_length": 16, "vocab_size": CLIP_VOCAB, "width": 32, "heads": 2,
                                       "layers": 1}})
    assert isinstance(rn, OpenClipModel) and rn.config.vision.image_size == 64
    with pytest.raises(NotNative, match="ResNet"):
        mm.models.build_model({"embed_dim": 32, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 16},
                               "text_cfg": {"width": 32, "heads": 2, "layers": 1}})


def test_weights_file_of_a_model_run_through_open_clip_loads_unconverted(tmp_path):
    """``--pretrained FILE`` with a config mm does not build: open_clip's checkpoint goes into open_clip's module as
    it is (a torch.save of open_clip's state dict, the file open_clip users have)."""
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": CLIP_VOCAB, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "rn.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    source = mm.create_model(cfg)
    torch.save(source.model.state_dict(), tmp_path / "rn.pt")
    torch.manual_seed(1)
    loaded = mm.hub.load_model(str(tmp_path / "rn.json"), pretrained=tmp_path / "rn.pt")
    assert is_wrapped(loaded)
    images = torch.randn(2, 3, 64, 64)
    source.eval()
    assert torch.equal(loaded.encode_image(images), source.encode_image(images))
    with pytest.raises(mm.hub.PretrainedError, match="rn.pt"):
        torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "rn.pt")
        mm.hub.load_model(str(tmp_path / "rn.json"), pretrained=tmp_path / "rn.pt")


@pytest.mark.parametrize("name, reason", [
    ("convnext_base", "timm tower convnext_base"), ("RN50", "ResNet"), ("ViTamin-B", "timm tower vitamin_base"),
    ("xlm-roberta-base-ViT-B-32", "Hugging Face text tower"), ("EVA02-E-14", "post-norm"),
    ("MobileCLIP-B", "patch embedding"),
])
def test_not_native_names_say_why(name, reason):
    with pytest.raises(NotNative, match=reason):
        occ.open_clip_preset(name)


def test_open_clip_config_of_a_translated_timm_model_is_the_registrys():
    cfg = occ.open_clip_preset("ViT-SO400M-14-SigLIP")
    assert open_clip_config(cfg) == occ.registry_config("ViT-SO400M-14-SigLIP")
    cfg.vision.transformer.depth = 3  # no longer the registry's model: open_clip would build it with timm
    with pytest.raises(oc_hub.ConversionError, match="timm"):
        open_clip_config(cfg)


# -- coverage: the whole pretrained list ---------------------------------------------------------------------
# registry models with open_clip weights on either side (the docs' examples): each side is found on its own below
KNOWN_NATIVE = {"ViT-B-32", "ViT-B-16-SigLIP2", "coca_ViT-B-32", "PE-Core-B-16", "EVA02-B-16", "MobileCLIP2-L-14"}
KNOWN_WRAPPED = {"RN50", "convnext_base_w", "ViTamin-B", "MobileCLIP-S1", "EVA02-E-14", "xlm-roberta-base-ViT-B-32"}


@pytest.mark.slow
def test_every_pretrained_pair_is_native_or_wrapped(monkeypatch):
    """Every (model, tag) of open_clip.list_pretrained() is native or wrapped, never both, each side found on its
    own (all on the meta device):

    * native: mm translates open_clip's config (read with the timm tower open_clip built) into its own blocks; the
      model ``mm.create_model(name)`` builds has that config, open_clip's parameter count, and every key and shape
      maps both ways;
    * wrapped: ``mm.create_model(name)`` gives open_clip's own model (open_clip's parameter count) behind mm's
      interface. Hugging Face text towers are sorted from the config dict (open_clip cannot build them without their
      Hub files) and their interface config builds.

    At least 128 native, every pair of a native family among them, and the counts are those the docs state."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pairs = open_clip.list_pretrained()
    names = sorted({n for n, _ in pairs})
    native: set[str] = set()
    wrapped: set[str] = set()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in names:
                cfg = occ.registry_config(name)
                if cfg["text_cfg"].get("hf_model_name"):
                    assert wrapped_config(name).embed_dim == cfg["embed_dim"], name
                    wrapped.add(name)
                    try:
                        occ.from_open_clip_config(cfg, name)
                        native.add(name)
                    except NotNative:
                        pass
                    continue
                with torch.device("meta"):
                    ref = open_clip.create_model(name, device="meta")
                    built = mm.create_model(name)  # what a user gets for the name
                size = sum(p.numel() for p in ref.parameters())
                if is_wrapped(built):
                    assert wrapped_config(name, ref).embed_dim == built.config.embed_dim == cfg["embed_dim"], name
                    assert sum(p.numel() for p in built.model.parameters()) == size, name
                    wrapped.add(name)
                try:
                    mm_cfg = occ.from_open_clip_config(cfg, name, trunk=getattr(ref.visual, "trunk", None))
                except NotNative:
                    continue
                native.add(name)
                ours = built
                if is_wrapped(ours):  # translated, yet create_model wraps it: in both sets (asserted below)
                    with torch.device("meta"):
                        ours = model_class(mm_cfg)(mm_cfg)
                assert ours.config == mm_cfg, name  # the trunk timm builds for mm is the one open_clip built
                assert sum(p.numel() for p in ours.parameters()) == size, name
                sd = ref.state_dict()
                converted = oc_hub.convert_state_dict(sd, mm_cfg)
                assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}
                back = oc_hub.export_state_dict(converted, mm_cfg)
                assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in sd.items()}, name
    finally:
        logging.disable(logging.NOTSET)
    assert not native & wrapped, f"both native and wrapped: {sorted(native & wrapped)}"
    assert native | wrapped == set(names), f"neither native nor wrapped: {sorted(set(names) - native - wrapped)}"
    assert KNOWN_NATIVE <= native and KNOWN_WRAPPED <= wrapped, (KNOWN_NATIVE - native, KNOWN_WRAPPED - wrapped)
    by_family: dict[str, dict[str, int]] = {}
    for name, _ in pairs:
        fam = by_family.setdefault(_family(occ.registry_config(name)), {"native": 0, "wrapped": 0})
        fam["native" if name in native else "wrapped"] += 1
    print("\nopen_clip pretrained pairs by family:", json.dumps(by_family, sort_keys=True))
    assert sum(n in native for n, _ in pairs) >= 128, by_family
    for family in NATIVE_FAMILIES:
        assert by_family[family]["wrapped"] == 0, (family, by_family[family])
    _check_documented_counts(pairs, native, wrapped)


def _check_documented_counts(pairs: list[tuple[str, str]], native: set[str], wrapped: set[str]) -> None:
    """docs/open_clip_zoo.md (its open_clip version and registry size, every row of its family table, its totals)
    and the README's summary state the counts just computed: a change of open_clip or of what mm builds that
    changes them fails here until the docs say so."""
    doc = (ROOT / "docs" / "open_clip_zoo.md").read_text()
    n_native, n_wrapped = sum(n in native for n, _ in pairs), sum(n in wrapped for n, _ in pairs)
    head = re.search(r"open_clip (\S+): (\d+) model configs, (\d+) pretrained \(model, tag\) pairs", doc)
    assert head, "docs/open_clip_zoo.md: no 'open_clip VERSION: N model configs, M pretrained (model, tag) pairs'"
    assert head.groups() == (open_clip.__version__, str(len(occ.open_clip_model_names())), str(len(pairs)))
    total = re.search(r"^\| \*\*total\*\* \| \*\*(\d+)\*\* \| \*\*(\d+) native, (\d+) through open_clip\*\* \|",
                      doc, re.M)
    assert total, "docs/open_clip_zoo.md: no totals row"
    assert tuple(map(int, total.groups())) == (len(pairs), n_native, n_wrapped)
    readme = re.search(r"(\d+) of open_clip's (\d+) pretrained weights", (ROOT / "README.md").read_text())
    assert readme and tuple(map(int, readme.groups())) == (n_native, len(pairs)), readme
    # each family row: its examples (open_clip names with weights) say which (family, way) it counts
    how = {n: "native" if n in native else "through open_clip" for n, _ in pairs}
    key = {n: (_family(occ.registry_config(n)), how[n]) for n in how}
    rows = re.findall(r"^\| ([^|*]+?) \| (\d+) \| (native|through open_clip) \| (.+?) \|$", doc, re.M)
    assert len(rows) >= 10, rows
    counted: dict[tuple[str, str], str] = {}
    for label, count, way, examples in rows:
        names = re.findall(r"`([^`]+)`", examples)
        assert names and set(names) <= set(how), (label, names)
        assert {how[n] for n in names} == {way}, (label, {n: how[n] for n in names})
        keys = {key[n] for n in names}
        assert not keys & set(counted), (label, {k: counted[k] for k in keys & set(counted)})  # one row each
        counted.update(dict.fromkeys(keys, label))
        assert sum(key[n] in keys for n, _ in pairs) == int(count), (label, count)
    assert {key[n] for n, _ in pairs} <= set(counted), {key[n] for n, _ in pairs} - set(counted)
