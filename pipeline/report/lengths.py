"""Tables for sweeps over a length and for prefix-sharing workloads.

When a sweep varies ``workload.input_tokens`` or ``workload.max_new_tokens``, the report
adds "Scaling with length": per job its prefill time, decode speed and peak memory above the
loaded model against that length (the ``scaling`` table, which the plots draw), and at each
length the ratio between configurations (the other swept params: attention kernels, the KV
cache) next to the course's claim (the ``length_ratios`` table). When requests carry
``extra.prefix_group``, ``prefix_ttft`` compares the TTFT of each group's first request
with the later ones. All three are pure functions of the MLflow data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.metrics.catalog import MIB, missing
from pipeline.report.collect import JobRun
from pipeline.report.expectations import BY_NAME, Expectation, for_param
from pipeline.report.table_model import (
    Column,
    Sweep,
    Table,
    axis_headers,
    number,
    plain,
)

# The lengths a sweep can vary, in the order one is picked when both vary.
LENGTH_PARAMS = ("workload.input_tokens", "workload.max_new_tokens")
LENGTH_WORDS = {"workload.input_tokens": "input tokens",
                "workload.max_new_tokens": "new tokens (output length)"}

Config = tuple[tuple[str, str], ...]  # (swept param, value) for the params other than length


@dataclass(frozen=True)
class ScalingMetric:
    """A figure plotted against length: its column in ``scaling``, the image it gets, its
    plot title and axis label, its display format and which direction is better."""

    key: str
    image: str
    title: str
    ylabel: str
    fmt: str
    higher_is_better: bool


SCALING = (
    ScalingMetric("prefill_ms", "scaling_prefill", "Prefill time",
                  "prefill time, ms (lower is better)", ".1f", False),
    ScalingMetric("decode_tokens_per_s", "scaling_decode", "Decode speed",
                  "decode tokens/s (higher is better)", ".1f", True),
    ScalingMetric("peak_above_load_mib", "scaling_memory", "Peak memory above the loaded model",
                  "peak RSS above load, MiB (lower is better)", ".0f", False),
)
CAPTIONS = {
    "scaling_prefill": "Prefill time (mean delay to a batch's first token; mean TTFT where "
                       "the job has no prefill figure) against length, one line per "
                       "configuration.",
    "scaling_decode": "Decode tokens/s (tokens after the first / time after the first "
                      "token) against length, one line per configuration.",
    "scaling_memory": "Peak RSS during the measured phase above the RSS right after load "
                      "(MiB) against length, one line per configuration.",
}


def length_axis(axes: list[str]) -> str | None:
    """The length param the sweep varies (``workload.input_tokens`` first), else None."""
    return next((p for p in LENGTH_PARAMS if p in axes), None)


def _int(v: Any) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _mean(v: list[float]) -> float | None:
    return float(np.mean(v)) if v else None


def prefill_ms(job: JobRun) -> tuple[float | None, str]:
    """The job's prefill time in ms and the metric it came from: ``prefill_s_mean``, else
    ``ttft_ms_mean`` (a backend that cannot split prefill from decode), else none."""
    m = job.metrics
    if not missing(m.get("prefill_s_mean")):
        return float(m["prefill_s_mean"]) * 1000, "prefill_s_mean"
    if not missing(m.get("ttft_ms_mean")):
        return float(m["ttft_ms_mean"]), "ttft_ms_mean"
    return None, "-"


def config_label(cfg: Config, heads: dict[str, str]) -> str:
    """A configuration as ``attn_implementation=sdpa`` (``all jobs`` when only length varies)."""
    return " ".join(f"{heads[a]}={v}" for a, v in cfg) or "all jobs"


@dataclass(frozen=True)
class Point:
    """One finished job of a length sweep: its length, its configuration and its figures."""

    job: int
    length: int
    config: Config
    values: dict[str, float | None]
    prefill_source: str


def points(s: Sweep) -> tuple[str | None, list[str], list[Point]]:
    """The length param, the other swept params and one point per finished job with a
    length (the first job wins where two share a length and configuration)."""
    length = length_axis(s.axes)
    if length is None:
        return None, [], []
    others = [a for a in s.axes if a != length]
    out: list[Point] = []
    seen: set[tuple[int, Config]] = set()
    for j in s.jobs:
        n = _int(j.params.get(length))
        if j.status != "FINISHED" or n is None:
            continue
        cfg = tuple((a, str(j.params.get(a, ""))) for a in others)
        if (n, cfg) in seen:
            continue
        seen.add((n, cfg))
        pre, src = prefill_ms(j)
        mem = j.metrics.get("peak_rss_above_load_bytes")
        dec = j.metrics.get("decode_tokens_per_s")
        out.append(Point(j.job, n, cfg, {
            "prefill_ms": pre,
            "decode_tokens_per_s": None if missing(dec) else float(dec),
            "peak_above_load_mib": None if missing(mem) else float(mem) / MIB,
        }, src))
    return length, others, out


def scaling_table(s: Sweep) -> Table:
    """One row per finished job of a length sweep: length, configuration (its colour
    ``index``) and the three scaling figures; empty when no length varies."""
    length, others, pts = points(s)
    if length is None:
        return Table(pd.DataFrame(), [])
    heads = axis_headers(others)
    configs = list(dict.fromkeys(p.config for p in pts))
    order = sorted(pts, key=lambda p: (configs.index(p.config), p.length))
    rows = [{"job": p.job, "length_param": length, "length": p.length,
             "config": config_label(p.config, heads), "index": configs.index(p.config),
             "prefill_source": p.prefill_source, **p.values} for p in order]
    cols = [plain("job"), plain("length", LENGTH_WORDS[length]), plain("config", "configuration"),
            *(number(m.key, m.ylabel.split(" (")[0], m.fmt) for m in SCALING),
            plain("prefill_source", "prefill from")]
    return Table(pd.DataFrame(rows), cols)


def _reference(cfg: Config, configs: list[Config], base: Config
               ) -> tuple[Config | None, Expectation | None]:
    """What ``cfg`` is compared against: for a param an expectation switches on (sdpa,
    ``use_cache=true``), the configuration equal to ``cfg`` but for that param at its
    reference value (eager, ``use_cache=false``); a reference configuration itself is not
    compared; otherwise the baseline job's configuration."""
    vals = dict(cfg)
    for a, v in cfg:
        e = for_param(a)
        if e is None or not e.switches_on(v):
            continue
        for r in configs:
            rv = dict(r)
            if rv[a].lower() == e.reference and all(rv[k] == vals[k] for k in vals if k != a):
                return r, e
    for a, v in cfg:
        e = for_param(a)
        if e is not None and v.lower() == e.reference:
            return None, None
    return (base, None) if cfg != base and base in configs else (None, None)


def ratio_table(s: Sweep) -> Table:
    """At each length, each configuration against its reference (:func:`_reference`):
    prefill × = reference / this prefill time and decode × = this / reference decode tok/s
    (above 1: this is faster), memory = this / reference peak above load and its saving %,
    with the course's claim where one holds at that length."""
    length, others, pts = points(s)
    if length is None:
        return Table(pd.DataFrame(), [])
    heads = axis_headers(others)
    configs = list(dict.fromkeys(p.config for p in pts))
    by = {(p.length, p.config): p for p in pts}
    base = tuple((a, str(s.base.params.get(a, ""))) for a in others)
    rows = []
    for n in sorted({p.length for p in pts}):
        for c in configs:
            ref, exp = _reference(c, configs, base)
            if (n, c) not in by or ref is None or (n, ref) not in by:
                continue
            p, r = by[(n, c)].values, by[(n, ref)].values
            mem = _ratio(p["peak_above_load_mib"], r["peak_above_load_mib"])
            rows.append({
                "length": n, "job": by[(n, c)].job, "ref_job": by[(n, ref)].job,
                "config": config_label(c, heads), "reference": config_label(ref, heads),
                "prefill_x": _ratio(r["prefill_ms"], p["prefill_ms"]),
                "decode_x": _ratio(p["decode_tokens_per_s"], r["decode_tokens_per_s"]),
                "memory_ratio": mem,
                "memory_saving_pct": None if mem is None else (1 - mem) * 100,
                "expected": exp.text if exp and exp.holds_at(length, n) else None,
            })
    cols = [plain("length", LENGTH_WORDS[length]),
            Column("configuration", lambda r: f"{r['config']} (job {r['job']})"),
            Column("against", lambda r: f"{r['reference']} (job {r['ref_job']})"),
            number("prefill_x", "prefill × (ref / this time)", ".2f"),
            number("decode_x", "decode × (this / ref tok/s)", ".2f"),
            number("memory_ratio", "memory this / ref", ".2f"),
            number("memory_saving_pct", "memory saving %", "+.1f"),
            plain("expected", "course's claim")]
    return Table(pd.DataFrame(rows), cols)


def _ttft_ms(r: dict[str, Any]) -> float | None:
    if r.get("error") or r.get("t_start") is None or r.get("t_first_token") is None:
        return None
    return (float(r["t_first_token"]) - float(r["t_start"])) * 1000


def prefix_table(s: Sweep) -> Table:
    """Per job whose requests carry ``extra.prefix_group``: mean TTFT of each group's first
    request (``group_position == 0``) against the later ones (failed requests left out)."""
    prefix = BY_NAME["prefix caching"]
    rows = []
    for j in s.jobs:
        recs = [r for r in (j.results or {}).get("requests") or []
                if (r.get("extra") or {}).get("prefix_group") is not None]
        if not recs:
            continue
        first: list[float] = []
        later: list[float] = []
        for r in recs:
            t = _ttft_ms(r)
            if t is not None:
                (first if r["extra"].get("group_position") == 0 else later).append(t)
        on = str(j.params.get(prefix.param, "")).lower() in prefix.candidates
        rows.append({
            "job": j.job, "overrides": s.over[j.run_id],
            "groups": len({r["extra"]["prefix_group"] for r in recs}),
            "first_n": len(first), "ttft_first_ms": _mean(first),
            "later_n": len(later), "ttft_later_ms": _mean(later),
            "later_over_first": _ratio(_mean(later), _mean(first)),
            "expected": prefix.expected if on else None,
        })
    cols = [plain("job"), plain("overrides"), plain("groups"),
            plain("first_n", "first requests"), number("ttft_first_ms", "TTFT first ms", ".1f"),
            plain("later_n", "later requests"), number("ttft_later_ms", "TTFT later ms", ".1f"),
            number("later_over_first", "later / first", ".2f"),
            plain("expected", "course's claim")]
    return Table(pd.DataFrame(rows), cols)


def length_tables(s: Sweep) -> dict[str, Table]:
    """``scaling``, ``length_ratios`` and ``prefix_ttft`` (each empty when not applicable)."""
    return {"scaling": scaling_table(s), "length_ratios": ratio_table(s),
            "prefix_ttft": prefix_table(s)}


def scaling_images(frame: pd.DataFrame) -> list[ScalingMetric]:
    """The scaling figures with at least one value in the ``scaling`` frame."""
    if frame.empty:
        return []
    return [m for m in SCALING if m.key in frame.columns and frame[m.key].notna().any()]
