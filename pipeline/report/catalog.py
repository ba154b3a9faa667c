"""The one metric catalog: every metric the terminal tables, the sweep parent's summary and
the report show, with its header, unit, number format and which direction is better.

A metric shown anywhere is formatted by :func:`format_metric`, so a number reads the same
in the terminal, in report.md and in report.html.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 2**20


@dataclass(frozen=True)
class MetricSpec:
    """A metric: MLflow key, column header, display unit, format spec (``mib``: bytes shown
    in MiB) and whether a higher value is better."""

    key: str
    header: str
    unit: str
    fmt: str
    higher_is_better: bool


METRICS = (
    MetricSpec("output_tokens_per_s", "out tok/s", "tok/s", ".1f", True),
    MetricSpec("ttft_ms_mean", "TTFT mean ms", "ms", ".0f", False),
    MetricSpec("tpot_ms_mean", "TPOT mean ms", "ms", ".1f", False),
    MetricSpec("e2el_ms_mean", "E2EL mean ms", "ms", ".0f", False),
    MetricSpec("e2el_ms_p90", "E2EL p90 ms", "ms", ".0f", False),
    MetricSpec("peak_rss_bytes", "peak RSS MiB", "MiB", "mib", False),
    MetricSpec("peak_rss_above_load_bytes", "peak RSS above load MiB", "MiB", "mib", False),
    MetricSpec("cuda_max_allocated_bytes", "CUDA max alloc MiB", "MiB", "mib", False),
    # how close to the machine's limit, and what start-up cost (hf compile, vLLM engine)
    MetricSpec("roofline_share", "roofline share", "", ".2f", True),
    MetricSpec("compile_s", "compile s", "s", ".1f", False),
    MetricSpec("engine_start_s", "engine start s", "s", ".1f", False),
    MetricSpec("perplexity", "PPL", "", ".3f", False),
    MetricSpec("self_bleu", "self-BLEU", "", ".3f", False),
    MetricSpec("distinct_2", "distinct-2", "", ".3f", True),
    MetricSpec("rep_2", "rep-2", "", ".3f", False),
    # against each request's reference (scoring.reference_metrics, docs/quality.md)
    MetricSpec("ref_exact_match", "exact match", "", ".3f", True),
    MetricSpec("ref_f1", "token F1", "", ".3f", True),
    MetricSpec("ref_bleu", "BLEU", "", ".1f", True),
    MetricSpec("ref_chrf", "chrF", "", ".1f", True),
    MetricSpec("ref_rougeL", "ROUGE-L", "", ".3f", True),
    MetricSpec("ref_pass_at_1", "pass@1", "", ".3f", True),
    # speculative decoding (docs/speculative-quantization.md)
    MetricSpec("spec_tokens_per_target_step", "tokens/target step", "", ".2f", True),
    MetricSpec("spec_acceptance_rate", "spec acceptance", "", ".2f", True),
    MetricSpec("spec_mean_accepted_tokens", "accepted/step", "", ".2f", True),
    # the gate: an optimized job against its baseline (pipeline/metrics/gate.py)
    MetricSpec("gate.exact_match_rate", "gate exact match", "", ".2f", True),
    MetricSpec("gate.mean_kl", "gate mean KL", "nats", ".2e", False),
    MetricSpec("gate.ppl_delta", "gate PPL delta", "", "+.3f", False),
    MetricSpec("gate.speedup", "gate tok/s x", "x", ".2f", True),
)
SPECS = {m.key: m for m in METRICS}

# The headline metrics: the terminal table's columns and the per-job figures put on the
# sweep's parent run (a selection from the catalog, not a second one).
HEADLINE = ("output_tokens_per_s", "ttft_ms_mean", "tpot_ms_mean", "e2el_ms_p90",
            "peak_rss_bytes", "perplexity", "self_bleu", "distinct_2")


def missing(v: Any) -> bool:
    """True for no value: ``None`` or NaN (pandas' empty cell)."""
    return v is None or (isinstance(v, float) and v != v)


def mib(n_bytes: float) -> str:
    """Bytes as whole MiB (the one place bytes become MiB for display)."""
    return f"{float(n_bytes) / MIB:.0f}"


def format_number(v: Any, fmt: str) -> str:
    """``v`` with a format spec (``mib``: bytes in MiB); ``-`` when missing."""
    if missing(v):
        return "-"
    return mib(v) if fmt == "mib" else format(float(v), fmt)


def format_metric(key: str, v: Any) -> str:
    """A metric value as it is shown everywhere (``-`` when missing; a metric outside the
    catalog as ``str``)."""
    spec = SPECS.get(key)
    if spec is None:
        return "-" if missing(v) else str(v)
    return format_number(v, spec.fmt)
