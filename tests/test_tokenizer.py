"""Tests for mm.tokenizer: parity with open_clip's SimpleTokenizer and the Tokenizer contract."""
from __future__ import annotations

import copy
import pickle
import random
import sys
import types

import pytest
import torch

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

import mm.models  # noqa: E402,F401  (the package of mm.models.presets)
import mm.tokenizer as mm_tokenizer  # noqa: E402
from mm.tokenizer import Tokenizer, default_bpe_path, get_tokenizer  # noqa: E402

REFERENCE = open_clip_tokenizer.SimpleTokenizer()

LONG = "A very long caption about a small dog, running on the beach at sunset. " * 20

TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT.",
    "ThIs Is MiXeD cAsE",
    "",
    "   \t\n  ",
    "  lots   of\t\twhite \n\n space  ",
    "Hello, world! How's it going? (fine) [ok] {yes} <no> -- ... ;;; !!!???",
    "it's they're we'll I'd they've I'm don't",
    "1234567890 3.14159 1e-5 -42 100%",
    "Café naïve résumé Straße Ångström",
    "e\u0301 combining accent, fullwidth ＡＢＣ１２３, ligature ﬁsh",
    "emoji 🐶🔥👍🏽 and flags 🇫🇷",
    "一只猫在桌子上 日本語のテキスト 한국어",
    "ΣΊΣΥΦΟΣ Привет мир مرحبا नमस्ते İstanbul",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &amp;amp; &#39;num&#39; &eacute;",
    "<b>bold</b> &amp; tags",
    "mojibake sÃ³ and â€œcurlyâ€\x9d",
    "“curly quotes” and ‘single’ — dashes – …",
    "controls a\x00b\x07c\x1bd\x7fe\x0cf\rg\r\nh",
    "nbsp\u00a0here and\u2028line separator",
    "literal <start_of_text> and <end_of_text> markers",
    "a_b-c/d\\e@f#g$h^i*j+k=l|m~n`o",
    LONG,
]


def reference_tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    return REFERENCE(texts, context_length=context_length)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.mark.parametrize("context_length", [77, 32])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_matches_open_clip_per_string(tok: Tokenizer, text: str, context_length: int) -> None:
    expected = reference_tokenize([text], context_length)
    assert torch.equal(tok(text, context_length=context_length), expected)
    assert torch.equal(Tokenizer(context_length=context_length)(text), expected)
    assert tok.encode(text) == REFERENCE.encode(text)


@pytest.mark.parametrize("context_length", [77, 32])
def test_matches_open_clip_batch(tok: Tokenizer, context_length: int) -> None:
    expected = reference_tokenize(TEXTS, context_length)
    assert torch.equal(tok(TEXTS, context_length=context_length), expected)


def test_module_level_open_clip_tokenize(tok: Tokenizer) -> None:
    assert torch.equal(tok(TEXTS), open_clip_tokenizer.tokenize(TEXTS))


@pytest.mark.parametrize("context_length", [77, 32, 2])
def test_truncation_ends_with_eot(tok: Tokenizer, context_length: int) -> None:
    assert len(tok.encode(LONG)) > 77  # the case must actually need truncation
    out = tok(LONG, context_length=context_length)
    assert out.shape == (1, context_length)
    assert out[0, 0].item() == tok.sot_id
    assert out[0, -1].item() == tok.eot_id
    assert (out[0] != tok.pad_id).all()  # a truncated row is completely filled
    assert torch.equal(out, reference_tokenize([LONG], context_length))
    # Content is the prefix of the full encoding.
    assert out[0, 1:-1].tolist() == tok.encode(LONG)[: context_length - 2]


def test_exact_fit_is_not_truncated(tok: Tokenizer) -> None:
    text = "a photo of a small dog, running on the beach"
    ids = tok.encode(text)
    fit = tok(text, context_length=len(ids) + 2)[0].tolist()
    assert fit == [tok.sot_id, *ids, tok.eot_id]  # no padding, nothing dropped
    short = tok(text, context_length=len(ids) + 1)[0].tolist()
    assert short == [tok.sot_id, *ids[:-1], tok.eot_id]  # one token too many: last is dropped
    for length in (len(ids) + 1, len(ids) + 2, len(ids) + 3):
        assert torch.equal(tok(text, context_length=length), reference_tokenize([text], length))


def test_random_strings_match_open_clip(tok: Tokenizer) -> None:
    # Exercises both cleaning paths (plain-ASCII shortcut and ftfy) and both regex engines.
    rng = random.Random(1234)
    pieces = (
        [chr(c) for c in range(0, 128)]
        + ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&", ";", "<", ">", "'s", "'ll"]
        + list("éüßñçøÅ—–…“”‘’€£¥©®™°±×÷") + ["🐶", "日本", "ΣΣ", "İ", "ﬁ", "Ａ", "\u00a0", "\u2028", "Ã©"]
        + ["cat", "Dog", "PHOTO", "running", "the", "1999", " ", " ", " "]
    )
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(400)]
    for text in texts:
        assert tok.encode(text) == REFERENCE.encode(text), repr(text)
    assert torch.equal(tok(texts), reference_tokenize(texts, 77))
    assert torch.equal(tok(texts, context_length=16), reference_tokenize(texts, 16))


@pytest.mark.parametrize(
    "text",
    ["a photo of a cat", "the quick brown fox jumps over the lazy dog", "supercalifragilistic", "x"],
)
def test_decode_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    # Full padded rows decode the same: sot, eot and padding are dropped.
    assert tok.decode(tok(text)[0]) == text
    assert tok.decode(tok(text)[0].tolist()) == text


def test_decode_matches_open_clip_and_keeps_real_zero_ids(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        # Literal "<end_of_text>" in a caption encodes to the special id, which decode drops.
        plain = [i for i in ids if i not in (tok.sot_id, tok.eot_id)]
        assert tok.decode(ids) == REFERENCE.decode(plain).rstrip(" ")
    # Id 0 is both the pad id and a real token ('!' inside a word); find a text that uses
    # it (via the reference) and check decode does not drop it.
    with_zero = [t for t in ("wow !?? ok", "!$", "a !~ b", "!#") if 0 in REFERENCE.encode(t)]
    assert with_zero, "expected some candidate to encode to id 0"
    for text in with_zero:
        ids = REFERENCE.encode(text)
        assert tok.decode(ids) == REFERENCE.decode(ids).rstrip(" ")
        assert tok.decode(tok(text)[0]) == REFERENCE.decode(ids).rstrip(" ")


def test_shape_dtype_padding_contract(tok: Tokenizer) -> None:
    texts = ["a cat", "a much longer caption with quite a few more words", ""]
    out = tok(texts)
    assert out.shape == (3, 77) and out.dtype == torch.long
    for row, text in zip(out.tolist(), texts):
        n = len(tok.encode(text))
        assert row[0] == tok.sot_id
        assert row[n + 1] == tok.eot_id
        assert row.count(tok.eot_id) == 1 and row.count(tok.sot_id) == 1
        assert all(v == tok.pad_id for v in row[n + 2:])
    assert tok("").tolist()[0][:3] == [tok.sot_id, tok.eot_id, 0]
    assert tok([]).shape == (0, 77)
    assert tok(texts, context_length=20).shape == (3, 20)
    assert tok.context_length == 77  # per-call override does not stick


def test_str_vs_list_input(tok: Tokenizer) -> None:
    assert tok("a dog").shape == (1, 77)
    assert torch.equal(tok("a dog"), tok(["a dog"]))
    assert torch.equal(tok(("a dog", "a cat")), tok(["a dog", "a cat"]))


def test_properties(tok: Tokenizer) -> None:
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (49406, 49407, 0)
    assert tok.vocab_size == 49408 == REFERENCE.vocab_size
    assert tok.sot_id == REFERENCE.sot_token_id and tok.eot_id == REFERENCE.eot_token_id
    assert Tokenizer(context_length=32).context_length == 32


def test_invalid_context_length(tok: Tokenizer) -> None:
    with pytest.raises(ValueError):
        Tokenizer(context_length=1)
    with pytest.raises(ValueError):
        tok("a", context_length=0)


def test_pickle_round_trip(tok: Tokenizer) -> None:
    custom = Tokenizer(context_length=40)
    custom(TEXTS)  # warm the word cache; it must not matter for the copy
    for clone in (pickle.loads(pickle.dumps(custom)), copy.deepcopy(custom)):
        assert isinstance(clone, Tokenizer)
        assert clone.context_length == 40
        assert torch.equal(clone(TEXTS), custom(TEXTS))
        assert clone.decode(clone.encode("a photo of a cat")) == "a photo of a cat"
    assert len(pickle.dumps(custom)) < 10_000  # the vocabulary is not shipped in the pickle


def test_word_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mm_tokenizer, "_CACHE_SIZE", 8)
    small = Tokenizer()
    words = [f"word{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(100)]
    text = " ".join(words) + " <end_of_text> " + " ".join(reversed(words))
    assert small.encode(text) == REFERENCE.encode(text)  # eviction does not change results
    assert len(small._cache) <= 8


def test_missing_bpe_path_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "vocab.txt.gz"
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer(bpe_path=str(missing))
    assert str(missing) in str(info.value)
    assert "open-clip-torch" in str(info.value)


def test_explicit_bpe_path(tok: Tokenizer) -> None:
    explicit = Tokenizer(bpe_path=default_bpe_path())
    assert torch.equal(explicit(TEXTS), tok(TEXTS))


def test_get_tokenizer_defaults_and_override() -> None:
    assert get_tokenizer().context_length == 77
    assert get_tokenizer(None, context_length=16).context_length == 16
    model = types.SimpleNamespace(config=types.SimpleNamespace(text=types.SimpleNamespace(context_length=64)))
    assert get_tokenizer(model).context_length == 64
    assert get_tokenizer(model, context_length=12).context_length == 12


def test_get_tokenizer_uses_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("mm.models.presets")
    seen: list[str] = []

    def get_preset(name: str):
        seen.append(name)
        return types.SimpleNamespace(text=types.SimpleNamespace(context_length=52))

    fake.get_preset = get_preset
    monkeypatch.setitem(sys.modules, "mm.models.presets", fake)
    assert get_tokenizer("some-preset").context_length == 52
    assert seen == ["some-preset"]
    assert get_tokenizer("some-preset", context_length=20).context_length == 20


def test_get_tokenizer_without_presets_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mm.models.presets", None)  # makes the import raise ImportError
    assert get_tokenizer("ViT-B-32").context_length == 77


def test_module_imports_nothing_from_mm() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(mm_tokenizer))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n == "mm" or n.startswith("mm.")]


def test_get_tokenizer_with_real_presets() -> None:
    presets = pytest.importorskip("mm.models.presets")
    for name in presets.list_models():
        expected = presets.get_preset(name).text.context_length
        assert get_tokenizer(name).context_length == expected
