"""Token F1 after SQuAD normalization (infersweep's own ``evaluate`` module).

Both strings are normalized as in the SQuAD v1.1 script (lower-case, no punctuation, no
articles a/an/the, single spaces) and split on whitespace; F1 is the harmonic mean of the
precision and recall of the multiset of common tokens (0 when none are common; 1 when both
are empty). Returns ``f1`` (the mean, 0..1) and ``scores`` (one per prediction).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import datasets
import evaluate

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of one prediction against one reference."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class TokenF1(evaluate.Metric):
    """SQuAD token F1 against one reference per prediction."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        scores = [token_f1(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"f1": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
