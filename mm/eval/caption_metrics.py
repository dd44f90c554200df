"""Caption metrics BLEU-1..4 and CIDEr-D, computed the way the COCO caption toolkit computes them.

The reference is coco-caption as packaged by ``pycocoevalcap`` (``bleu/bleu_scorer.py``,
``cider/cider_scorer.py``). Published captioning numbers come from that code, and its definitions differ
from textbook BLEU / CIDEr in ways that move scores. This module copies them, arithmetic included, so
that numbers can be compared with papers:

* BLEU is corpus-level. Clipped n-gram matches and candidate n-gram counts are summed over the whole
  corpus before dividing. The brevity penalty uses, for each caption, the reference length closest to the
  candidate's length (ties go to the shorter one). A numerator offset of 1e-15 and a denominator offset
  of 1e-9 make a precision of 0 give a score of about 0 instead of dividing by zero.
* CIDEr is CIDEr-D. Document frequencies come from the references of the corpus being scored, so scores
  depend on the corpus, and a corpus of one image scores 0 because every idf is log(1) - log(1) = 0.
  Candidate tf-idf values are clipped to the reference's, and a Gaussian penalty (sigma 6) on the length
  difference is applied. Each caption's score is the mean over references and over n, times 10.

``bleu`` and ``cider`` take pre-tokenized strings and split them on whitespace, as the reference scorers
do. ``caption_scores`` first runs ``tokenize``, which stands in for coco-caption's Java step (Stanford
PTBTokenizer, then its punctuation filter). ``tokenize`` is an approximation: see its docstring.

The reference only supports BLEU up to n=4 and CIDEr with n=4. Here any n >= 1 works: BLEU-k uses
k-grams up to k, and CIDEr uses 1..n-grams. With n=4, the defaults, the results match the reference.

Pure Python, no dependencies, so it runs anywhere the training code does.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu", "caption_scores", "cider", "rouge_l", "tokenize"]

Ngram = tuple[str, ...]

# Curly quotes become ASCII before splitting, as PTBTokenizer does (it tokenizes "don’t" as "do n't").
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
# PTB splits off English clitics: "dog's" -> "dog 's", "don't" -> "do n't", "can't" -> "ca n't".
_CLITIC = re.compile(r"(?<=\w)(n't|'(?:s|m|d|ll|re|ve))(?!\w)")
_TOKEN = re.compile(
    r"""
      n't | '(?:s|m|d|ll|re|ve)(?!\w)   # clitics, already separated by _CLITIC
    | (?:[^\W\d_]\.){2,}                # acronyms PTB keeps whole: u.s.  e.g.  a.m.
    | (?:mrs?|ms|dr|prof|st|mt|ave|vs|etc|jr|sr|inc|co|ltd)\.(?!\w)  # abbreviations PTB keeps: mr.
    | no\.(?=\s*\d)                     # no. 5
    | (?<!\w)[^\W\d_]\.(?!\w)            # a single letter and its period, an initial to PTB: "a b." -> a b.
    | \d+(?:[.,:]\d+)+                  # numbers: 3.5  1,000  10:30
    | \w+(?:['/-]\w+)*                  # words, keeping black-and-white, and/or, o'clock
    | \.\.\. | -- | \S                  # anything else goes one symbol at a time
    """,
    re.VERBOSE,
)
# coco-caption drops tokens in PUNCTUATIONS. PTB turns " into `` or '', and brackets into -LRB- and so on.
# Here the raw characters are dropped instead of those PTB spellings.
_PUNCT = frozenset(".?!,:;-'\"`()[]{}")


def tokenize(caption: str) -> list[str]:
    """Lowercased tokens with punctuation removed, approximating coco-caption's PTBTokenizer step.

    Matches PTB where it affects n-grams. Clitics are split off ("dog's" -> ``dog 's``, "don't" ->
    ``do n't``), and hyphenated words, ``and/or``, ``o'clock``, numbers such as ``3.5`` and acronyms
    such as ``u.s.`` stay one token, and so do common abbreviations such as ``mr.`` and ``st.``, ``no.`` before a
    number and a single letter with its period (PTB takes ``a.`` at the end of "... in a." for an initial). Symbols
    that PTB keeps as tokens (``& $ % #``) are kept.

    Known differences from coco-caption, all rare in captions:

    * coco-caption runs PTB with ``-lowerCase``. That lowercases bracket tokens to ``-lrb-`` etc., and
      then its filter, which lists ``-LRB-``, no longer matches them, so it keeps them as words. Here
      brackets are dropped, which is what that filter was written to do.
    * Runs of punctuation such as ``?!`` are dropped here. PTB makes them one token, which coco keeps.
    * PTB knows more abbreviations (``jan.``) and more word-internal symbols (``x@y.com``,
      ``rock 'n' roll``) than the few rules here.
    """
    text = _CLITIC.sub(r" \1", caption.lower().translate(_QUOTES))
    return [t for t in _TOKEN.findall(text) if not set(t) <= _PUNCT]


def _ngrams(words: Sequence[str], n: int) -> Counter[Ngram]:
    """Counts of all 1..n-grams of ``words``. Every order goes in one Counter, as in the reference."""
    counts: Counter[Ngram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("need at least one candidate caption")
    for i, (cand, refs) in enumerate(zip(candidates, references)):
        if not isinstance(cand, str):
            raise TypeError(f"candidate {i}: expected a string, got {type(cand).__name__}")
        # A bare string would be read as a list of one-character references.
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references {i}: expected a list of strings, got {refs!r}")
        if not refs:
            raise ValueError(f"references {i}: needs at least one reference caption")


def bleu(candidates: list[str], references: list[list[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n of whitespace-tokenized captions: pycocoevalcap ``Bleu`` (option "closest")."""
    _check(candidates, references)
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    small, tiny = 1e-9, 1e-15  # the reference's offsets: tiny on numerators, small on denominators
    correct, guess = [0] * max_n, [0] * max_n
    test_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        words = cand.split()
        ref_words = [r.split() for r in refs]
        # Clipping uses, for each n-gram, its highest count in any single reference.
        max_ref: dict[Ngram, int] = {}
        for rw in ref_words:
            for g, c in _ngrams(rw, max_n).items():
                max_ref[g] = max(max_ref.get(g, 0), c)
        for g, c in _ngrams(words, max_n).items():
            correct[len(g) - 1] += min(max_ref.get(g, 0), c)
        for k in range(max_n):
            guess[k] += max(0, len(words) - k)
        test_len += len(words)
        # Closest reference length. Comparing (distance, length) pairs sends ties to the shorter one.
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]

    scores, prod = [], 1.0
    for k in range(max_n):
        # BLEU-k is the geometric mean of precisions 1..k, built up as a running product.
        prod *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _tfidf(
    counts: Counter[Ngram], n: int, df: Counter[Ngram], log_n_docs: float
) -> tuple[list[dict[Ngram, float]], list[float]]:
    """Per-order tf-idf vectors and their L2 norms, as the reference's ``counts2vec``."""
    vecs: list[dict[Ngram, float]] = [{} for _ in range(n)]
    sq = [0.0] * n
    for g, tf in counts.items():
        # An n-gram never seen in the references counts as df 1, so its idf is log(N), the maximum.
        v = float(tf) * (log_n_docs - math.log(max(1.0, df.get(g, 0.0))))
        vecs[len(g) - 1][g] = v
        sq[len(g) - 1] += v * v
    return vecs, [math.sqrt(s) for s in sq]


def cider(
    candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D of whitespace-tokenized captions, as pycocoevalcap ``Cider``: (corpus mean, per-caption)."""
    _check(candidates, references)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    cand_words = [c.split() for c in candidates]
    ref_words = [[r.split() for r in refs] for refs in references]
    cand_counts = [_ngrams(w, n) for w in cand_words]
    ref_counts = [[_ngrams(w, n) for w in refs] for refs in ref_words]

    # Document frequency: in how many images' reference sets the n-gram occurs. Each image is one document.
    df: Counter[Ngram] = Counter()
    for refs in ref_counts:
        df.update(set().union(*refs))
    log_n_docs = math.log(float(len(references)))

    scores = []
    for counts, words, refs, rwords in zip(cand_counts, cand_words, ref_counts, ref_words):
        vec, norm = _tfidf(counts, n, df, log_n_docs)
        total = [0.0] * n
        for r_counts, rw in zip(refs, rwords):
            r_vec, r_norm = _tfidf(r_counts, n, df, log_n_docs)
            # The reference measures length in bigrams, max(0, tokens - 1). That gives the same delta as
            # tokens unless one side is empty, and then the similarity is 0 anyway.
            delta = float(len(words) - len(rw))
            penalty = math.exp(-(delta**2) / (2 * sigma**2))
            for k in range(n):
                # Clip the candidate's weight to the reference's: repeating a word gains nothing.
                val = sum(min(v, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, v in vec[k].items())
                if norm[k] != 0 and r_norm[k] != 0:
                    val /= norm[k] * r_norm[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores), scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidates: list[str], references: list[list[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L over images, as pycocoevalcap ``Rouge`` computes it: per image the LCS-based F-measure (beta
    1.2) of the best precision and the best recall over its references; captions split on single spaces."""
    _check(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references):
        c = cand.split(" ")
        lcs = [_lcs(r.split(" "), c) for r in refs]
        prec = max(n / len(c) for n in lcs)
        rec = max(n / len(r.split(" ")) for n, r in zip(lcs, refs))
        scores.append((1 + beta ** 2) * prec * rec / (rec + beta ** 2 * prec) if prec and rec else 0.0)
    return sum(scores) / len(scores)


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of raw captions. Tokenizes with :func:`tokenize` first, as coco-caption
    does."""
    _check(candidates, references)
    cands = [" ".join(tokenize(c)) for c in candidates]
    refs = [[" ".join(tokenize(r)) for r in rs] for rs in references]
    b = bleu(cands, refs, max_n=4)
    return {"bleu1": b[0], "bleu2": b[1], "bleu3": b[2], "bleu4": b[3], "rouge_l": rouge_l(cands, refs),
            "cider": cider(cands, refs)[0]}
