"""ROUGE-L: the LCS-based F-measure over tokens (infersweep's own ``evaluate`` module,
written here, no ``rouge_score`` and no hub download).

Tokens as in ``rouge_score``'s default tokenizer without stemming: lower-case, every
character outside ``[a-z0-9]`` becomes a space, split on whitespace. With L the length of
the longest common subsequence of the token lists, P = L / len(prediction) and
R = L / len(reference), F = 2PR / (P + R) (0 when L = 0 or a side is empty). ``rougeL`` is
the mean F over the predictions (0..1), ``scores`` each prediction's F.
"""

from __future__ import annotations

import re

import datasets
import evaluate


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric tokens."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len a * len b))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one prediction against one reference."""
    p, r = tokenize(prediction), tokenize(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


class RougeL(evaluate.Metric):
    """ROUGE-L F-measure against one reference per prediction."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        scores = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"rougeL": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
