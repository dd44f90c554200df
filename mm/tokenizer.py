"""Tokenizers: mm's CLIP byte-level BPE (ids bit-identical to ``open_clip.tokenize``) and, for a text config
with ``tokenizer: hf:NAME``, a Hugging Face tokenizer run through open_clip's ``HFTokenizer``.

The CLIP tokenizer borrows only the vocabulary file from the ``open_clip`` package; the package itself is
never imported for it, because importing it is slow and pulls in unrelated dependencies. The Hugging Face
one imports ``transformers`` and ``open_clip`` on its first call, never at import time or construction.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import re as std_re
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import ftfy
import numpy as np
import regex
import torch

__all__ = ["Tokenizer", "HFTokenizer", "TokenizerUnavailable", "get_tokenizer", "default_bpe_path"]

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # CLIP keeps only the first 48894 merges of the file.
_SOT, _EOT = "<start_of_text>", "<end_of_text>"
_DEFAULT_CONTEXT_LENGTH = 77
_CACHE_SIZE = 100_000  # words; enough for caption vocabularies, bounded for long runs.

# Pre-tokenisation pattern of CLIP. The special tokens come first so that a literal
# "<end_of_text>" in a caption becomes the special id, as it does in open_clip.
# Compiled once at import time (module-level objects are not pickled with instances).
_WORD_RE = regex.compile(
    rf"{_SOT}|{_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)
# The same pattern restricted to ASCII text, for the stdlib engine, which is ~2x faster
# than `regex`. On ASCII input \p{L} is [a-z] (text is lowercased) and \p{N} is [0-9];
# the two engines' \s differ only on characters that cleaning has already removed.
_ASCII_WORD_RE = std_re.compile(
    rf"{_SOT}|{_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+",
    std_re.IGNORECASE | std_re.ASCII,
)
# Any character outside printable ASCII (plus tab / newline), or '&', may be changed by
# ftfy.fix_text or html.unescape. Text without such characters is left untouched by both,
# so it can skip them: ftfy dominates the cost of tokenizing typical captions.
_NEEDS_FIX_RE = std_re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


def _bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode character (GPT-2/CLIP byte-level BPE scheme).

    Printable latin-1 bytes map to themselves; the rest are shifted past 255 so that no
    BPE symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    unprintable = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + k) for k, b in enumerate(unprintable)})
    return mapping


_BYTE_ENCODER = _bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


def default_bpe_path() -> str:
    """Path of the vocabulary shipped in the installed ``open_clip`` package (may not exist)."""
    # find_spec locates the package without executing its (heavy) __init__.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return os.path.join("<open_clip not installed>", "open_clip", _VOCAB_FILE)
    return os.path.join(list(spec.submodule_search_locations)[0], _VOCAB_FILE)


@functools.lru_cache(maxsize=4)
def _load_tables(bpe_path: str) -> tuple[dict[str, int], dict[int, str], dict[tuple[str, str], int]]:
    """(encoder, decoder, merge ranks), read once per process and shared by all instances
    (including ones unpickled in a worker): treat them as read-only."""
    if not os.path.isfile(bpe_path):
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {bpe_path!r}. It ships with open_clip: "
                                f"`pip install open-clip-torch`, or pass bpe_path= pointing to {_VOCAB_FILE}.")
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]  # line 0 is a header
    byte_symbols = list(_BYTE_ENCODER.values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(m) for m in merges] + [_SOT, _EOT]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    decoder = {i: tok for tok, i in encoder.items()}
    ranks = {pair: i for i, pair in enumerate(merges)}
    return encoder, decoder, ranks


def _clean(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, double html unescape, collapse whitespace, lowercase."""
    if text.isascii() and _NEEDS_FIX_RE.search(text) is None:
        return " ".join(text.split()).lower()
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP BPE tokenizer; ``tok(texts)`` is bit-identical to ``open_clip.tokenize(texts)``.

    Picklable: only ``context_length`` and ``bpe_path`` are serialised; the vocabulary is
    re-read (once per process) on unpickling, and the word cache starts empty.
    """

    def __init__(self, context_length: int = _DEFAULT_CONTEXT_LENGTH, bpe_path: str | None = None) -> None:
        """Raises FileNotFoundError (naming the path) if the vocabulary file is missing."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (sot + eot), got {context_length}")
        self._context_length = int(context_length)
        self._bpe_path = bpe_path if bpe_path is not None else default_bpe_path()
        self._encoder, self._decoder, self._ranks = _load_tables(self._bpe_path)
        self._specials = {_SOT: (self._encoder[_SOT],), _EOT: (self._encoder[_EOT],)}
        # Pre-tokenised word -> token ids. FIFO eviction keeps cache hits a plain dict lookup.
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"context_length": self._context_length, "bpe_path": self._bpe_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["context_length"], state["bpe_path"])

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self._context_length}, bpe_path={self._bpe_path!r})"

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def sot_id(self) -> int:
        return self._specials[_SOT][0]

    @property
    def eot_id(self) -> int:
        return self._specials[_EOT][0]

    @property
    def pad_id(self) -> int:
        # 0 is also the id of the byte '!' (non word-final); open_clip pads with it anyway.
        return 0

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Token ids for one pre-tokenised word (uncached)."""
        special = self._specials.get(word)
        if special is not None:
            return special
        symbols = [_BYTE_ENCODER[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"  # CLIP marks the end of every word on its last symbol.
        ranks = self._ranks
        while len(symbols) > 1:
            # Apply the highest-priority (lowest-rank) merge present in the word...
            best_rank, best = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):  # ranks are unique
                    best_rank, best = rank, pair
            if best is None:
                break
            # ...to every non-overlapping occurrence, scanning left to right.
            first, second = best
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self._encoder[s] for s in symbols)

    def encode(self, text: str) -> list[int]:
        """Clean ``text`` and return its BPE token ids, without sot/eot and untruncated."""
        cache = self._cache
        ids: list[int] = []
        text = _clean(text)
        for word in (_ASCII_WORD_RE if text.isascii() else _WORD_RE).findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._bpe(word)
                if len(cache) >= _CACHE_SIZE:
                    cache.popitem(last=False)
                cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Readable text for ``ids``: sot/eot and trailing padding dropped, words separated by
        single spaces, no trailing space. Invalid utf-8 is replaced by U+FFFD.

        Only *trailing* zeros are treated as padding: id 0 is also a real token ('!'), but
        never the last token of an encoded text, because that always ends a word.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        sot, eot = self.sot_id, self.eot_id
        ids = [int(i) for i in ids if i != sot and i != eot]
        while ids and ids[-1] == self.pad_id:
            ids.pop()
        symbols = "".join(self._decoder[i] for i in ids)
        text = bytes(_BYTE_DECODER[c] for c in symbols).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").rstrip(" ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenize to a LongTensor of shape [B, context_length] (B = 1 for a str).

        Each row is ``[sot] + encode(text) + [eot]`` zero-padded on the right. Rows that are
        too long keep their first ``context_length`` ids with the last one replaced by eot,
        exactly as open_clip truncates.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self._context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2 (sot + eot), got {length}")
        # A flat int64 buffer (zero bytes == padding) plus one bulk copy into torch memory is
        # 5-10x faster for 1,000 captions than per-row tensor writes or torch.tensor(lists).
        buf = array("q", bytes(8 * len(texts) * length))
        sot, eot = self.sot_id, self.eot_id
        for i, text in enumerate(texts):
            row = [sot, *self.encode(text)]
            if len(row) >= length:  # with eot it would not fit: keep length - 1, then eot
                del row[length - 1:]
            row.append(eot)
            buf[i * length:i * length + len(row)] = array("q", row)
        result = torch.empty(len(texts), length, dtype=torch.long)
        result.numpy().reshape(-1)[:] = np.frombuffer(buf, dtype=np.int64)
        return result


class TokenizerUnavailable(RuntimeError):
    """A configured tokenizer cannot be loaded: a package it needs is missing, or its files are neither in the
    local Hugging Face cache nor fetchable. The message is one line naming the tokenizer and what to do."""


_HF_PREFIX = "hf:"
_HF_EXTRA = "pip install 'mm[hf]'"  # the optional extra of pyproject.toml: transformers, tokenizers, sentencepiece
_CLEAN_MODES = ("canonicalize", "lower", "whitespace")  # open_clip's get_clean_fn


class HFTokenizer:
    """A Hugging Face tokenizer (``tokenizer: hf:NAME`` in a text config) run through open_clip's
    ``HFTokenizer``, so ids are exactly open_clip's for the same NAME, context length and keyword arguments.

    Same call contract as :class:`Tokenizer`: ``tok(texts) -> LongTensor [B, context_length]``. NAME is a hub id
    (``timm/ViT-B-16-SigLIP``, ``bert-base-uncased``) or a local tokenizer directory. Lazy: nothing is imported
    or read until the first call (or :meth:`load`), which raises :class:`TokenizerUnavailable` when
    ``transformers`` is missing or the files are neither cached nor reachable. Picklable: only NAME, the
    context length and the keyword arguments are serialised; a copy loads again on its first call (from the
    Hugging Face cache, which the first load filled).
    """

    def __init__(self, name: str, context_length: int = _DEFAULT_CONTEXT_LENGTH, **kwargs: Any) -> None:
        """``kwargs`` go to open_clip's ``HFTokenizer`` (``clean``, ``strip_sep_token``, ``language``, ...;
        the rest to ``AutoTokenizer.from_pretrained``)."""
        if not name:
            raise ValueError("a Hugging Face tokenizer needs a name (hf:NAME)")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        if "clean" in kwargs and kwargs["clean"] not in _CLEAN_MODES:
            raise ValueError(f"tokenizer hf:{name}: clean must be one of {', '.join(_CLEAN_MODES)}, "
                             f"got {kwargs['clean']!r}")
        self._name = str(name)
        self._context_length = int(context_length)
        self._kwargs = dict(kwargs)
        self._tok: Any = None  # open_clip's HFTokenizer, built on first use

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self._name, "context_length": self._context_length, "kwargs": self._kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["context_length"], **state["kwargs"])

    def __repr__(self) -> str:
        kwargs = "".join(f", {k}={v!r}" for k, v in self._kwargs.items())
        return f"HFTokenizer({self._name!r}, context_length={self._context_length}{kwargs})"

    @property
    def name(self) -> str:
        return self._name

    @property
    def tokenizer_kwargs(self) -> dict[str, Any]:
        return dict(self._kwargs)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def loaded(self) -> bool:
        return self._tok is not None

    def load(self) -> HFTokenizer:
        """Load now (a preflight check); raises :class:`TokenizerUnavailable`. Returns ``self``."""
        if self._tok is None:
            self._tok = _load_hf_tokenizer(self._name, self._context_length, self._kwargs)
        return self

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying ``transformers`` tokenizer (loads it)."""
        return self.load()._tok.tokenizer

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenize to a LongTensor of shape [B, context_length] (B = 1 for a str), as open_clip does."""
        if isinstance(texts, str):
            texts = [texts]
        length = self._context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2, got {length}")
        tok = self.load()._tok
        if len(texts) == 0:  # Hugging Face tokenizers reject an empty batch; mm's Tokenizer returns [0, L]
            return torch.zeros(0, length, dtype=torch.long)
        return tok(list(texts), context_length=length).long()

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text for ``ids`` with special tokens and padding dropped (the Hugging Face tokenizer's decode)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        hf = self.hf_tokenizer
        decode = getattr(hf, "decode", None)
        if not callable(decode):
            raise NotImplementedError(f"tokenizer hf:{self._name} ({type(hf).__name__}) cannot decode")
        return decode([int(i) for i in ids], skip_special_tokens=True)


def _load_hf_tokenizer(name: str, context_length: int, kwargs: dict[str, Any]) -> Any:
    """open_clip's ``HFTokenizer(name, context_length=..., **kwargs)``, or :class:`TokenizerUnavailable`."""
    try:
        import transformers  # noqa: F401  (open_clip imports it inside HFTokenizer; fail here, clearly)
    except ImportError as e:
        raise TokenizerUnavailable(f"tokenizer hf:{name} needs the transformers package, which cannot be "
                                   f"imported ({e}): {_HF_EXTRA}") from e
    try:
        from open_clip.tokenizer import HFTokenizer as OpenClipHFTokenizer
    except ImportError as e:
        raise TokenizerUnavailable(f"tokenizer hf:{name} is run through open_clip, which cannot be imported "
                                   f"({e}): pip install open-clip-torch") from e
    try:
        tok = _from_cache_then_hub(OpenClipHFTokenizer, name, context_length, kwargs)
    except ImportError as e:  # e.g. sentencepiece / protobuf for a slow tokenizer
        raise TokenizerUnavailable(f"tokenizer hf:{name} needs a package that is not installed "
                                   f"({_first_line(e)}): {_HF_EXTRA}") from e
    except (OSError, ValueError) as e:
        if (isinstance(e, ValueError) and "sentencepiece" in str(e).lower()  # how some versions report it missing
                and importlib.util.find_spec("sentencepiece") is None):
            raise TokenizerUnavailable(f"tokenizer hf:{name} needs sentencepiece ({_first_line(e)}): "
                                       f"{_HF_EXTRA}") from e
        # OSError: not cached and not fetched; HFValidationError (a ValueError): neither a directory nor a hub
        # id; any ValueError for an existing directory: no tokenizer in it. Other ValueErrors are not ours.
        if isinstance(e, OSError) or type(e).__name__ == "HFValidationError" or os.path.isdir(name):
            raise TokenizerUnavailable(_unavailable_message(name, kwargs, e)) from e
        raise
    if kwargs.get("strip_sep_token") and tok.tokenizer.sep_token_id is None:
        raise ValueError(f"tokenizer hf:{name}: strip_sep_token needs a tokenizer with a sep token, and "
                         f"{type(tok.tokenizer).__name__} from {name} has none")
    return tok


def _from_cache_then_hub(cls: Any, name: str, context_length: int, kwargs: dict[str, Any]) -> Any:
    """``cls(name, ...)`` from the local Hugging Face cache if it is there, else from the hub.

    The cache is tried first (``local_files_only=True``), so a cached tokenizer loads without asking the hub
    for updates: a machine without network then loads it at once, instead of after the hub client's retries
    (about a minute), in every DataLoader worker. A caller's own ``local_files_only`` is respected."""
    if "local_files_only" in kwargs or os.path.isdir(name):
        return cls(name, context_length=context_length, **kwargs)
    try:
        return cls(name, context_length=context_length, local_files_only=True, **kwargs)
    except OSError:  # not (completely) cached: what open_clip itself does, hub included
        return cls(name, context_length=context_length, **kwargs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:200] + "..."


def _looks_like_path(name: str) -> bool:
    return (os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or os.path.exists(name)
            or name.count("/") > 1)  # hub ids are NAME or OWNER/NAME


def _unavailable_message(name: str, kwargs: dict[str, Any], e: BaseException) -> str:
    """One line: what was looked for, where, and how to get it."""
    reason = f"[{type(e).__name__}: {_first_line(e)}]"
    if _looks_like_path(name):
        if os.path.isdir(name):
            return (f"tokenizer hf:{name}: the directory holds no Hugging Face tokenizer that transformers can "
                    f"load (write one with tokenizer.save_pretrained(DIR)) {reason}")
        return (f"tokenizer hf:{name}: no such directory, and it is not a Hugging Face hub id; pass "
                f"hf:/path/to/dir (a tokenizer saved with save_pretrained) or hf:OWNER/NAME {reason}")
    cache = kwargs.get("cache_dir") or _hf_hub_cache()
    offline = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    why = (f"{'/'.join(offline)} is set, so the hub was not asked" if offline
           else "it could not be fetched from the hub (no network, or an unknown or gated repository)")
    return (f"tokenizer hf:{name} is not in the local Hugging Face cache ({cache}; set by HF_HOME / "
            f"HF_HUB_CACHE) and {why}. On a machine with network run `huggingface-cli download {name}` or "
            f"`python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{name}')\"` "
            f"and copy the cache here (or point HF_HOME at it), or save the tokenizer to a directory and "
            f"configure tokenizer: hf:/path/to/dir {reason}")


def _hf_hub_cache() -> str:
    """The Hugging Face hub cache directory as huggingface_hub resolves it (HF_HUB_CACHE, else HF_HOME/hub)."""
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except ImportError:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
        return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub"))


def get_tokenizer(model_or_name: Any = None, context_length: int | None = None) -> Tokenizer | HFTokenizer:
    """Tokenizer of a model or preset: its kind from ``text.tokenizer``, its context length matching.

    The text config is ``model_or_name.config.text`` for a model, the preset's ``text`` for a preset name (none
    when ``mm.models.presets`` is unavailable; an unknown name raises whatever ``get_preset`` raises). Its
    ``tokenizer`` is ``"clip"`` (the default, also without a text config): mm's CLIP BPE :class:`Tokenizer`; or
    ``"hf:NAME"``: an :class:`HFTokenizer` (lazy) with its ``tokenizer_kwargs``. Context length: explicit
    ``context_length``; else the text config's ``context_length``; else 77.
    """
    text = None
    config = getattr(model_or_name, "config", None)
    if config is not None and hasattr(getattr(config, "text", None), "context_length"):
        text = config.text
    elif isinstance(model_or_name, str):
        try:  # Lazy: keeps this module free of imports from the rest of mm (and usable without it).
            from .models.presets import get_preset
        except ImportError:
            pass
        else:
            text = get_preset(model_or_name).text
    if context_length is None:
        context_length = text.context_length if text is not None else _DEFAULT_CONTEXT_LENGTH
    kind = getattr(text, "tokenizer", "clip")
    if isinstance(kind, str) and kind.startswith(_HF_PREFIX):
        kwargs = getattr(text, "tokenizer_kwargs", None) or {}
        return HFTokenizer(kind[len(_HF_PREFIX):], context_length=context_length, **kwargs)
    if kind != "clip":
        raise ValueError(f"text.tokenizer must be clip or hf:NAME, got {kind!r}")
    return Tokenizer(context_length=context_length)
