"""Exact match after SQuAD normalization (infersweep's own ``evaluate`` module).

Normalization (the SQuAD v1.1 evaluation script's): lower-case, drop punctuation, drop the
articles a/an/the, collapse whitespace. A prediction matches when its normalized form equals
the normalized reference. Returns ``exact_match`` (the mean, 0..1) and ``scores`` (one 0/1
per prediction).
"""

from __future__ import annotations

import re
import string

import datasets
import evaluate

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


class ExactMatch(evaluate.Metric):
    """Normalized exact match against one reference per prediction."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        scores = [float(normalize_answer(p) == normalize_answer(r))
                  for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
