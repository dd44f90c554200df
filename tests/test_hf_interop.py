"""Hugging Face `transformers` both ways: SiglipModel / Siglip2Model / CLIPModel -> mm (`mm.hub.from_hf`) and an mm
CLIP -> a CLIPModel directory (`mm.hub.to_hf_clip`, `mm convert --to-hf`); `mm convert --to-open-clip` of a model
mm runs through open_clip. Small random HF models are built offline from config objects, every tensor perturbed
(so a swapped mapping cannot pass), and compared with HF's own outputs. Tests that need transformers are marked
`hf` and skip, with the reason, without it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mm
from mm.hub import ConversionError, check_hf_clip, from_hf, hf_clip_config, to_hf_clip
from mm.hub.hf import config_from_hf
from mm.layers import TransformerConfig
from mm.models import ModelConfig, TextConfig, VisionConfig

ROOT = Path(__file__).resolve().parents[1]
NEEDS_TRANSFORMERS = "needs the optional transformers extra: pip install 'mm[hf]'"
TOL = 1e-5
WORDS = ["a", "photo", "of", "cat", "dog", "two", "on", "the", "sofa", "beach", "red", "square"]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# intermediate 76 / 48 is not a round ratio; 4 heads of 12
TEXT = {"hidden_size": 48, "intermediate_size": 76, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 100, "max_position_embeddings": 16}
VISION = {"hidden_size": 48, "intermediate_size": 76, "num_hidden_layers": 2, "num_attention_heads": 4,
          "patch_size": 8}


def tiny_siglip(transformers, kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "siglip":  # 36 px, patch 8: the conv drops the last 4 rows and columns (as SO400M-14 at 384 px)
        cfg = transformers.SiglipConfig(text_config=TEXT, vision_config={**VISION, "image_size": 36})
        return perturbed(transformers.SiglipModel(cfg), seed)
    cfg = transformers.Siglip2Config(text_config=TEXT, vision_config={**VISION, "num_patches": 16})
    return perturbed(transformers.Siglip2Model(cfg), seed)


def siglip_ids(seed: int = 0) -> torch.Tensor:
    """Token ids padded to max_length (16) as SigLIP's processor pads: text, end token 1, then padding 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (3, 16), generator=g)
    ids[0, 4], ids[0, 5:] = 1, 1
    ids[1, 9], ids[1, 10:] = 1, 1  # the third row fills the context: no padding
    return ids


def hf_image_features(hf, kind: str, images: torch.Tensor) -> torch.Tensor:
    """HF's image features of ``images`` (B, 3, H, W); Siglip2 gets the same pixels as its processor lays them
    out: patches flattened (row, column, channel), every patch real, the grid in spatial_shapes."""
    if kind != "siglip2":
        return hf.get_image_features(pixel_values=images)
    b, c, h, w = images.shape
    p = hf.config.vision_config.patch_size
    gh, gw = h // p, w // p
    patches = images.permute(0, 2, 3, 1).reshape(b, gh, p, gw, p, c).permute(0, 1, 3, 2, 4, 5)
    return hf.get_image_features(pixel_values=patches.reshape(b, gh * gw, p * p * c),
                                 pixel_attention_mask=torch.ones(b, gh * gw, dtype=torch.long),
                                 spatial_shapes=torch.tensor([[gh, gw]] * b))


def hf_logits(hf, kind: str, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    img = torch.nn.functional.normalize(hf_image_features(hf, kind, images), dim=-1)
    txt = torch.nn.functional.normalize(hf.get_text_features(input_ids=ids), dim=-1)
    bias = hf.logit_bias if hasattr(hf, "logit_bias") else 0.0
    return img @ txt.T * hf.logit_scale.exp() + bias


def mm_logits(model, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = model(images, ids)
    bias = out.logit_bias if out.logit_bias is not None else 0.0
    return out.image_emb @ out.text_emb.T * out.logit_scale + bias


# ------------------------------------------------------------------------------------------------ SigLIP in

@pytest.mark.hf
@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_siglip_imports_exactly(transformers, kind):
    hf = tiny_siglip(transformers, kind)
    model = from_hf(hf, tokenizer="hf:some-org/some-tokenizer").eval()
    v, t = model.config.vision, model.config.text
    assert (v.pool, v.class_token, v.norm_pre, v.patch_bias, v.proj) == ("map", False, False, True, "none")
    assert (t.causal, t.pad_mask, t.pool, t.proj_bias, t.context_length) == (False, False, "end", True, 16)
    assert model.vision.transformer.blocks[0].ffn.fc1.out_features == 76
    assert model.config.init_logit_bias is not None and t.tokenizer == "hf:some-org/some-tokenizer"
    size = 36 if kind == "siglip" else 32
    assert v.image_size == size and v.grid == 4
    images, ids = torch.randn(3, 3, size, size), siglip_ids()
    with torch.no_grad():
        d_img = max_diff(hf_image_features(hf, kind, images), model.encode_image(images))
        d_txt = max_diff(hf.get_text_features(input_ids=ids), model.encode_text(ids))
        d_logits = max_diff(hf_logits(hf, kind, images, ids), mm_logits(model, images, ids))
    print(f"{kind}: image {d_img:.3g} text {d_txt:.3g} logits {d_logits:.3g}")
    assert d_img < TOL and d_txt < TOL and d_logits < TOL
    assert model.logit_scale.item() == hf.logit_scale.item() and model.logit_bias.item() == hf.logit_bias.item()
    if kind == "siglip2":  # the Linear patch embedding is mm's Conv2d weight, permuted: (W, c, row, col)
        w = hf.vision_model.embeddings.patch_embedding.weight.reshape(48, 8, 8, 3)
        assert torch.equal(model.vision.patch_embed.weight[:, 2, 5, 7], w[:, 5, 7, 2])


@pytest.mark.hf
def test_siglip_text_pools_the_last_position_padding_included(transformers):
    """Changing padding changes HF's features (the last position attends to everything): mm follows."""
    hf = tiny_siglip(transformers, "siglip", seed=3)
    model = from_hf(hf, tokenizer="hf:x/y").eval()
    ids = siglip_ids(3)
    other = ids.clone()
    other[0, -1] = 0  # another pad id at the pooled position
    with torch.no_grad():
        a, b = model.encode_text(ids), model.encode_text(other)
        assert max_diff(a[0], b[0]) > 1e-3 and max_diff(a[1:], b[1:]) == 0
        assert max_diff(hf.get_text_features(input_ids=other), b) < TOL


# ------------------------------------------------------------------------------------------------ CLIP in

@pytest.mark.hf
@pytest.mark.parametrize("eos", [2, 49407])
def test_clip_import_pools_as_transformers_does(transformers, eos):
    """transformers 4.55 pools CLIP text at argmax(ids) when eos_token_id == 2 (legacy configs), else at the
    first eos_token_id (position 0 when there is none): mm's argmax / eos, for any ids."""
    torch.manual_seed(1)
    cfg = transformers.CLIPConfig(
        text_config=dict(TEXT, vocab_size=49408, eos_token_id=eos, hidden_act="quick_gelu"),
        vision_config=dict(VISION, image_size=32, hidden_act="quick_gelu"), projection_dim=24)
    hf = perturbed(transformers.CLIPModel(cfg), 1)
    model = from_hf(hf).eval()
    assert model.config.text.pool == ("argmax" if eos == 2 else "eos") and model.config.text.eot_id == 49407
    bpe = mm.get_tokenizer(model)(["a photo of a dog", "two cats on a sofa"])
    no_eot = torch.randint(1, 49000, (1, 16))  # HF: argmax, or position 0
    ids = torch.cat([bpe, no_eot])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        d_img = max_diff(hf.get_image_features(pixel_values=images), model.encode_image(images))
        d_txt = max_diff(hf.get_text_features(input_ids=ids), model.encode_text(ids))
        d_logits = max_diff(hf(input_ids=bpe, pixel_values=images).logits_per_image, mm_logits(model, images, bpe))
    print(f"clip eos {eos}: image {d_img:.3g} text {d_txt:.3g} logits {d_logits:.3g}")
    assert d_img < TOL and d_txt < TOL and d_logits < TOL


def test_unknown_hf_model_types_are_refused():
    with pytest.raises(ConversionError, match="model_type 'blip'.*clip, siglip, siglip2"):
        config_from_hf({"model_type": "blip", "vision_config": {}, "text_config": {}})
    siglip = {"model_type": "siglip", "text_config": dict(TEXT, projection_size=32),
              "vision_config": dict(VISION, image_size=32)}
    with pytest.raises(ConversionError, match="text_config.projection_size"):
        config_from_hf(siglip)
    with pytest.raises(ConversionError, match="vision_use_head"):
        config_from_hf({**siglip, "vision_config": {**siglip["vision_config"], "vision_use_head": False}})


# ------------------------------------------------------------------------------------------------ CLIP out

def small_clip(**changes) -> ModelConfig:
    """A small mm CLIP config with CLIP's BPE (vocab 49408); ``changes``: dotted keys."""
    cfg = ModelConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, patch_size=8, transformer=TransformerConfig(32, 2, 4, mlp_ratio=2.5)),
        text=TextConfig(context_length=16, transformer=TransformerConfig(48, 2, 4)))
    for key, value in changes.items():
        *path, last = key.split(".")
        obj = cfg
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg


EXPORTABLE = {
    "eot-gelu": {},
    # argmax is HF's legacy eos_token_id 2; a sincos table becomes HF's learned one; proj none the identity
    "argmax-quickgelu-sincos-noproj": {"text.pool": "argmax", "vision.transformer.act": "quick_gelu",
                                       "text.transformer.act": "gelu_tanh", "vision.pos_embed": "sincos2d",
                                       "vision.proj": "none", "text.transformer.norm_eps": 1e-6},
}


@pytest.mark.hf
@pytest.mark.parametrize("variant", list(EXPORTABLE))
def test_exported_clip_reloads_in_transformers_with_equal_outputs(transformers, tmp_path, variant):
    torch.manual_seed(2)
    model = perturbed(mm.create_model(small_clip(**EXPORTABLE[variant])), 2)
    to_hf_clip(model, tmp_path / "hf")
    hf, info = transformers.CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    hf.eval()
    images = torch.randn(2, 3, 32, 32)
    ids = mm.get_tokenizer(model)(["a photo of a dog", "two cats on a sofa, sleeping in the sun"])
    with torch.no_grad():
        d_img = max_diff(hf.get_image_features(pixel_values=images), model.encode_image(images))
        d_txt = max_diff(hf.get_text_features(input_ids=ids), model.encode_text(ids))
        d_logits = max_diff(hf(input_ids=ids, pixel_values=images).logits_per_image, mm_logits(model, images, ids))
        back = from_hf(tmp_path / "hf").eval()  # and in again
        d_back = max_diff(back.encode_text(ids), model.encode_text(ids))
    print(f"export {variant}: image {d_img:.3g} text {d_txt:.3g} logits {d_logits:.3g} round trip {d_back:.3g}")
    assert d_img < TOL and d_txt < TOL and d_logits < TOL and d_back < TOL
    assert hf.config.text_config.eos_token_id == (2 if variant.startswith("argmax") else 49407)


REFUSED = [
    ({"vision.pool": "mean"}, "vision.pool"),
    ({"vision.class_token": False, "vision.pool": "mean"}, "vision.class_token"),
    ({"vision.norm_pre": False}, "vision.norm_pre"),
    ({"vision.patch_bias": True}, "vision.patch_bias"),
    ({"vision.proj_bias": True}, "vision.proj_bias"),
    ({"vision.pos_embed": "rope2d"}, "vision.pos_embed"),
    ({"text.causal": False}, "text.causal"),
    ({"text.pool": "mean"}, "text.pool"),
    ({"text.pool": "eot", "text.tokenizer": "hf:x/y"}, "text.pool"),
    ({"text.pool": "eos", "text.eot_id": 2}, "text.eot_id"),
    ({"text.proj_bias": True}, "text.proj_bias"),
    ({"text.pos_embed": "rope"}, "text.pos_embed"),
    ({"vision.transformer.qk_norm": True}, "vision.transformer.qk_norm"),
    ({"text.transformer.layer_scale": 0.1}, "text.transformer.layer_scale"),
    ({"text.transformer.ffn": "swiglu"}, "text.transformer.ffn"),
    ({"vision.transformer.act": "silu"}, "vision.transformer.act"),
    ({"vision.transformer.qkv_bias": False}, "vision.transformer.qkv_bias"),
    ({"init_logit_bias": -10.0}, "init_logit_bias"),
]


@pytest.mark.parametrize("changes,field", REFUSED, ids=[f for _, f in REFUSED])
def test_export_refuses_what_hf_clip_cannot_express(tmp_path, changes, field):
    model = mm.create_model(small_clip(**changes))
    with pytest.raises(ConversionError, match=rf"CLIPModel: {field}: "):
        to_hf_clip(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset,field", [("tiny-coca", "decoder"), ("tiny-limoe", "one_tower")])
def test_export_refuses_other_model_kinds(preset, field):
    if preset not in mm.list_models():
        pytest.skip(f"no preset {preset}")
    with pytest.raises(ConversionError, match=rf"CLIPModel: {field}: "):
        check_hf_clip(mm.create_model(preset))


def test_export_refuses_a_tensor_it_has_no_place_for(tmp_path):
    """A tensor no rule takes (an mm feature the field checks do not know yet) is refused, not dropped."""
    model = mm.create_model(small_clip())
    model.text.register_parameter("extra_gain", torch.nn.Parameter(torch.ones(48)))
    with pytest.raises(ConversionError, match="'text.extra_gain' has no counterpart"):
        to_hf_clip(model, tmp_path / "out")


def test_hf_clip_config_names_the_pooling():
    cfg = small_clip(**{"text.pool": "argmax"})
    assert hf_clip_config(cfg)["text_config"]["eos_token_id"] == 2
    assert hf_clip_config(small_clip())["text_config"]["eos_token_id"] == 49407
    assert hf_clip_config(cfg)["vision_config"]["intermediate_size"] == 80


# ------------------------------------------------------------------------------------------------ the command

def run_mm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mm", "convert", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)


def save_word_tokenizer(d: Path) -> None:
    """A tiny word-level tokenizer (ids 2.., </s> = 1, <pad> = 0) saved as a Hugging Face tokenizer directory."""
    import tokenizers as tk
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    raw = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    raw.post_processor = tk.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                            model_max_length=16).save_pretrained(d)


@pytest.mark.hf
def test_mm_convert_from_a_siglip_directory(transformers, tmp_path):
    pytest.importorskip("tokenizers", reason=NEEDS_TRANSFORMERS)
    hf = tiny_siglip(transformers, "siglip", seed=4)
    hf.save_pretrained(tmp_path / "siglip")
    save_word_tokenizer(tmp_path / "siglip")
    proc = run_mm("--from", f"hf:{tmp_path / 'siglip'}", "--to", str(tmp_path / "mm"))
    assert proc.returncode == 0, proc.stderr
    model = mm.load_pretrained(tmp_path / "mm")
    assert model.config.text.tokenizer == f"hf:{(tmp_path / 'siglip').resolve()}"
    assert model.config.vision.image_mean == (0.5, 0.5, 0.5) and model.config.vision.resize_mode == "squash"
    texts = ["a photo of a cat", "two dog on the beach"]
    ids = mm.get_tokenizer(model)(texts)  # the directory's tokenizer, padded to the context as HF's processor pads
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "siglip")
    assert torch.equal(ids, hf_tok(texts, padding="max_length", max_length=16, return_tensors="pt").input_ids)
    images = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        assert max_diff(hf.get_image_features(pixel_values=images), model.encode_image(images)) < TOL
        assert max_diff(hf.get_text_features(input_ids=ids), model.encode_text(ids)) < TOL
    refused = run_mm("--model", str(tmp_path / "mm"), "--to-hf", str(tmp_path / "back"))
    assert refused.returncode == 2 and "error: not convertible to a Hugging Face CLIPModel: vision.class_token" \
        in refused.stderr, refused.stderr


@pytest.mark.hf
def test_mm_convert_to_hf(transformers, tmp_path):
    torch.manual_seed(5)
    model = perturbed(mm.create_model(small_clip()), 5)
    mm.save_pretrained(model, tmp_path / "mm")
    proc = run_mm("--model", str(tmp_path / "mm"), "--to-hf", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["CLIPModel"]
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images = torch.randn(2, 3, 32, 32)
    texts = ["a red square", "A photo of the beach, at sunset!"]
    ids = mm.get_tokenizer(model)(texts)
    with torch.no_grad():
        assert max_diff(hf.get_image_features(pixel_values=images), model.encode_image(images)) < TOL
        assert max_diff(hf.get_text_features(input_ids=ids), model.encode_text(ids)) < TOL
    # the directory's CLIPProcessor (written from open_clip's vocabulary) prepares what mm's tokenizer and image
    # transform do: the same ids up to padding (HF pads with the end token, mm with 0) and the same pixels
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    pil = Image.fromarray((np.random.default_rng(5).random((40, 56, 3)) * 255).astype(np.uint8))
    inputs = processor(text=texts, images=[pil, pil], padding="max_length", return_tensors="pt")
    assert torch.equal(inputs.input_ids, torch.where(ids == 0, 49407, ids))
    pixels = torch.stack([mm.image_transform(model, train=False)(pil)] * 2)
    assert torch.equal(inputs.pixel_values, pixels)
    with torch.no_grad():
        assert max_diff(hf.get_text_features(input_ids=inputs.input_ids), model.encode_text(ids)) < TOL


def test_mm_convert_wrapped_open_clip_model_to_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="needs open_clip")
    oc_cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(6)
    model = mm.create_model(oc_cfg)  # an open_clip ResNet, run through open_clip
    perturbed(model, 6)
    mm.save_pretrained(model, tmp_path / "mm")
    proc = run_mm("--model", str(tmp_path / "mm"), "--to-open-clip", str(tmp_path / "oc.safetensors"))
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    oc = open_clip.CLIP(**oc_cfg)
    oc.load_state_dict(load_file(tmp_path / "oc.safetensors"), strict=True)
    oc.eval()
    images, ids = torch.randn(2, 3, 64, 64), mm.get_tokenizer(model)(["a dog", "a cat"])
    with torch.no_grad():
        assert torch.equal(oc.encode_image(images), model.encode_image(images))
        assert torch.equal(oc.encode_text(ids), model.encode_text(ids))
    with pytest.raises(ConversionError, match="runs through open_clip"):
        to_hf_clip(model, tmp_path / "hf")


# ------------------------------------------------------------------------------------------------ mm benchmark

def run_mm_command(*args: str) -> subprocess.CompletedProcess:
    """``python -m mm ARGS`` (any command), which must succeed."""
    proc = subprocess.run([sys.executable, "-m", "mm", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.hf
def test_benchmark_of_an_imported_siglip_equals_transformers(transformers, tmp_path):
    """A SigLIP imported from a Hugging Face directory (`mm convert --from hf:DIR`) gets an `mm benchmark` result
    file, clip_benchmark's, whose metrics are those of the Hugging Face model itself: images prepared by the
    directory's own SiglipImageProcessor (squashed to 36 px, bicubic, from PNGs of other sizes), class prompts by
    its tokenizer padded to the context, ``get_image_features`` / ``get_text_features``, CLIP's zero-shot
    classifier (per class the renormalised mean of its unit prompt features). Each image is labelled with the
    class HF ranks 1st, 2nd, 4th or 6th for it, so that 0 < acc1 < acc5 < 1."""
    from conftest import png_bytes, write_tar

    pytest.importorskip("tokenizers", reason=NEEDS_TRANSFORMERS)
    hf = tiny_siglip(transformers, "siglip", seed=7)
    src = tmp_path / "siglip"
    hf.save_pretrained(src)
    save_word_tokenizer(src)
    transformers.SiglipImageProcessor(size={"height": 36, "width": 36}).save_pretrained(src)
    run_mm_command("convert", "--from", f"hf:{src}", "--to", tmp_path / "mm")

    classes = ["cat", "dog", "sofa", "beach", "red", "square"]
    templates = ["a photo of a {c}", "two {c} on the sofa"]
    rng = np.random.default_rng(7)
    sizes = [(40, 40), (48, 36), (30, 44)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for i in range(14)
              for w, h in [sizes[i % 3]]]
    processor = transformers.SiglipImageProcessor.from_pretrained(src)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        img = torch.nn.functional.normalize(
            hf.get_image_features(pixel_values=processor(images=images, return_tensors="pt").pixel_values), dim=-1)
        prompts = [t.format(c=c) for c in classes for t in templates]
        ids = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
        txt = torch.nn.functional.normalize(hf.get_text_features(input_ids=ids), dim=-1)
    W = torch.nn.functional.normalize(txt.view(len(classes), len(templates), -1).mean(1), dim=-1).T
    logits = img @ W  # (images, classes)
    labels = torch.stack([logits[i].argsort(descending=True)[(0, 1, 3, 5)[i % 4]] for i in range(len(images))])
    rank = (logits > logits.gather(1, labels[:, None])).sum(1)  # classes HF scores above the label
    recalls = [(rank[labels == c] == 0).double().mean().item() for c in labels.unique()]
    expected = {"acc1": (rank < 1).double().mean().item(), "acc5": (rank < 5).double().mean().item(),
                "mean_per_class_recall": sum(recalls) / len(recalls)}
    assert 0 < expected["acc1"] < expected["acc5"] < 1

    data = tmp_path / "noise"  # clip_benchmark's webdataset layout
    (data / "test").mkdir(parents=True)
    samples = [(f"s{i:03d}", {"png": png_bytes(im), "cls": str(int(y)).encode()})
               for i, (im, y) in enumerate(zip(images, labels))]
    write_tar(data / "test" / "0.tar", samples[:8])
    write_tar(data / "test" / "1.tar", samples[8:])
    (data / "test" / "nshards.txt").write_text("2\n")
    (data / "classnames.txt").write_text("\n".join(classes) + "\n")
    (data / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    out = tmp_path / "out"
    run_mm_command("benchmark", "--model", tmp_path / "mm", "--dataset", data, "--batch-size", "5", "--workers", "0",
                   "--device", "cpu", "--output", out)
    model = str(tmp_path / "mm")
    name = "{dataset}_{pretrained}_{model}_{language}_{task}.json".format(  # clip_benchmark's default --output
        dataset="noise", pretrained="", model=model.replace("/", "_"), language="en", task="zeroshot_classification")
    assert [p.name for p in out.glob("*.json")] == [name]
    got = json.loads((out / name).read_text())
    assert {k: v for k, v in got.items() if k != "metrics"} == {
        "dataset": "wds/noise", "model": model, "pretrained": "", "task": "zeroshot_classification", "language": "en"}
    print(f"imported siglip: {got['metrics']}")
    assert got["metrics"] == pytest.approx(expected, abs=1e-9)
