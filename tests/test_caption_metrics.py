"""BLEU / ROUGE-L / CIDEr-D caption metrics. Expected values are worked out here from the coco-caption formulas."""
from __future__ import annotations

import math
import random

import pytest

from mm.eval.caption_metrics import bleu, caption_scores, cider, rouge_l, tokenize

# The reference's offsets (1e-15 on numerators, 1e-9 on denominators) move scores by far less than this.
TOL = 1e-6


# --- tokenize ---------------------------------------------------------------------------------------------

def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize('A Dog, on the "Red" mat... (Smiling)!? -- yes; no: ok.') == [
        "a", "dog", "on", "the", "red", "mat", "smiling", "yes", "no", "ok"
    ]


def test_tokenize_follows_ptb_on_words():
    # Clitics split off as PTB does. Hyphenated words, numbers and acronyms stay whole.
    assert tokenize("The dog's toy isn't black-and-white") == [
        "the", "dog", "'s", "toy", "is", "n't", "black-and-white"
    ]
    assert tokenize("Can’t see 3.5 U.S. flags, dogs' bowls") == [
        "ca", "n't", "see", "3.5", "u.s.", "flags", "dogs", "bowls"
    ]
    assert tokenize("  ") == [] and tokenize("?!...") == []


# --- BLEU -------------------------------------------------------------------------------------------------

def test_bleu_hand_computed_clipping_and_closest_length():
    cand = "the the the cat sat"  # 5 tokens
    refs = ["the cat sat on the mat", "a cat sat"]  # lengths 6 and 3: 6 is closer to 5
    # Unigrams: the x3 is clipped to 2, the most in one reference. cat 1, sat 1: 4 of 5 match.
    p1 = (2 + 1 + 1) / 5
    # Bigrams: "the the" x2 does not match, "the cat" and "cat sat" do: 2 of 4.
    p2 = (0 + 1 + 1) / 4
    bp = math.exp(1 - 6 / 5)
    b1, b2 = bleu([cand], [refs], max_n=2)
    assert b1 == pytest.approx(p1 * bp, abs=TOL)
    assert b2 == pytest.approx(math.sqrt(p1 * p2) * bp, abs=TOL)


def test_bleu_sums_counts_over_corpus_before_dividing():
    # Caption 1 matches 2 of 2 unigrams and caption 2 matches 0 of 4. Corpus BLEU-1 is 2 / 6, not the mean
    # of the per-caption precisions (0.5). The lengths equal the reference lengths, so there is no penalty.
    b1 = bleu(["a b", "c d e f"], [["a b"], ["w x y z"]], max_n=1)[0]
    assert b1 == pytest.approx(2 / 6, abs=TOL)


def test_bleu_closest_reference_length_tie_goes_to_shorter():
    # The candidate has 4 tokens. The references have 3 and 5, both 1 away. The shorter one wins, so there
    # is no brevity penalty. Choosing 5 would multiply by exp(1 - 5/4).
    assert bleu(["a b c d"], [["a b c", "a b c d e"]], max_n=1)[0] == pytest.approx(1.0, abs=TOL)


def test_bleu_identical_caption_is_one():
    caps = ["a man riding a wave on a surfboard", "two dogs play in the snow"]
    for score in bleu(caps, [[c, "something else entirely here"] for c in caps]):
        assert score == pytest.approx(1.0, abs=TOL)


def test_bleu_brevity_penalty():
    ref = [["a cat sat on the mat"]]
    short = bleu(["a cat sat on"], ref)
    # All 4 orders have precision 1, so only the penalty exp(1 - 6/4) is left.
    for score in short:
        assert score == pytest.approx(math.exp(1 - 6 / 4), abs=TOL)
    assert all(s < f for s, f in zip(short, bleu(["a cat sat on the mat"], ref)))


def test_bleu_max_n_prefix_and_empty_candidate():
    cands, refs = ["a cat on a mat", "dog"], [["a cat sat on the mat"], ["the dog", "a dog runs"]]
    assert bleu(cands, refs, max_n=2) == bleu(cands, refs)[:2]
    assert bleu([""], [["a dog"]]) == pytest.approx([0.0] * 4, abs=TOL)


# --- CIDEr-D ----------------------------------------------------------------------------------------------

def test_cider_hand_computed():
    # 2 images, so the idf is log(2) - log(df). "a" is in both reference sets and has idf 0. "dog",
    # "cat", "a dog" and "a cat" have idf log 2.
    refs = [["a dog"], ["a cat"]]
    mean, per = cider(["dog", "cat"], refs)
    # Unigram cosine of {dog: log2} with {a: 0, dog: log2} is 1. The candidate has no bigrams, and no
    # 3- or 4-grams, so those orders give 0. Lengths are 1 and 2, so the penalty is exp(-1 / (2 * 6^2)).
    expected = 10 * (1 + 0 + 0 + 0) / 4 * math.exp(-1 / 72)
    assert per == pytest.approx([expected, expected], abs=1e-12)
    assert mean == pytest.approx(expected, abs=1e-12)


def test_cider_ngram_in_every_document_has_zero_idf():
    refs = [["a dog"], ["a cat"]]
    # "a" occurs in every image's references, so its idf is log(2) - log(2) = 0 and it earns nothing,
    # even though it matches the reference. "dog" occurs in only one image's references, so it scores.
    assert cider(["a", "cat"], refs)[1][0] == 0.0
    assert cider(["dog", "cat"], refs)[1][0] > 0.0
    # When every reference set is the same, every n-gram has idf 0 and even an exact copy scores 0.
    assert cider(["a dog", "a dog"], [["a dog"], ["a dog"]]) == (0.0, [0.0, 0.0])


def test_cider_document_frequency_counts_images_not_captions():
    # "dog" is in both references of image 0 but in no other image: df 1, idf log 2, not df 2, idf 0.
    # Each reference then has unigram cosine 1 and the same length, and no higher orders: 10 * 1/4.
    _, per = cider(["dog", "cat"], [["dog", "dog"], ["cat"]])
    assert per[0] == pytest.approx(2.5, abs=1e-12)


def test_cider_clipping_repetition_does_not_help():
    refs = [["a dog"], ["a cat"]]
    once = cider(["dog", "cat"], refs)[1][0]
    twice = cider(["dog dog", "cat"], refs)[1][0]
    # tf 2 is clipped to the reference's 1: unigram similarity 2*log2 clipped to log2, times log2, over
    # norms 2*log2 * log2 = 0.5. The lengths are equal, so there is no penalty. Without clipping the
    # cosine would be 1, which beats `once`.
    assert twice == pytest.approx(10 * 0.5 / 4, abs=1e-12)
    assert twice < once
    assert cider(["dog " * 8, "cat"], refs)[1][0] < once


def _corpus(seed: int = 0, n: int = 8) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    words = ["a", "the", "dog", "cat", "man", "sits", "on", "red", "bench", "near", "table", "street"]

    def sent() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))

    refs = [[sent() for _ in range(rng.randint(1, 5))] for _ in range(n)]
    cands = [rng.choice(r) if i % 3 == 0 else sent() for i, r in enumerate(refs)]
    return cands, refs


def test_cider_exact_reference_beats_unrelated():
    cands, refs = _corpus()
    exact = list(cands)
    exact[1] = refs[1][0]
    unrelated = list(cands)
    unrelated[1] = "zebra giraffe elephant stands tall"
    assert cider(exact, refs)[1][1] > cider(unrelated, refs)[1][1] == 0.0


def test_cider_permutation_invariant_and_mean_of_per_caption():
    cands, refs = _corpus(seed=1)
    mean, per = cider(cands, refs)
    assert mean == pytest.approx(sum(per) / len(per), abs=1e-12)
    assert mean > 0.0
    order = list(range(len(cands)))
    random.Random(2).shuffle(order)
    mean_p, per_p = cider([cands[i] for i in order], [refs[i] for i in order])
    assert mean_p == pytest.approx(mean, abs=1e-12)
    assert per_p == pytest.approx([per[i] for i in order], abs=1e-12)


def test_cider_depends_on_corpus_and_single_image_is_zero():
    # The idf comes from the corpus being scored. With one image every reference n-gram has idf 0.
    assert cider(["a dog runs"], [["a dog runs"]]) == (0.0, [0.0])
    assert cider(["", "a cat"], [["a dog"], ["a cat"]])[1][0] == 0.0  # an empty candidate scores 0


# --- caption_scores and validation ------------------------------------------------------------------------

def test_caption_scores_tokenizes_first():
    refs = [["A dog runs on the beach.", "a brown dog running"], ["Two cats sleep on a sofa."]]
    raw = caption_scores(["A DOG, runs on the beach!", "two cats sleep..."], refs)
    assert set(raw) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
    clean_refs = [[" ".join(tokenize(r)) for r in rs] for rs in refs]
    b = bleu(["a dog runs on the beach", "two cats sleep"], clean_refs)
    assert [raw[f"bleu{k}"] for k in range(1, 5)] == pytest.approx(b, abs=1e-12)
    clean_cider = cider(["a dog runs on the beach", "two cats sleep"], clean_refs)[0]
    assert raw["cider"] == pytest.approx(clean_cider, abs=1e-12)
    assert raw["rouge_l"] == pytest.approx(rouge_l(["a dog runs on the beach", "two cats sleep"], clean_refs), abs=1e-12)


# --- ROUGE-L ----------------------------------------------------------------------------------------------

def test_rouge_l_hand_computed_best_precision_and_best_recall():
    # Reference 1 "the cat sat on the mat" (6) and candidate "the cat on a mat" (5): LCS "the cat on mat" = 4.
    # Reference 2 "a cat" (2): LCS "cat" = 1 (or "a"), so precision 1/5, recall 1/2.
    # The F-measure takes the best precision (4/5, ref 1) and the best recall (4/6 vs 1/2: ref 1), beta 1.2.
    p, r, b2 = 4 / 5, 4 / 6, 1.2 ** 2
    assert rouge_l(["the cat on a mat"], [["the cat sat on the mat", "a cat"]]) == pytest.approx(
        (1 + b2) * p * r / (r + b2 * p), abs=1e-12)
    # "a b" against "a b c d" (precision 1, recall 2/4) and "x a b" (precision 1, recall 2/3): the maxima, 1 and 2/3
    p, r = 1.0, 2 / 3
    assert rouge_l(["a b"], [["a b c d", "x a b"]]) == pytest.approx((1 + b2) * p * r / (r + b2 * p), abs=1e-12)


def test_rouge_l_is_the_mean_over_images_and_zero_without_overlap():
    one = rouge_l(["a dog runs"], [["a dog runs fast"]])
    assert rouge_l(["a dog runs", "x y"], [["a dog runs fast"], ["z w"]]) == pytest.approx(one / 2, abs=1e-12)
    assert rouge_l(["x y"], [["z w"]]) == 0.0
    assert rouge_l(["a dog"], [["a dog"]]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fn", [bleu, cider, rouge_l, caption_scores])
def test_validation(fn):
    with pytest.raises(ValueError, match="2 candidates but 1"):
        fn(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="references 1"):
        fn(["a", "b"], [["a"], []])
    with pytest.raises(TypeError, match="references 0"):
        fn(["a"], ["a dog"])  # a bare string, not a list of references
    with pytest.raises(TypeError, match="candidate 0"):
        fn([["a"]], [["a"]])
    with pytest.raises(ValueError, match="at least one"):
        fn([], [])
