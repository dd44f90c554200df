"""Tests for mm.tokenizer's Hugging Face tokenizers (text.tokenizer: hf:NAME): token-exact with open_clip's
HFTokenizer, lazy, picklable, and clear errors at first use. No network: the tokenizers are small ones built
here with the `tokenizers` library and saved as Hugging Face tokenizer directories (and one as a fake entry of
the hub cache). Tests that need transformers are marked `hf` and skip, with the reason, without it."""
from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import mm.models  # noqa: F401  (the package of mm.models.presets)
import mm.tokenizer as mm_tokenizer
from mm.models.config import TextConfig
from mm.tokenizer import HFTokenizer, Tokenizer, TokenizerUnavailable, get_tokenizer

NEEDS_TRANSFORMERS = "needs the optional transformers extra: pip install 'mm[hf]'"

LONG = "A very long caption about a small dog, running on the beach at sunset. " * 20

TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT.",
    "",
    "   \t\n  ",
    "  lots   of\t\twhite \n\n space  ",
    "Hello, world! How's it going? (fine) [ok] {yes} <no> -- ... ;;; !!!???",
    "1234567890 3.14159 1e-5 -42 100%",
    "Café naïve résumé Straße Ångström",
    "e\u0301 combining accent, fullwidth ＡＢＣ１２３, ligature ﬁsh",
    "emoji 🐶🔥👍🏽 and flags 🇫🇷",
    "一只猫在桌子上 日本語のテキスト 한국어",
    "ΣΊΣΥΦΟΣ Привет мир مرحبا नमस्ते İstanbul",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;num&#39; &eacute;",
    "mojibake sÃ³ and â€œcurlyâ€\x9d",
    "literal [SEP] [CLS] [PAD] </s> <s> <pad> <unk> markers",
    "nbsp\u00a0here and\u2028line separator",
    LONG,
]

# Words to train the small vocabularies on (a vocabulary that knows most of TEXTS' words, with pieces for the rest).
CORPUS = [
    "a photo of a cat", "a photo of a dog on the beach at sunset", "the quick brown fox jumps over the lazy dog",
    "hello world, how is it going? fine, ok, yes, no", "a very long caption about a small dog running",
    "café naïve résumé straße ångström", "一只猫在桌子上 日本語のテキスト 한국어", "привет мир", "ΣΊΣΥΦΟΣ",
    "tom and jerry quoted numbers 1234567890 3.14159", "lots of white space here and there", "combining accents",
] * 4


def _bert_like(d: Path) -> None:
    """WordPiece, lowercasing, [CLS] text [SEP], [PAD] = 0 (bert-base-uncased: CLIPA's tokenizer)."""
    import tokenizers as tk
    from transformers import PreTrainedTokenizerFast

    raw = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = tk.normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    raw.decoder = tk.decoders.WordPiece()
    raw.train_from_iterator(CORPUS, tk.trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = tk.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=512).save_pretrained(d)


def _siglip_like(d: Path) -> None:
    """SentencePiece Unigram, text </s>, <pad> = 0, </s> = 1 (T5 / SigLIP's c4-en vocabulary), case kept."""
    import tokenizers as tk
    from transformers import PreTrainedTokenizerFast

    raw = tk.Tokenizer(tk.models.Unigram())
    raw.normalizer = tk.normalizers.Sequence([tk.normalizers.NFKC(), tk.normalizers.Replace(" {2,}", " ")])
    raw.pre_tokenizer = tk.pre_tokenizers.Metaspace()
    raw.decoder = tk.decoders.Metaspace()
    raw.train_from_iterator(CORPUS, tk.trainers.UnigramTrainer(
        vocab_size=250, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    raw.post_processor = tk.processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", raw.token_to_id("</s>"))])
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                            model_max_length=512).save_pretrained(d)


def _xlmr_like(d: Path) -> None:
    """SentencePiece-style BPE, <s> text </s>, <pad> = 1 (a non-zero pad id, as XLM-R / RoBERTa)."""
    import tokenizers as tk
    from transformers import PreTrainedTokenizerFast

    raw = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = tk.pre_tokenizers.Metaspace()
    raw.decoder = tk.decoders.Metaspace()
    raw.train_from_iterator(CORPUS, tk.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    bos, eos = raw.token_to_id("<s>"), raw.token_to_id("</s>")
    raw.post_processor = tk.processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                            cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                            model_max_length=512).save_pretrained(d)


BUILDERS = {"bert": _bert_like, "siglip": _siglip_like, "xlmr": _xlmr_like}

# (tokenizer, tokenizer_kwargs): the variants of open_clip's registry (SigLIP: clean canonicalize; CLIPA's BERT:
# strip_sep_token; XLM-R, mT5, RoBERTa, NLLB: none) plus a few crossings.
CASES = [
    ("bert", {}), ("bert", {"strip_sep_token": True}), ("bert", {"clean": "canonicalize"}),
    ("siglip", {"clean": "canonicalize"}), ("siglip", {}),
    ("xlmr", {}), ("xlmr", {"clean": "canonicalize"}), ("xlmr", {"strip_sep_token": True}),
]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    """The small tokenizers, each saved as a Hugging Face tokenizer directory: {kind: path}."""
    pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    pytest.importorskip("tokenizers", reason=NEEDS_TRANSFORMERS)
    root = tmp_path_factory.mktemp("hf_tokenizers")
    out = {}
    for kind, build in BUILDERS.items():
        build(root / kind)
        out[kind] = str(root / kind)
    return out


@pytest.fixture(scope="module")
def open_clip_hf():
    """open_clip's HFTokenizer class, the reference."""
    pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    return pytest.importorskip("open_clip.tokenizer").HFTokenizer


def model_with(tokenizer: str, kwargs: dict | None = None, context_length: int = 64) -> types.SimpleNamespace:
    """A stand-in model: what get_tokenizer reads is model.config.text."""
    text = TextConfig(context_length=context_length, tokenizer=tokenizer, tokenizer_kwargs=dict(kwargs or {}))
    return types.SimpleNamespace(config=types.SimpleNamespace(text=text))


def run_python(code: str, env: dict[str, str], timeout: float = 180) -> dict:
    """Run ``code`` in a fresh interpreter (so environment variables read at import time apply); it prints one
    JSON line last, returned parsed."""
    full_env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- no transformers


def test_get_tokenizer_picks_the_kind_from_the_config() -> None:
    tok = get_tokenizer(model_with("hf:some-org/some-tokenizer", {"clean": "canonicalize"}, context_length=64))
    assert isinstance(tok, HFTokenizer)
    assert (tok.name, tok.context_length, tok.tokenizer_kwargs) == ("some-org/some-tokenizer", 64,
                                                                     {"clean": "canonicalize"})
    assert not tok.loaded
    assert get_tokenizer(model_with("hf:x/y"), context_length=16).context_length == 16
    clip = get_tokenizer(model_with("clip", context_length=32))
    assert isinstance(clip, Tokenizer) and clip.context_length == 32
    # a text config without the field (an older model object) is CLIP
    legacy = types.SimpleNamespace(config=types.SimpleNamespace(text=types.SimpleNamespace(context_length=20)))
    assert isinstance(get_tokenizer(legacy), Tokenizer)


def test_get_tokenizer_of_a_preset_with_hf_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("mm.models.presets")
    text = TextConfig(context_length=64, tokenizer="hf:timm/ViT-B-16-SigLIP", tokenizer_kwargs={"clean": "canonicalize"})
    fake.get_preset = lambda name: types.SimpleNamespace(text=text)
    monkeypatch.setitem(sys.modules, "mm.models.presets", fake)
    monkeypatch.setattr(mm_tokenizer, "_load_hf_tokenizer", _must_not_load)
    tok = get_tokenizer("ViT-B-16-SigLIP")
    assert isinstance(tok, HFTokenizer) and tok.context_length == 64  # offline: nothing is loaded
    assert tok.name == "timm/ViT-B-16-SigLIP" and tok.tokenizer_kwargs == {"clean": "canonicalize"}
    assert get_tokenizer("ViT-B-16-SigLIP", context_length=16).context_length == 16


def test_get_tokenizer_rejects_an_unknown_kind() -> None:
    bad = types.SimpleNamespace(config=types.SimpleNamespace(text=types.SimpleNamespace(context_length=8,
                                                                                        tokenizer="sentencepiece")))
    with pytest.raises(ValueError, match="sentencepiece"):
        get_tokenizer(bad)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the tokenizer was loaded before its first call")


def test_construction_is_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mm_tokenizer, "_load_hf_tokenizer", _must_not_load)
    tok = HFTokenizer("no-such-org/no-such-tokenizer", context_length=32, clean="canonicalize")
    assert tok.context_length == 32 and not tok.loaded
    assert "no-such-org/no-such-tokenizer" in repr(tok)
    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert isinstance(clone, HFTokenizer) and clone.context_length == 32 and not clone.loaded
        assert clone.tokenizer_kwargs == {"clean": "canonicalize"}


def test_construction_imports_neither_transformers_nor_open_clip() -> None:
    out = run_python("""
        import json, pickle, sys, types
        from mm.models.config import TextConfig
        from mm.tokenizer import get_tokenizer
        text = TextConfig(context_length=64, tokenizer="hf:no-such-org/no-such-tokenizer")
        tok = get_tokenizer(types.SimpleNamespace(config=types.SimpleNamespace(text=text)))
        tok = pickle.loads(pickle.dumps(tok))
        print(json.dumps({"context_length": tok.context_length,
                          "imported": sorted(m for m in ("transformers", "open_clip", "tokenizers") if m in sys.modules)}))
    """, env={"HF_HUB_OFFLINE": "1"})
    assert out == {"context_length": 64, "imported": []}


def test_invalid_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="clean"):
        HFTokenizer("x/y", clean="upper")
    with pytest.raises(ValueError, match="context_length"):
        HFTokenizer("x/y", context_length=1)
    with pytest.raises(ValueError):
        HFTokenizer("")


def test_without_transformers_first_call_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    tok = get_tokenizer(model_with("hf:timm/ViT-B-16-SigLIP", {"clean": "canonicalize"}))  # constructing is fine
    for _ in range(2):  # a failed load is not remembered as loaded
        with pytest.raises(TokenizerUnavailable) as info:
            tok(["a photo of a cat"])
        message = str(info.value)
        assert "hf:timm/ViT-B-16-SigLIP" in message and "transformers" in message
        assert "pip install 'mm[hf]'" in message
        assert "\n" not in message  # commands report it in one line
        assert not tok.loaded
    assert isinstance(info.value, RuntimeError)


# ------------------------------------------------------------------------------------------------ transformers


@pytest.mark.hf
@pytest.mark.parametrize("context_length", [16, 64])
@pytest.mark.parametrize("kind, kwargs", CASES, ids=[f"{k}-{'-'.join(map(str, kw)) or 'plain'}" for k, kw in CASES])
def test_matches_open_clip(hf_dirs, open_clip_hf, kind: str, kwargs: dict, context_length: int) -> None:
    path = hf_dirs[kind]
    reference = open_clip_hf(path, context_length=context_length, **kwargs)
    expected = reference(TEXTS)
    tok = get_tokenizer(model_with(f"hf:{path}", kwargs, context_length=context_length))
    assert isinstance(tok, HFTokenizer) and not tok.loaded
    out = tok(TEXTS)
    assert tok.loaded
    assert out.dtype == torch.long and out.shape == (len(TEXTS), context_length)
    assert torch.equal(out, expected)
    for i, text in enumerate(TEXTS):  # one at a time too, as a str
        assert torch.equal(tok(text), expected[i:i + 1]), repr(text)
    # a per-call context length, as open_clip's call takes it; it does not stick
    assert torch.equal(tok(TEXTS, context_length=8), reference(TEXTS, context_length=8))
    assert tok.context_length == context_length
    # the long text was truncated (no padding left in its row; strip_sep_token zeroes its last id, the sep)
    pad = reference.tokenizer.pad_token_id
    long_row = out[TEXTS.index(LONG)]
    assert (long_row[:-1] != pad).all()
    assert len(reference.tokenizer(LONG).input_ids) > context_length


@pytest.mark.hf
def test_open_clip_get_tokenizer_agrees(hf_dirs, open_clip_hf, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same text config through open_clip's own get_tokenizer (hf_tokenizer_name / tokenizer_kwargs)."""
    import open_clip
    import open_clip.factory

    path = hf_dirs["siglip"]
    cfg = {"text_cfg": {"context_length": 64, "hf_tokenizer_name": path, "tokenizer_kwargs": {"clean": "canonicalize"}}}
    monkeypatch.setattr(open_clip.factory, "get_model_config", lambda name: copy.deepcopy(cfg))
    expected = open_clip.get_tokenizer("mm-test-siglip")(TEXTS)
    assert torch.equal(get_tokenizer(model_with(f"hf:{path}", {"clean": "canonicalize"}, 64))(TEXTS), expected)


@pytest.mark.hf
def test_empty_batch_and_pad_ids(hf_dirs) -> None:
    tok = HFTokenizer(hf_dirs["xlmr"], context_length=12)
    assert tok([]).shape == (0, 12) and tok([]).dtype == torch.long
    row = tok("a cat")[0].tolist()
    hf = tok.hf_tokenizer
    assert row[0] == hf.bos_token_id and hf.eos_token_id in row
    assert row[-1] == hf.pad_token_id == 1  # a non-zero pad id is kept, not replaced by 0


@pytest.mark.hf
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_pickle_round_trip_before_and_after_first_use(hf_dirs, kind: str) -> None:
    kwargs = {"clean": "canonicalize"} if kind == "siglip" else {}
    tok = HFTokenizer(hf_dirs[kind], context_length=24, **kwargs)
    before = pickle.loads(pickle.dumps(tok))
    expected = tok(TEXTS)
    assert tok.loaded and not before.loaded
    after = pickle.loads(pickle.dumps(tok))
    assert not after.loaded  # the loaded tokenizer is not shipped: a copy loads again on its first call
    assert len(pickle.dumps(tok)) < 2_000
    for clone in (before, after, copy.deepcopy(tok)):
        assert clone.context_length == 24 and clone.tokenizer_kwargs == kwargs
        assert torch.equal(clone(TEXTS), expected)


@pytest.mark.hf
def test_decode(hf_dirs) -> None:
    bert = HFTokenizer(hf_dirs["bert"], context_length=32)
    ids = bert("A photo of a cat")[0]
    assert bert.decode(ids) == "a photo of a cat"  # [CLS], [SEP] and padding dropped; lowercased vocabulary
    assert bert.decode(ids.tolist()) == bert.hf_tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    siglip = HFTokenizer(hf_dirs["siglip"], context_length=32, clean="canonicalize")
    assert siglip.decode(siglip("A photo of a cat!")[0]) == "a photo of a cat"


@pytest.mark.hf
def test_strip_sep_token_needs_a_sep_token(hf_dirs) -> None:
    tok = HFTokenizer(hf_dirs["siglip"], context_length=16, strip_sep_token=True)
    with pytest.raises(ValueError, match="strip_sep_token"):
        tok(["a cat"])


@pytest.mark.hf
def test_missing_local_directory_is_named(tmp_path, open_clip_hf) -> None:
    missing = tmp_path / "nowhere" / "tokenizer"
    tok = HFTokenizer(str(missing), context_length=16)
    with pytest.raises(TokenizerUnavailable) as info:
        tok(["a cat"])
    assert f"hf:{missing}" in str(info.value) and "no such directory" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerUnavailable) as info:
        HFTokenizer(str(empty))(["a cat"])
    assert f"hf:{empty}" in str(info.value) and "save_pretrained" in str(info.value)
    assert "\n" not in str(info.value)


FIRST_CALL = """
    import json, socket, sys, types
    network = []  # any attempt to reach the network fails at once and is recorded

    def refuse(*args, **kwargs):
        network.append(repr(args[:2]))
        raise OSError("network disabled by the test")

    socket.getaddrinfo = refuse
    socket.socket.connect = refuse
    from mm.models.config import TextConfig
    from mm.tokenizer import TokenizerUnavailable, get_tokenizer
    text = TextConfig(context_length=64, tokenizer="hf:{name}", tokenizer_kwargs={{"clean": "canonicalize"}})
    tok = get_tokenizer(types.SimpleNamespace(config=types.SimpleNamespace(text=text)))
    result = {{"context_length": tok.context_length, "imported_before": "transformers" in sys.modules}}
    try:
        result["ids"] = tok(["A photo of a cat.", "Café 一只猫"]).tolist()
    except TokenizerUnavailable as e:
        result["error"] = str(e)
    result["network"] = network
    print(json.dumps(result))
"""


@pytest.mark.hf
def test_name_not_in_the_cache_offline_says_what_to_do(tmp_path, open_clip_hf) -> None:
    name = "mm-test-no-such-org/no-such-tokenizer"
    hf_home = tmp_path / "hf_home"
    out = run_python(FIRST_CALL.format(name=name), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)})
    assert out["context_length"] == 64 and not out["imported_before"]
    message = out["error"]
    assert f"hf:{name}" in message
    assert str(hf_home / "hub") in message and "HF_HOME" in message and "HF_HUB_CACHE" in message
    assert "HF_HUB_OFFLINE" in message
    assert f"huggingface-cli download {name}" in message
    assert f"AutoTokenizer.from_pretrained('{name}')" in message
    assert "hf:/path/to/dir" in message
    assert "\n" not in message
    assert out["network"] == []


@pytest.mark.hf
def test_hub_id_in_the_cache_loads_without_asking_the_hub(tmp_path, hf_dirs, open_clip_hf) -> None:
    """A hub id whose files are in the HF cache loads from it, without HF_HUB_OFFLINE and without a round trip to
    the hub (this machine's CI has no network: a hub request would fail, or wait out the client's retries)."""
    name = "mm-test-org/tiny-siglip"
    hf_home = tmp_path / "hf_home"
    repo = hf_home / "hub" / ("models--" + name.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in Path(hf_dirs["siglip"]).iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    out = run_python(FIRST_CALL.format(name=name), env=env, timeout=120)
    assert "error" not in out, out.get("error")
    assert out["network"] == []  # not even a check for a newer revision
    reference = open_clip_hf(hf_dirs["siglip"], context_length=64, clean="canonicalize")
    assert out["ids"] == reference(["A photo of a cat.", "Café 一只猫"]).tolist()
