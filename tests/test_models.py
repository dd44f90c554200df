"""Towers, the CLIP composition, presets, configs and save/load."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mm
from mm.config import ConfigError
from mm.layers import Attention, Block


def _tokens(b: int, t: int, lengths=None, seed: int = 0) -> torch.Tensor:
    """CLIP-style token ids: sot, words, eot, zero padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [t] * b
    tok = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        n = min(n, t)
        tok[i, 0] = 49406
        tok[i, 1:n - 1] = torch.randint(1, 49000, (max(n - 2, 0),), generator=g)
        tok[i, n - 1] = 49407
    return tok


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu", "ViT-L-14-336",
                                  "ViT-B-32-256", "ViT-H-14"])
def test_parameter_count_matches_open_clip(name):
    import open_clip

    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = mm.create_model(name)
        ref = open_clip.create_model(name, device="meta")
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref
    if name == "ViT-B-32":
        assert n_ours == 151_277_313


def test_quickgelu_preset_uses_quickgelu_everywhere():
    cfg = mm.get_preset("ViT-B-32-quickgelu")
    assert cfg.vision.transformer.act == cfg.text.transformer.act == "quick_gelu"


def test_forward_outputs_are_named_and_normalised():
    torch.manual_seed(0)
    model = mm.create_model("tiny-clip").eval()
    images, tokens = torch.randn(4, 3, 32, 32), _tokens(4, 32, [5, 9, 32, 2])
    out = model(images, tokens)
    assert isinstance(out, mm.ModelOutput)
    torch.testing.assert_close(out.image_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.text_emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.logit_scale, torch.tensor(1 / 0.07))
    assert out.logit_bias is None and out.aux_loss is None and out.caption_logits is None
    torch.testing.assert_close(out.image_emb, F.normalize(model.encode_image(images), dim=-1))
    torch.testing.assert_close(model.encode_text(tokens, normalize=True), out.text_emb)
    only_img = model(images=images)
    assert only_img.text_emb is None
    torch.testing.assert_close(only_img.image_emb, out.image_emb)


def test_causal_text_tower_ignores_later_tokens():
    torch.manual_seed(0)
    model = mm.create_model("tiny-clip").eval()
    tokens = _tokens(1, 32, [20])
    x = model.text(tokens).tokens
    for t in (3, 10, 18):
        changed = tokens.clone()
        changed[0, t + 1:] = torch.randint(1, 49000, (32 - t - 1,))
        y = model.text(changed).tokens
        torch.testing.assert_close(y[:, : t + 1], x[:, : t + 1], atol=0, rtol=0)
        assert not torch.allclose(y[:, t + 1:], x[:, t + 1:])


def test_text_embedding_is_taken_at_the_end_token_and_ignores_padding():
    torch.manual_seed(0)
    model = mm.create_model("tiny-clip").eval()
    tokens = _tokens(2, 32, [6, 12])
    emb = model.encode_text(tokens)
    # open_clip's rule: the position of the largest id (the end token) of each row
    x = model.text(tokens).tokens
    ref = model.text.proj(x[torch.arange(2), tokens.argmax(-1)])
    torch.testing.assert_close(emb, ref)
    # a "!" (id 0, same as padding) before the end token is a real token and changes the embedding
    bang = tokens.clone()
    bang[0, 2] = 0
    assert not torch.allclose(model.encode_text(bang)[0], emb[0])


def test_bidirectional_text_uses_padding_mask():
    torch.manual_seed(0)
    model = mm.create_model("tiny-clip", text__causal=False, text__pool="mean").eval()
    tokens = _tokens(2, 32, [6, 12])
    emb = model.encode_text(tokens)
    shorter = tokens[:, :12]  # same sequences, less padding
    torch.testing.assert_close(model.encode_text(shorter), emb, atol=1e-5, rtol=0)
    # the first token does see the last real one (bidirectional)
    changed = tokens.clone()
    changed[1, 10] = 123
    assert not torch.allclose(model.text(changed).tokens[1, 0], model.text(tokens).tokens[1, 0])


@pytest.mark.parametrize("pos", ["learned", "sincos2d", "rope2d"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vision_variants_and_patch_dropout(pos, pool):
    torch.manual_seed(0)
    model = mm.create_model("tiny-clip", vision={"pos_embed": pos, "pool": pool, "patch_dropout": 0.5})
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    a, b = model.encode_image(images), model.encode_image(images)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # no dropout in eval
    model.train()
    out = model.vision(images)
    assert out.tokens.shape[1] == 32  # 64 patches, half kept
    assert not torch.allclose(out.emb, model.vision(images).emb)  # a different random subset


@pytest.mark.parametrize("patch, size", [(2, 8), (4, 32), (8, 32), (16, 64)])
def test_conv_stem_gives_the_patch_grid_and_each_image_its_own_features(patch, size):
    """vision.stem=conv: log2(patch) stride-2 convolutions give the patchify's token grid; its GroupNorm is per
    image, so a batch encodes each image as it encodes it alone (BatchNorm would not), in train mode too."""
    torch.manual_seed(0)
    model = mm.create_model("tiny-clip", vision={"stem": "conv", "patch_size": patch, "image_size": size})
    convs = [m for m in model.vision.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(1, 1)] + [(2, 2)] * (patch.bit_length() - 1)
    images = torch.randn(3, 3, size, size)
    out = model.vision(images)
    assert out.tokens.shape == (3, (size // patch) ** 2, model.config.vision.transformer.width)
    alone = torch.cat([model.vision(images[i : i + 1]).emb for i in range(3)])
    torch.testing.assert_close(out.emb, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"stem": "conv", "patch_size": 6, "image_size": 36}, "power-of-two patch_size"),
    ({"stem": "conv", "patch_remainder": True, "image_size": 34}, "patch_remainder"),
    ({"stem": "resnet"}, "must be patch or conv"),
])
def test_conv_stem_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=f"vision.stem.*{message}"):
        mm.create_model("tiny-clip", vision=overrides)


def test_conv_stem_models_do_not_convert_to_open_clip_or_hugging_face():
    from mm.hub.hf import check_hf_clip
    from mm.hub.open_clip import ConversionError

    model = mm.create_model("tiny-clip", vision={"stem": "conv"})
    for convert in (mm.to_open_clip, check_hf_clip):
        with pytest.raises(ConversionError, match="vision.stem"):
            convert(model)


def test_position_encodings_make_the_image_tower_position_aware():
    torch.manual_seed(0)
    for pos in ("learned", "sincos2d", "rope2d"):
        model = mm.create_model("tiny-clip", vision={"pos_embed": pos, "pool": "mean"}).eval()
        img = torch.randn(1, 3, 32, 32)
        # swapping two patches permutes the tokens; without positions the mean-pooled output would not move
        swapped = img.clone()
        swapped[..., :4, :4], swapped[..., 4:8, 4:8] = img[..., 4:8, 4:8], img[..., :4, :4]
        assert not torch.allclose(model.encode_image(img), model.encode_image(swapped), atol=1e-4), pos


def test_siglip_preset_has_logit_bias_and_moe_preset_has_aux_loss():
    torch.manual_seed(0)
    sig = mm.create_model("tiny-siglip")
    out = sig(torch.randn(2, 3, 32, 32), _tokens(2, 32))
    assert out.logit_bias.item() == -10.0 and out.logit_scale.item() == pytest.approx(10.0)
    moe = mm.create_model("tiny-moe")
    out = moe(torch.randn(2, 3, 32, 32), _tokens(2, 32, [7, 20]))
    assert set(out.router_stats) == {"vision", "text"} and len(out.router_stats["vision"]) == 3
    ref = torch.stack([s.aux_loss for v in out.router_stats.values() for s in v]).mean()
    torch.testing.assert_close(out.aux_loss, ref)
    out.aux_loss.backward()
    assert moe.vision.transformer.blocks[1].ffn.router.weight.grad.abs().sum() > 0


def test_every_tower_uses_the_shared_attention_and_block():
    model = mm.create_model("tiny-moe", vision__pool="attn")
    for tower in (model.vision, model.text):
        assert {type(m) for m in tower.modules() if type(m).__name__.endswith("Attention")} == {Attention}
        assert {type(m) for m in tower.modules() if type(m).__name__.endswith("Block")} == {Block}
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())
    assert isinstance(model.vision.attn_pool.attn, Attention)


def test_training_step_reduces_contrastive_loss():
    torch.manual_seed(0)
    model = mm.create_model("tiny-clip")
    loss_fn = mm.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, tokens = torch.randn(8, 3, 32, 32), _tokens(8, 32, [4 + i for i in range(8)])
    losses = []
    for _ in range(8):
        loss = loss_fn(model(images, tokens))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.6


# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------

def test_create_model_from_dict_file_and_overrides(tmp_path):
    cfg = mm.get_preset("tiny-clip")
    path = tmp_path / "m.json"
    path.write_text(json.dumps(mm.config.to_dict(cfg)))
    assert mm.create_model(path).config == cfg
    assert mm.create_model(mm.config.to_dict(cfg)).config == cfg
    m = mm.create_model("tiny-clip", vision__patch_dropout=0.25, text={"transformer": {"depth": 2}})
    assert m.config.vision.patch_dropout == 0.25 and len(m.text.transformer.blocks) == 2
    m = mm.create_model("tiny-clip", **{"vision.transformer.moe.num_experts": 4})
    assert m.config.vision.transformer.moe.num_experts == 4  # a null section is created on demand
    assert "tiny-clip" in mm.list_models() and "ViT-B-32" in mm.list_models()


@pytest.mark.parametrize("overrides, key", [
    ({"vision__patch_sise": 4}, "vision.patch_sise"),
    ({"vision__patch_size": 5}, "vision.patch_size"),
    ({"text__transformer__heads": 3}, "text.transformer.heads"),
    ({"vision__pool": "max"}, "vision.pool"),
    ({"embed_dim": "big"}, "embed_dim"),
    ({"text__transformer__moe__top_k": 3}, "text.transformer.moe.top_k"),
])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        mm.create_model("tiny-clip", **overrides)


def test_unknown_model_lists_presets():
    with pytest.raises(ConfigError, match="tiny-clip"):
        mm.create_model("ViT-Z-99")


# ----------------------------------------------------------------------------------------------------
# save_pretrained / load_pretrained
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-clip", "tiny-moe", "tiny-siglip"])
def test_save_load_roundtrip_is_exact(tmp_path, name):
    torch.manual_seed(0)
    model = mm.create_model(name, vision__pos_embed="sincos2d").eval()
    mm.save_pretrained(model, tmp_path / "m")
    loaded = mm.load_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    images, tokens = torch.randn(3, 3, 32, 32), _tokens(3, 32, [3, 8, 32])
    a, b = model(images, tokens), loaded(images, tokens)
    torch.testing.assert_close(a.image_emb, b.image_emb, atol=0, rtol=0)
    torch.testing.assert_close(a.text_emb, b.text_emb, atol=0, rtol=0)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert isinstance(mm.create_model(tmp_path / "m"), mm.CLIP)


def test_load_errors_name_the_file(tmp_path):
    model = mm.create_model("tiny-clip")
    d = mm.save_pretrained(model, tmp_path / "m")
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the last tensor
    w.write_bytes(bytes(data))
    with pytest.raises(mm.PretrainedError, match="model.safetensors.*SHA-256"):
        mm.load_pretrained(d)
    w.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(mm.PretrainedError, match="model.safetensors"):
        mm.load_pretrained(d, verify=False)
    w.unlink()
    with pytest.raises(mm.PretrainedError, match="model.safetensors.*missing"):
        mm.load_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(mm.PretrainedError, match="config.json.*missing"):
        mm.load_pretrained(d)


def test_load_reports_mismatched_tensor(tmp_path):
    from safetensors.torch import save_file

    d = mm.save_pretrained(mm.create_model("tiny-clip"), tmp_path / "m")
    state = {k: v.contiguous() for k, v in mm.create_model("tiny-clip").state_dict().items()}
    state["text.proj.weight"] = torch.zeros(7, 7)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(mm.PretrainedError, match=r"text\.proj\.weight.*\(7, 7\)"):
        mm.load_pretrained(d, verify=False)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    import pickle

    d = mm.save_pretrained(mm.create_model("tiny-clip"), tmp_path / "m")

    def refuse(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    mm.load_pretrained(d)
