"""The report's "Fast but wrong?" table: each optimized job next to its baseline, with the
speed it gained and the gate's verdict (``pipeline/analysis/gate.py``; thresholds and rules in
``pipeline/analysis/gate_rules.py``), read from the jobs' MLflow runs (``gate.*`` metrics and the
``gate_verdict`` / ``gate_reason`` / ``gate_baseline_job`` tags)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.analysis.gate_rules import THRESHOLDS
from pipeline.metrics.catalog import format_metric, format_number, missing
from pipeline.report.collect import SweepData

NOTE = (
    "Each optimized job (speculative decoding, quantization, compiled fast path, attention, "
    "dtype) against the job of the same sweep without the optimization. Exact match: share "
    "of prompts whose greedy tokens are identical; first divergence: the earliest token "
    "where any prompt differs; mean KL: KL(baseline ‖ optimized) of the next-token "
    "distributions teacher-forced on the baseline's tokens (nats/token; `-` where the "
    "optimization does not change the model's computation, or the backend cannot score "
    "sequences); PPL Δ: relative perplexity change. Verdicts: equivalent (all identical, or "
    f"KL < {THRESHOLDS['equivalent_max_kl']:g}), numerics (KL < "
    f"{THRESHOLDS['numerics_max_kl']:g} and |PPL Δ| < {THRESHOLDS['numerics_max_ppl_delta']:.0%}"
    "), degraded otherwise.")


#: said once under the table when a GGUF-running job is gated against a job running the
#: packaged model's de-quantized folder: both hold the same (Q4_1) weights
SAME_WEIGHTS = ("same weights: this measures llama.cpp's numerics, not quantization loss "
                "(use +experiment=gguf_quant on an HF folder)")


def _origin(job: Any) -> Any:
    return ((job.results or {}).get("applied") or {}).get("gguf_origin") if job else None


def same_weights(data: SweepData) -> bool:
    """Whether a gated job runs the packaged GGUF against a baseline that runs its
    de-quantized folder (the applied ``gguf_origin`` the GGUF backend records)."""
    by_num = {j.job: j for j in data.jobs}
    for j in data.jobs:
        if not j.tags.get("gate_verdict") or _origin(j) != "packaged":
            continue
        base = by_num.get(int(j.tags["gate_baseline_job"])) \
            if str(j.tags.get("gate_baseline_job", "")).isdigit() else None
        if base is not None and _origin(base) != "packaged":
            return True
    return False


def table(data: SweepData) -> pd.DataFrame:
    """One row per job the gate judged; empty when none was."""
    rows = []
    for j in sorted(data.jobs, key=lambda j: j.job):
        v = j.tags.get("gate_verdict")
        if not v:
            continue
        m = j.metrics
        div = m.get("gate.first_divergence_min")
        rows.append({
            "job": j.job,
            "optimization": j.tags.get("gate_optimizations") or j.name,
            "baseline job": j.tags.get("gate_baseline_job", "-"),
            "tok/s ×": format_number(m.get("gate.speedup"), ".2f"),
            "out tok/s": format_metric("output_tokens_per_s", m.get("output_tokens_per_s")),
            "exact match": format_number(m.get("gate.exact_match_rate"), ".0%"),
            "first divergence": "-" if missing(div) else f"{div:.0f}",
            "mean KL": format_number(m.get("gate.mean_kl"), ".2e"),
            "PPL Δ": format_number(m.get("gate.ppl_delta"), "+.2%"),
            "verdict": v,
            "why": j.tags.get("gate_reason", ""),
        })
    return pd.DataFrame(rows)


def sections(data: SweepData) -> list[tuple[str, list[tuple[str, Any]]]]:
    """The report section, or none when no job of the sweep was gated."""
    df = table(data)
    if df.empty:
        return []
    blocks: list[tuple[str, Any]] = [("text", NOTE), ("table", df)]
    if same_weights(data):
        blocks.append(("text", SAME_WEIGHTS))
    return [("Fast but wrong?", blocks)]
