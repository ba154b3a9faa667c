"""Diversity metrics on hand-made generations; expected values worked out by hand."""

from __future__ import annotations

import pytest

from pipeline.metrics.diversity import (
    SELF_BLEU_ORDER,
    SELF_BLEU_SMOOTH,
    SELF_BLEU_TOKENIZE,
    distinct_n,
    diversity_metrics,
    rep_n,
    self_bleu,
    words,
)


def test_words_lowercases_and_splits_punctuation() -> None:
    # 13a splits "," "!" "." off the words; lowercasing merges "Hello" and "hello"
    assert words("Hello, World! hello.") == ["hello", ",", "world", "!", "hello", "."]
    assert words("") == []


def test_distinct_n_pooled_without_crossing_generations() -> None:
    gens = ["a b a b", "a b c"]
    # unigrams: a b a b | a b c -> 7 total, {a, b, c} -> 3/7
    assert distinct_n(gens, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc -> 5 total, {ab, ba, bc} -> 3/5
    # (crossing the boundary would add "b a" and give 3/6 instead)
    assert distinct_n(gens, 2) == pytest.approx(3 / 5)


def test_distinct_n_uses_word_tokenization() -> None:
    # "The cat." -> the cat . ; "the cat" -> the cat: 5 total, {the, cat, .} -> 3/5
    assert distinct_n(["The cat.", "the cat"], 1) == pytest.approx(3 / 5)


def test_distinct_n_no_ngrams() -> None:
    assert distinct_n(["a", "b"], 2) == 0.0  # one word each: no bigrams anywhere
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(["a b"], 0)


def test_rep_n_hand_values() -> None:
    gens = ["a b a b", "a b c", "x"]
    # bigrams: gen1 ab ba ab -> 1 - 2/3 = 1/3; gen2 ab bc -> 0; gen3 has none -> skipped
    # mean (1/3 + 0) / 2 = 1/6
    assert rep_n(gens, 2) == pytest.approx(1 / 6)
    # unigrams: gen1 1 - 2/4 = 1/2; gen2 0; gen3 1 - 1/1 = 0 -> mean (1/2)/3 = 1/6
    assert rep_n(gens, 1) == pytest.approx(1 / 6)
    # 4-grams: only gen1 has one (a b a b) -> 1 - 1/1 = 0
    assert rep_n(gens, 4) == 0.0


def test_rep_n_no_ngrams() -> None:
    assert rep_n(["a", "b c"], 3) == 0.0
    assert rep_n([], 1) == 0.0


def test_self_bleu_identical_is_one() -> None:
    # every hypothesis has an exact copy among its references
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)


def test_self_bleu_disjoint_is_zero() -> None:
    # no shared unigram -> sacrebleu returns 0 before any smoothing; also shows self is
    # excluded (with itself as a reference each score would be 1)
    gens = ["alpha beta gamma delta", "one two three four", "red green blue yellow"]
    assert self_bleu(gens) == 0.0


def test_self_bleu_hand_value_with_exp_smoothing() -> None:
    # "a b c d" vs "a b c e" (and symmetric), equal lengths so brevity penalty 1:
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0/1 -> exp smoothing 1/(2*1) = 1/2
    # BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = (1/8) ** (1/4)
    assert self_bleu(["a b c d", "a b c e"]) == pytest.approx((1 / 8) ** 0.25)


def test_self_bleu_orders_similar_above_varied() -> None:
    similar = [
        "the quick brown fox jumps over the lazy dog",
        "the quick brown fox jumps over the sleepy dog",
        "the quick brown fox leaps over the lazy dog",
    ]
    varied = [
        "the quick brown fox jumps over the lazy dog",
        "rain is expected in the north by the evening",
        "she sold her old bicycle to a neighbour last week",
    ]
    assert self_bleu(similar) > self_bleu(varied)
    assert 0.0 <= self_bleu(varied) < self_bleu(similar) <= 1.0


def test_self_bleu_needs_two() -> None:
    with pytest.raises(ValueError, match="self-BLEU needs at least 2 generations, got 1"):
        self_bleu(["only one"])


def test_self_bleu_constants() -> None:
    assert (SELF_BLEU_SMOOTH, SELF_BLEU_ORDER, SELF_BLEU_TOKENIZE) == ("exp", 4, "13a")


def test_diversity_metrics_keys_and_values() -> None:
    gens = ["a b c d", "a b c e"]
    m = diversity_metrics(gens)
    assert set(m) == {"distinct_1", "distinct_2", "rep_2", "rep_4", "self_bleu", "self_bleu_n"}
    # unigrams 8 total, {a,b,c,d,e} -> 5/8; bigrams 6 total, {ab,bc,cd,ce} -> 4/6
    assert m["distinct_1"] == pytest.approx(5 / 8)
    assert m["distinct_2"] == pytest.approx(4 / 6)
    assert m["rep_2"] == 0.0
    assert m["rep_4"] == 0.0
    assert m["self_bleu"] == pytest.approx((1 / 8) ** 0.25)
    assert m["self_bleu_n"] == 2


def test_diversity_metrics_single_generation_omits_self_bleu() -> None:
    m = diversity_metrics(["a a b"])
    # unigrams a a b -> 2/3; bigrams aa ab -> 1; rep_2 0; no 4-gram -> rep_4 0
    assert m == pytest.approx({"distinct_1": 2 / 3, "distinct_2": 1.0, "rep_2": 0.0, "rep_4": 0.0})


def test_diversity_metrics_self_bleu_sampling() -> None:
    gens = [f"sentence number {w} about things" for w in "abcdefgh"]
    sampled = diversity_metrics(gens, max_self_bleu_samples=3, seed=7)
    assert sampled["self_bleu_n"] == 3
    # same seed -> same sample -> same score
    assert diversity_metrics(gens, max_self_bleu_samples=3, seed=7) == sampled
    # a cap at or above the set size uses every generation
    assert diversity_metrics(gens, max_self_bleu_samples=100)["self_bleu_n"] == len(gens)
    # any sample of identical generations still scores 1
    same = diversity_metrics(["x y z w"] * 6, max_self_bleu_samples=2)
    assert same["self_bleu"] == pytest.approx(1.0)
    assert same["self_bleu_n"] == 2
    with pytest.raises(ValueError, match="max_self_bleu_samples"):
        diversity_metrics(gens, max_self_bleu_samples=1)
