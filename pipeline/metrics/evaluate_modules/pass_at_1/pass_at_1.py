"""pass@1 of generated code (infersweep's own ``evaluate`` module).

Each prediction is a generation (its code is the first fenced block, else the whole text),
each reference the unit tests (Python ``assert`` statements) it must pass. The program
``code + tests`` runs in infersweep's sandbox (``pipeline.metrics.code_exec``): a separate
``python -I`` process with a timeout, address-space and CPU limits, a temporary working
folder and a minimal environment; never in this process. ``pass_at_1`` is the share that
exit cleanly (0..1), ``scores`` one 0/1 per prediction, ``statuses`` how each ended.
"""

from __future__ import annotations

import datasets
import evaluate

from pipeline.metrics import code_exec


class PassAt1(evaluate.Metric):
    """pass@1 with one sample per task, executed in the sandbox."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str], references: list[str],
                 timeout_s: float = code_exec.DEFAULT_TIMEOUT_S,
                 memory_mb: int = code_exec.DEFAULT_MEMORY_MB) -> dict:
        results = code_exec.pass_at_1(predictions, references, timeout_s=timeout_s,
                                      memory_mb=memory_mb)
        scores = [float(r.passed) for r in results]
        return {"pass_at_1": sum(scores) / len(scores) if scores else 0.0, "scores": scores,
                "statuses": [r.status for r in results]}
