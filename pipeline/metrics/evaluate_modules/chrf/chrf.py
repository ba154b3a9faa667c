"""chrF through sacrebleu (infersweep's own ``evaluate`` module; no hub download).

``chrf`` is sacrebleu's corpus chrF (0..100; character 6-grams, beta 2, no word n-grams),
``scores`` each prediction's sentence chrF.
"""

from __future__ import annotations

import datasets
import evaluate
import sacrebleu


class Chrf(evaluate.Metric):
    """sacrebleu corpus chrF plus sentence chrF per prediction."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        corpus = sacrebleu.corpus_chrf(predictions, [references]).score
        scores = [sacrebleu.sentence_chrf(p, [r]).score
                  for p, r in zip(predictions, references, strict=True)]
        return {"chrf": corpus, "scores": scores}
