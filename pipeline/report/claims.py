"""The course's claimed ratios beside the measured ones, for the "Against the baseline"
section (``expected`` table).

For each optimization in :mod:`pipeline.report.expectations` whose param varies across the
sweep (``backend.use_cache`` for ``+experiment=kv_cache``, ``backend.attn_implementation``
for ``attention``, ``workload.batch_size`` for ``batching``, the backend ladder of
``phase3_full``), each finished job with the optimization on is paired with the job
without it that agrees on every other param, and their throughput ratio is shown next to
the course's claim, with a verdict that respects the noise rule (:mod:`pipeline.report.noise`).
No pair, no row: a sweep these expectations do not speak about gets an empty table.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.report import noise
from pipeline.report.collect import JobRun
from pipeline.report.expectations import EXPECTATIONS, Expectation
from pipeline.report.table_model import BOOKKEEPING_PARAMS, Column, Sweep, Table, number, plain

METRIC = "output_tokens_per_s"


def _comparable(e: Expectation, j: JobRun, r: JobRun) -> bool:
    """Whether ``r`` differs from ``j`` only in what the optimization changes."""
    for k in set(j.params) & set(r.params):
        if (k == e.param or k.endswith(".name") or k.startswith(BOOKKEEPING_PARAMS)
                or (e.ignore_prefix and k.startswith(e.ignore_prefix))
                or any(k == p for p, _ in e.reference_params)):
            continue
        if j.params[k] != r.params[k]:
            return False
    return True


def _int(v: Any) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def verdict(e: Expectation, this: noise.Figure | None, ref: noise.Figure | None,
            ratio: float | None) -> str:
    """``within noise`` when the two figures do not differ by more than the noise, else
    where the measured ratio falls against the course's claimed range (below / within / above)."""
    if this is None or ref is None or ratio is None:
        return "-"
    if not noise.distinct(METRIC, this, ref):
        return "within noise (no measurable change)"
    if e.low is None or e.high is None:
        return "faster" if ratio > 1 else "slower"
    if ratio < e.low:
        return "below the expected range"
    return "above the expected range" if ratio > e.high else "within the expected range"


def expected_table(s: Sweep) -> Table:
    """One row per (optimization, job with it on, its reference job): measured throughput
    × (this / reference output tok/s), the course's claim and a verdict."""
    done = [j for j in s.jobs if j.status == "FINISHED"]
    rows = []
    for e in EXPECTATIONS:
        if len({str(j.params.get(e.param, "")).lower() for j in done}) < 2:
            continue  # the sweep does not vary what the expectation is about
        refs = [r for r in done if e.is_reference(r.params)]
        for j in done:
            if e.param not in j.params or not e.switches_on(j.params[e.param]):
                continue
            ref = next((r for r in refs if r is not j and _comparable(e, j, r)), None)
            if ref is None:
                continue
            this, base = noise.figure(j.metrics, METRIC), noise.figure(ref.metrics, METRIC)
            ratio = (this.value / base.value if this and base and base.value else None)
            holds = e.holds_at(e.length_param, _int(j.params.get(e.length_param or "")))
            rows.append({
                "optimization": e.name, "job": j.job, "ref_job": ref.job,
                "change": f"{e.param}: {ref.params.get(e.param)} → {j.params[e.param]}",
                "throughput_x": ratio,
                "expected": e.expected if holds else f"(the course's claim, {e.expected}, "
                                                     "does not speak about this length)",
                "verdict": verdict(e, this, base, ratio) if holds else "-",
            })
    cols = [plain("optimization"), plain("change"),
            Column("job (against)", lambda r: f"{r['job']} (against {r['ref_job']})"),
            number("throughput_x", "measured tok/s × (this / ref)", ".2f"),
            plain("expected", "course's claim"), plain("verdict")]
    return Table(pd.DataFrame(rows), cols)
