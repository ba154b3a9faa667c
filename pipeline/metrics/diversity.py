"""Lexical diversity of a set of generations: distinct-n, rep-n and self-BLEU.

Definitions are the README's "Metrics" table. distinct-n and rep-n count word n-grams
from :func:`words`; self-BLEU uses sacrebleu with the fixed settings below, which callers
should record next to the score (BLEU values depend on smoothing, order and tokenizer).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

__all__ = [
    "SELF_BLEU_ORDER",
    "SELF_BLEU_SMOOTH",
    "SELF_BLEU_TOKENIZE",
    "distinct_n",
    "diversity_metrics",
    "rep_n",
    "self_bleu",
    "words",
]

#: self-BLEU settings used by :func:`diversity_metrics`; record them with the score
SELF_BLEU_SMOOTH = "exp"
SELF_BLEU_ORDER = 4
SELF_BLEU_TOKENIZE = "13a"

_TOKENIZER_13A = Tokenizer13a()

NGram = tuple[str, ...]


def words(text: str) -> list[str]:
    """Lowercased word tokens of ``text`` for distinct-n and rep-n.

    Uses sacrebleu's 13a tokenizer (the WMT mteval-v13a rules, which split punctuation off
    words) and then whitespace splitting, so that word counts agree with how self-BLEU
    sees the same text, and "word." and "word" are one word. Lowercasing keeps a
    sentence-initial capital from counting as a new word.
    """
    return _TOKENIZER_13A(text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> list[NGram]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


def distinct_n(generations: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams, pooled over all generations.

    N-grams never span two generations. Returns 0.0 when there are no n-grams at all.
    """
    _check_n(n)
    all_grams = [g for text in generations for g in _ngrams(words(text), n)]
    if not all_grams:
        return 0.0
    return len(set(all_grams)) / len(all_grams)


def rep_n(generations: Sequence[str], n: int) -> float:
    """Mean over generations of ``1 - unique/total`` n-grams within each generation.

    Generations too short to hold one n-gram are left out of the mean (they have no
    repetition rate, rather than a rate of 0); with none left the result is 0.0.
    """
    _check_n(n)
    rates: list[float] = []
    for text in generations:
        grams = _ngrams(words(text), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    if not rates:
        return 0.0
    return sum(rates) / len(rates)


def self_bleu(
    generations: Sequence[str],
    max_ngram_order: int = SELF_BLEU_ORDER,
    smooth_method: str = SELF_BLEU_SMOOTH,
    tokenize: str = SELF_BLEU_TOKENIZE,
) -> float:
    """Mean over i of sentence BLEU of generation i against all the others, in [0, 1].

    Uses sacrebleu sentence-level BLEU with ``effective_order=True`` (short sentences are
    not zeroed for lacking 4-grams), the given smoothing and tokenizer; generation i is
    never among its own references. Higher means less diverse. Cost is quadratic in the
    number of generations: sample first for large sets (see :func:`diversity_metrics`).
    """
    n = len(generations)
    if n < 2:
        raise ValueError(f"self-BLEU needs at least 2 generations, got {n}")
    bleu = BLEU(
        max_ngram_order=max_ngram_order,
        smooth_method=smooth_method,
        tokenize=tokenize,
        effective_order=True,
    )
    total = 0.0
    for i, hyp in enumerate(generations):
        refs = [g for j, g in enumerate(generations) if j != i]
        total += bleu.sentence_score(hyp, refs).score
    # sacrebleu reports BLEU points (0..100).
    return total / n / 100.0


def diversity_metrics(
    generations: Sequence[str],
    max_self_bleu_samples: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """``distinct_1``, ``distinct_2``, ``rep_2``, ``rep_4``, ``self_bleu`` and ``self_bleu_n``.

    distinct/rep use every generation. Self-BLEU is quadratic, so when
    ``max_self_bleu_samples`` is set and smaller than the set, it runs on a random sample
    of that size drawn with ``seed`` (reproducible); ``self_bleu_n`` is the number of
    generations it actually used. Both self-BLEU keys are omitted for fewer than 2
    generations. Settings are :data:`SELF_BLEU_ORDER`, :data:`SELF_BLEU_SMOOTH` and
    :data:`SELF_BLEU_TOKENIZE`.
    """
    if max_self_bleu_samples is not None and max_self_bleu_samples < 2:
        raise ValueError(f"max_self_bleu_samples must be >= 2, got {max_self_bleu_samples}")
    out: dict[str, float] = {
        "distinct_1": distinct_n(generations, 1),
        "distinct_2": distinct_n(generations, 2),
        "rep_2": rep_n(generations, 2),
        "rep_4": rep_n(generations, 4),
    }
    if len(generations) < 2:
        return out
    sample: Sequence[str] = generations
    if max_self_bleu_samples is not None and max_self_bleu_samples < len(generations):
        sample = random.Random(seed).sample(list(generations), max_self_bleu_samples)
    out["self_bleu"] = self_bleu(sample)
    out["self_bleu_n"] = len(sample)
    return out
