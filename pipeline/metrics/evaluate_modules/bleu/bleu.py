"""BLEU through sacrebleu (infersweep's own ``evaluate`` module; no hub download).

``bleu`` is sacrebleu's corpus BLEU (0..100, default 13a tokenizer, one reference per
prediction); ``scores`` holds each prediction's sentence BLEU (``effective_order``), the
per-request values a bootstrap resamples.
"""

from __future__ import annotations

import datasets
import evaluate
import sacrebleu


class Bleu(evaluate.Metric):
    """sacrebleu corpus BLEU plus sentence BLEU per prediction."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        corpus = sacrebleu.corpus_bleu(predictions, [references]).score
        scores = [sacrebleu.sentence_bleu(p, [r]).score
                  for p, r in zip(predictions, references, strict=True)]
        return {"bleu": corpus, "scores": scores}
