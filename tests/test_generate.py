"""CoCa: the decoder, its KV cache, caption generation and the CoCa loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mm
from mm.inference.generate import (
    GenerationConfig,
    _banned_ngram_tokens,
    caption,
    generate,
    process_logits,
)
from mm.losses import ClipLoss, CocaLoss
from mm.models import CoCa

SOT, EOT = 49406, 49407


def tiny_coca(seed: int = 0, **overrides) -> CoCa:
    torch.manual_seed(seed)
    return mm.create_model("tiny-coca", **overrides).eval()


@pytest.fixture(scope="module")
def model() -> CoCa:
    return tiny_coca()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def eot_loving(model: CoCa, bias: float = 30.0) -> CoCa:
    """A copy whose LM head strongly prefers the end token (so captions would end at once)."""
    m = tiny_coca()
    m.load_state_dict(model.state_dict())
    old = m.decoder.head
    m.decoder.head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        m.decoder.head.weight.copy_(old.weight)
        m.decoder.head.bias.zero_()
        m.decoder.head.bias[EOT] = bias
    return m.eval()


# ---------------------------------------------------------------------------------------------------
# Model: shapes, presets, causality, the cache at the logit level
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("coca_ViT-B-32", 253_560_065), ("coca_ViT-L-14", 638_450_177)])
def test_coca_presets_match_open_clip_parameter_counts(name, params):
    import open_clip

    with torch.device("meta"):
        ours = mm.create_model(name)
        theirs = open_clip.create_model(name, device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs) == params
    assert count(ours.decoder) == count(theirs.text_decoder)
    assert count(ours.text) == count(theirs.text)
    assert count(ours.vision) == count(theirs.visual)


def test_forward_returns_packed_caption_logits_and_labels(model, images):
    tok = mm.get_tokenizer(model)
    tokens = tok(["a red circle", "two blue squares on green grass", "x"])
    tokens[2, 1:4] = torch.tensor([0, 320, EOT])  # id 0 is a real token ("!") as well as the pad id
    out = model(images, tokens)
    lengths = [int((t == EOT).nonzero()[0]) + 1 for t in tokens]  # sot ... eot
    expected = torch.cat([t[1:n] for t, n in zip(tokens, lengths)])  # every next token, padding left out
    assert torch.equal(out.caption_labels, expected)
    assert out.caption_labels[-3:].tolist() == [0, 320, EOT]
    assert out.caption_logits.shape == (sum(lengths) - 3, model.config.text.vocab_size)
    assert out.image_emb.shape == out.text_emb.shape == (3, 128)


def test_packed_caption_logits_equal_decoding_every_position(model, images):
    """forward computes logits only where a real token is predicted; they equal decoding everything."""
    tok = mm.get_tokenizer(model)
    tokens = tok(["a red circle", "two blue squares on green grass", "a cat"])
    out = model(images, tokens)
    full = model.next_token_logits(tokens[:, :-1], model.image_tokens(images))
    lengths = [int((t == EOT).nonzero()[0]) + 1 for t in tokens]
    expected = torch.cat([f[: n - 1] for f, n in zip(full, lengths)])
    assert torch.allclose(out.caption_logits, expected, atol=1e-5)


def test_causal_decoder_ignores_future_tokens(model, images):
    tok = mm.get_tokenizer(model)
    a = tok(["a small red circle on the left side of the image"] * 3)
    b = a.clone()
    b[:, 6:] = torch.randint(1, 40000, b[:, 6:].shape)
    img = model.image_tokens(images)
    la, lb = model.next_token_logits(a[:, :12], img), model.next_token_logits(b[:, :12], img)
    assert torch.allclose(la[:, :6], lb[:, :6], atol=1e-6)
    assert not torch.allclose(la[:, 6:], lb[:, 6:], atol=1e-3)


def test_embed_cls_embedding_ignores_what_follows_the_end_token(model):
    """The appended class token sees the caption but not the padding behind it."""
    tok = mm.get_tokenizer(model)
    t = tok(["a red circle", "a blue square on the left"])
    noisy = t.clone()
    after_end = torch.arange(t.shape[1])[None] > (t == EOT).long().argmax(1, keepdim=True)
    noisy[after_end] = torch.randint(1, 40000, (int(after_end.sum()),))
    assert torch.allclose(model.encode_text(t), model.encode_text(noisy), atol=1e-6)
    changed = t.clone()
    changed[0, 2] = 1000  # a real token changes the embedding
    assert not torch.allclose(model.encode_text(t)[0], model.encode_text(changed)[0], atol=1e-4)


def test_kv_cache_logits_equal_full_recompute(model, images):
    tok = mm.get_tokenizer(model)
    tokens = tok(["a small red circle on the left side"])[:, :9].expand(3, -1)
    img = model.image_tokens(images)
    full = model.next_token_logits(tokens, img)
    cache = model.new_decode_cache()
    steps = [model.next_token_logits(tokens[:, :4], img, cache)]  # a 4-token prompt, then one at a time
    for i in range(4, tokens.shape[1]):
        steps.append(model.next_token_logits(tokens[:, i:i + 1], None, cache))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_kv_cache_overflow_is_an_error(model, images):
    cache = model.new_decode_cache(max_len=2)
    tok = torch.full((3, 2), SOT)
    model.next_token_logits(tok, model.image_tokens(images), cache)
    with pytest.raises(ValueError, match="KV cache holds 2 positions"):
        model.next_token_logits(tok[:, :1], None, cache)


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    dict(method="greedy"),
    dict(method="beam", num_beams=3),
    dict(method="beam", num_beams=4, length_penalty=0.5, early_stopping=False),
    dict(method="greedy", repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(method="beam", num_beams=2, min_new_tokens=4, no_repeat_ngram_size=3),
])
def test_cached_and_uncached_decoding_give_identical_tokens(model, images, settings):
    cached = generate(model, images, max_new_tokens=12, use_cache=True, **settings)
    uncached = generate(model, images, max_new_tokens=12, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_cached_and_uncached_sampling_agree_with_the_same_seed(model, images):
    kw = dict(method="sample", top_k=50, top_p=0.9, temperature=0.8, max_new_tokens=10)
    a = generate(model, images, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, images, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    c = generate(model, images, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_beam_search_with_one_beam_is_greedy(model, images):
    greedy = generate(model, images, method="greedy", max_new_tokens=15)
    beam1 = generate(model, images, method="beam", num_beams=1, max_new_tokens=15)
    assert torch.equal(greedy, beam1)


def test_top_k_one_sampling_is_greedy(model, images):
    greedy = generate(model, images, method="greedy", max_new_tokens=10)
    sampled = generate(model, images, method="sample", top_k=1, max_new_tokens=10,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, sampled)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(model, images):
    def logprob(seqs):
        out = []
        for i, s in enumerate(seqs):
            s = s[s != 0] if EOT in s else s
            logits = model.next_token_logits(s[None, :-1], model.image_tokens(images[i:i + 1]))
            logits[..., SOT] = float("-inf")  # generation never proposes the start token
            out.append(F.log_softmax(logits, -1)[0].gather(1, s[1:, None]).sum().item())
        return torch.tensor(out)

    greedy = generate(model, images, method="greedy", max_new_tokens=6)
    beam = generate(model, images, method="beam", num_beams=5, max_new_tokens=6, length_penalty=0.0)
    assert (logprob(beam) >= logprob(greedy) - 1e-4).all()


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_min_new_tokens_forbids_the_end_token_before_the_minimum(model, images, method):
    m = eot_loving(model)
    kw = dict(method=method, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    assert (generate(m, images, **kw)[:, 1] == EOT).all()  # without a minimum: the end token at once
    out = generate(m, images, min_new_tokens=5, **kw)
    assert out.shape[1] == 7  # sot + 5 tokens + eot
    assert (out[:, 1:6] != EOT).all() and (out[:, 6] == EOT).all()


def test_generation_stops_at_the_end_token_and_pads(model, images):
    m = eot_loving(model, bias=3.0)  # some rows end early, others later
    out = generate(m, images, method="greedy", max_new_tokens=20)
    for row in out.tolist():
        if EOT in row:
            assert all(t == 0 for t in row[row.index(EOT) + 1:])
    assert (out[:, 0] == SOT).all()


def test_no_repeat_ngram_size(model, images):
    out = generate(model, images, method="greedy", max_new_tokens=25, no_repeat_ngram_size=2)
    for row in out.tolist():
        bigrams = list(zip(row[:-1], row[1:]))
        real = [b for b in bigrams if 0 not in b]
        assert len(real) == len(set(real))
    assert _banned_ngram_tokens([5, 6, 7, 5, 6], 3) == [7]
    assert _banned_ngram_tokens([5, 6, 7, 5], 2) == [6]
    assert sorted(_banned_ngram_tokens([5, 6, 7], 1)) == [5, 6, 7]


def test_repetition_penalty_and_special_tokens_in_logit_processing():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0, 4.0]])
    cfg = GenerationConfig(repetition_penalty=2.0, min_new_tokens=3)
    out = process_logits(logits.clone(), torch.tensor([[4, 0, 1]]), 1, cfg, sot_id=4, eot_id=5)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5, float("-inf"), float("-inf")]]
    out = process_logits(logits.clone(), torch.tensor([[4]]), 3, GenerationConfig(), sot_id=4, eot_id=5)
    assert out[0, 5] == 4.0 and out[0, 4] == float("-inf")


def test_bad_generation_settings_and_models_fail_clearly(model, images):
    with pytest.raises(ValueError, match="top_p"):
        generate(model, images, top_p=0.0)
    with pytest.raises(ValueError, match="method"):
        generate(model, images, method="nucleus")
    with pytest.raises(ValueError, match="max_new_tokens 40 does not fit"):
        generate(model, images, max_new_tokens=40)
    with pytest.raises(TypeError, match="no captioning decoder"):
        generate(mm.create_model("tiny-clip"), images)


def test_caption_returns_strings_from_tensors_pil_images_and_paths(model, images, tmp_path):
    tok = mm.get_tokenizer(model)
    from_tensor = caption(model, tok, images, method="greedy", max_new_tokens=8)
    assert len(from_tensor) == 3 and all(isinstance(c, str) for c in from_tensor)
    ids = generate(model, images, method="greedy", max_new_tokens=8)
    assert from_tensor[0] == tok.decode(ids[0].tolist()[: ids[0].tolist().index(EOT)] if EOT in ids[0] else ids[0])
    img = Image.new("RGB", (50, 40), (200, 30, 30))
    img.save(tmp_path / "red.png")
    pre = mm.image_transform(model)
    expected = caption(model, tok, pre(img)[None], method="greedy", max_new_tokens=8)
    assert caption(model, tok, [img], method="greedy", max_new_tokens=8) == expected
    assert caption(model, tok, [tmp_path / "red.png"], method="greedy", max_new_tokens=8, batch_size=1) == expected
    assert mm.caption is caption


def test_saved_coca_generates_the_same_captions(model, images, tmp_path):
    mm.save_pretrained(model, tmp_path / "coca")
    loaded = mm.load_pretrained(tmp_path / "coca")
    assert isinstance(loaded, CoCa)
    assert torch.equal(generate(model, images, max_new_tokens=8), generate(loaded, images, max_new_tokens=8))


# ---------------------------------------------------------------------------------------------------
# Loss and training
# ---------------------------------------------------------------------------------------------------

def test_coca_loss_is_the_weighted_sum(model, images):
    tok = mm.get_tokenizer(model)
    out = model(images, tok(["a red circle", "two blue squares", "a cat on a mat"]))
    loss = CocaLoss(ClipLoss(), contrastive_weight=0.5, caption_weight=3.0)(out)
    # the reference: cross-entropy over every (image, position) whose next token is real, from the full decoder
    full = model.next_token_logits(tok(["a red circle", "two blue squares", "a cat on a mat"])[:, :-1],
                                   model.image_tokens(images))
    tokens = tok(["a red circle", "two blue squares", "a cat on a mat"])
    labels = tokens[:, 1:].masked_fill(torch.cumsum(tokens[:, :-1] == EOT, 1) > 0, -100)
    ce = F.cross_entropy(full.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(loss["caption_loss"], ce, atol=1e-5)
    assert torch.allclose(loss["contrastive_loss"], ClipLoss()(out)["loss"])
    assert torch.allclose(loss["loss"], 0.5 * loss["contrastive_loss"] + 3.0 * loss["caption_loss"])
    smooth = CocaLoss(label_smoothing=0.1)(out)["caption_loss"]
    assert torch.allclose(smooth, F.cross_entropy(out.caption_logits, out.caption_labels, label_smoothing=0.1))
    assert not torch.allclose(smooth, loss["caption_loss"])
    with pytest.raises(ValueError, match="caption_logits"):
        CocaLoss()(mm.create_model("tiny-clip")(images, tok(["a", "b", "c"])))


def test_caption_rows_train_the_decoder_on_the_first_rows_and_embed_every_row(model, images):
    tok = mm.get_tokenizer(model)
    tokens = tok(["a red circle", "two blue squares on a long table", "a cat on a mat"])
    full, head = model(images, tokens), model(images[:2], tokens[:2])
    part = model(images, tokens, caption_rows=2)
    torch.testing.assert_close(part.image_emb, full.image_emb)  # the contrastive side sees all three rows
    torch.testing.assert_close(part.text_emb, full.text_emb)
    torch.testing.assert_close(part.caption_logits, head.caption_logits)  # the decoder the first two only
    assert torch.equal(part.caption_labels, head.caption_labels)
    assert part.caption_labels.numel() < full.caption_labels.numel()
    loss = CocaLoss(caption_fraction=0.5)
    assert [loss.caption_rows(n) for n in (1, 3, 128)] == [1, 2, 64] and CocaLoss().caption_rows(128) == 128
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="caption_rows must be in"):
            model(images, tokens, caption_rows=bad)
    none = model(images, tokens, caption_rows=0)  # the decoder not run at all (an objective not started yet)
    assert none.caption_logits is None and none.caption_labels is None
    torch.testing.assert_close(none.image_emb, full.image_emb)
    with pytest.raises(ValueError, match="caption_fraction"):
        CocaLoss(caption_fraction=0.0)


def test_training_steps_on_a_fixed_batch_reduce_the_caption_loss():
    model = tiny_coca(seed=2).train()
    tok = mm.get_tokenizer(model)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tok([f"a photo of {w} things" for w in ("red", "blue", "green", "tiny", "big", "odd", "two", "many")])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = CocaLoss()
    first = None
    for _ in range(25):
        losses = loss_fn(model(images, tokens))
        first = first if first is not None else losses["caption_loss"].item()
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    last = loss_fn(model(images, tokens))["caption_loss"].item()
    assert last < 0.3 * first, (first, last)


def test_decoder_layouts_and_config_checks():
    fused = tiny_coca(decoder__layout="fused")
    assert len(fused.decoder.transformer.blocks) == 2
    assert all(b.has_self_attn and b.has_cross_attn for b in fused.decoder.transformer.blocks)
    separate = tiny_coca()
    kinds = [(b.has_self_attn, b.has_cross_attn) for b in separate.decoder.transformer.blocks]
    assert kinds == [(True, False), (False, True)] * 2
    with pytest.raises(mm.ConfigError, match="decoder.transformer.width"):
        mm.create_model("tiny-coca", decoder__transformer__width=256)
    with pytest.raises(mm.ConfigError, match="decoder.layout"):
        mm.create_model("tiny-coca", decoder__layout="stacked")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(generate(fused, x, max_new_tokens=6), generate(fused, x, max_new_tokens=6, use_cache=False))


def test_mm_caption_cli_prints_one_line_per_readable_image(model, tmp_path):
    import subprocess
    import sys

    from conftest import colour_image

    mm.save_pretrained(model, tmp_path / "coca")
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    colour_image("red", 48).save(folder / "a.jpg")
    colour_image("blue", 40, seed=3).save(folder / "sub" / "b.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    proc = subprocess.run([sys.executable, "-m", "mm.cli", "caption", "--model", str(tmp_path / "coca"),
                           "--method", "greedy", "--max-new-tokens", "8", "--device", "cpu", str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    paths = [line.split("\t")[0] for line in lines]
    assert paths == [str(folder / "a.jpg"), str(folder / "sub" / "b.png")]
    assert "broken.jpg" in proc.stderr and "1 of 3 images could not be read" in proc.stderr
    expected = caption(model, mm.get_tokenizer(model), [folder / "a.jpg", folder / "sub" / "b.png"],
                       method="greedy", max_new_tokens=8)
    assert [line.split("\t", 1)[1] for line in lines] == expected
    bad = subprocess.run([sys.executable, "-m", "mm.cli", "caption", "--model", str(tmp_path / "coca"),
                          "--top-p", "0", str(folder)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "top_p" in bad.stderr
