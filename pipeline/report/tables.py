"""The report's tables, a pure function of the MLflow data.

Each table is built once, by one function, as a :class:`Table`: the raw numbers (metric
columns carry their MLflow keys, for tests and plots) together with the columns the report
shows (header and how a row's cell is written).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd

from pipeline.metrics.catalog import SPECS, format_metric, missing
from pipeline.report import noise
from pipeline.report.claims import expected_table
from pipeline.report.collect import JobRun, SweepData
from pipeline.report.lengths import length_tables

# the table model, also read from here by render, plots and interactive
from pipeline.report.table_model import (  # noqa: F401
    BOOKKEEPING_PARAMS,
    Column,
    Row,
    Sweep,
    Table,
    axis_headers,
    cell,
    display_tables,
    flag,
    metric,
    number,
    plain,
    select_job,
    short_label,
    swept_params,
    varying_overrides,
)

# Speed-up vs the baseline: (metric, column, header); throughput is job/base, latency base/job.
SPEEDUPS = (
    ("output_tokens_per_s", "throughput_x", "throughput ×"),
    ("ttft_ms_mean", "ttft_speedup_x", "TTFT speed-up ×"),
    ("tpot_ms_mean", "tpot_speedup_x", "TPOT speed-up ×"),
    ("e2el_ms_mean", "e2el_speedup_x", "E2EL speed-up ×"),
)
# Memory saving vs the baseline, in percent of the baseline's figure.
SAVINGS = (
    ("peak_rss_bytes", "peak_rss_saving_pct", "peak RSS saving %"),
    ("cuda_max_allocated_bytes", "cuda_alloc_saving_pct", "CUDA max alloc saving %"),
)
TRADEOFF_METRICS = ("perplexity", "self_bleu", "distinct_2", "rep_2", "output_tokens_per_s")
LATENCY_AXES = ("e2el_ms_mean", "ttft_ms_mean")  # the Pareto fronts' x axes
# Words for the trade-off readings: metric -> (best, worst).
READING_WORDS = {
    "output_tokens_per_s": ("fastest", "slowest"),
    "perplexity": ("lowest perplexity", "highest perplexity"),
    "self_bleu": ("most diverse across prompts (lowest self-BLEU)",
                  "least diverse across prompts (highest self-BLEU)"),
    "distinct_2": ("most distinct bigrams", "fewest distinct bigrams"),
    "rep_2": ("least repetition", "most repetition"),
}


# --------------------------------------------------------------------------- Table


















# --------------------------------------------------------------------------- helpers










def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (latency, throughput) points: True where no other point has latency <= and
    throughput >= with at least one strict (lower latency and higher throughput win)."""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y)
            for k, (x2, y2) in enumerate(points) if k != i
        )
        out.append(not dominated)
    return out




def request_latencies(results: dict[str, Any] | None) -> tuple[list[float], list[float]]:
    """Per-request E2EL and TTFT in ms from a results.json's ``requests`` (errors left out)."""
    e2el: list[float] = []
    ttft: list[float] = []
    for r in (results or {}).get("requests") or []:
        if r.get("error") or r.get("t_start") is None or r.get("t_end") is None:
            continue
        e2el.append((float(r["t_end"]) - float(r["t_start"])) * 1000)
        if r.get("t_first_token") is not None:
            ttft.append((float(r["t_first_token"]) - float(r["t_start"])) * 1000)
    return e2el, ttft


def throughput(job: JobRun) -> float | None:
    """Output tokens/s: the pooled figure (total tokens / total measured wall time)."""
    return job.metrics.get("output_tokens_per_s")


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _quantile(v: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(v, dtype=float), q)) if v else None


def readings(jobs: list[JobRun], baseline: JobRun) -> dict[str, str]:
    """Per run id, a neutral one-line reading derived from the numbers: where the job is
    the best or worst of the sweep on each trade-off metric (only where the gap exceeds the
    noise, :mod:`pipeline.report.noise`), and its speed vs the baseline."""
    parts: dict[str, list[str]] = {j.run_id: [] for j in jobs}
    for key, (best_word, worst_word) in READING_WORDS.items():
        vals = {j.run_id: noise.figure(j.metrics, key) for j in jobs if j.status == "FINISHED"}
        best, worst = noise.extremes(key, vals, SPECS[key].higher_is_better)
        for rid in best:
            parts[rid].append(("tied " if len(best) > 1 else "") + best_word)
        for rid in worst:
            parts[rid].append(("tied " if len(worst) > 1 else "") + worst_word)
    out = {}
    base_tps = throughput(baseline)
    for j in jobs:
        if j.status != "FINISHED":
            out[j.run_id] = f"job {j.status.lower()}: no numbers to compare"
            continue
        words = parts[j.run_id] or ["neither best nor worst on any of these metrics"]
        r = _ratio(throughput(j), base_tps)
        speed = "baseline" if j.run_id == baseline.run_id else (
            f"{r:.2f}× the baseline's tok/s" if r is not None else "")
        out[j.run_id] = "; ".join([*words, speed] if speed else words)
    return out


# --------------------------------------------------------------------------- the tables




def _mean_ci(key: str) -> Column:
    """A metric with repeats: the mean over repeats ± its 95% CI (the CI is over
    per-repeat figures, so it goes with their mean), else the pooled figure."""
    def text(r: Row) -> str:
        ci = r.get(f"{key}_ci95")
        if missing(ci):
            return format_metric(key, r.get(key))
        return f"{format_metric(key, r.get(f'{key}_repeat_mean'))} ± {format_metric(key, ci)}"
    return Column(SPECS[key].header, text)


def jobs_table(s: Sweep) -> Table:
    """One row per job: swept axes, then the catalog metrics (run names and ids are in the
    ``runs`` table, to keep this one narrow)."""
    with_ci = [k for k in s.present if any(f"{k}_ci95" in j.metrics for j in s.jobs)]
    rows = []
    for j in s.jobs:
        row: dict[str, Any] = {"job": j.job, "run": j.name, "run_id": j.run_id,
                               "status": j.status, "overrides": s.over[j.run_id]}
        row.update({a: j.params.get(a) for a in s.axes})
        for k in s.present:
            row[k] = j.metrics.get(k)
            if k in with_ci:
                row[f"{k}_repeat_mean"] = j.metrics.get(f"{k}_repeat_mean")
                row[f"{k}_ci95"] = j.metrics.get(f"{k}_ci95")
        rows.append(row)
    heads = axis_headers(s.axes)
    cols = [plain("job"), plain("status"), plain("overrides"),
            *(plain(a, heads[a]) for a in s.axes),
            *(_mean_ci(k) if k in with_ci else metric(k) for k in s.present)]
    return Table(pd.DataFrame(rows), cols)


def vs_baseline_table(s: Sweep) -> Table:
    """Ratios against the baseline job: throughput ×, latency speed-ups ×, memory saving %."""
    rows = []
    for j in s.jobs:
        row: dict[str, Any] = {"job": j.job, "overrides": s.over[j.run_id],
                               "is_baseline": j.run_id == s.base.run_id}
        for key, col, _ in SPEEDUPS:
            if key in s.present:
                a, b = j.metrics.get(key), s.base.metrics.get(key)
                row[col] = _ratio(a, b) if key == "output_tokens_per_s" else _ratio(b, a)
        for key, col, _ in SAVINGS:
            if key in s.present:
                r = _ratio(j.metrics.get(key), s.base.metrics.get(key))
                row[col] = None if r is None else (1 - r) * 100
        rows.append(row)
    cols = [Column("job", lambda r: f"{r['job']}" + (" (baseline)" if r["is_baseline"] else "")),
            plain("overrides"),
            *(number(col, head, ".2f") for key, col, head in SPEEDUPS if key in s.present),
            *(number(col, head, "+.1f") for key, col, head in SAVINGS if key in s.present)]
    return Table(pd.DataFrame(rows), cols)


def _front(key: str) -> Column:
    return Column(f"front ({SPECS[key].header.split()[0]})",
                  lambda r: "yes" if flag(r.get(f"front_{key}")) else "no")


def pareto_table(s: Sweep) -> Table:
    """Throughput against each mean latency, with whether the job is on the Pareto front."""
    lat_keys = [k for k in LATENCY_AXES if k in s.present]
    rows = [{"job": j.job, "overrides": s.over[j.run_id], "output_tokens_per_s": throughput(j),
             **{k: j.metrics.get(k) for k in lat_keys}}
            for j in s.jobs if throughput(j) is not None]
    for k in lat_keys:
        front = iter(pareto_front([(r[k], r["output_tokens_per_s"]) for r in rows
                                   if r[k] is not None]))
        for r in rows:
            r[f"front_{k}"] = next(front) if r[k] is not None else None
    cols = [plain("job"), plain("overrides"), metric("output_tokens_per_s")]
    for k in lat_keys:
        cols += [metric(k), _front(k)]
    return Table(pd.DataFrame(rows), cols)


def latency_table(s: Sweep) -> Table:
    """Per-request latency spread, from each job's results.json in MLflow."""
    rows = []
    for j in s.jobs:
        e2el, ttft = request_latencies(j.results)
        rows.append({"job": j.job, "overrides": s.over[j.run_id], "requests": len(e2el),
                     "e2el_ms_min": min(e2el) if e2el else None,
                     "e2el_ms_median": _quantile(e2el, 50), "e2el_ms_p90": _quantile(e2el, 90),
                     "e2el_ms_max": max(e2el) if e2el else None,
                     "ttft_ms_median": _quantile(ttft, 50)})
    cols = [plain("job"), plain("overrides"), plain("requests"),
            *(number(f"e2el_ms_{q}", f"E2EL {q} ms", ".0f")
              for q in ("min", "median", "p90", "max")),
            number("ttft_ms_median", "TTFT median ms", ".0f")]
    return Table(pd.DataFrame(rows), cols)


def tradeoffs_table(s: Sweep) -> Table:
    """Per job: decoding settings, quality/diversity/speed metrics and a reading."""
    dec_axes = [a for a in s.axes if a.startswith("decoding.") and a != "decoding.name"]
    reads = readings(s.jobs, s.base)
    rows = []
    for j in s.jobs:
        settings = " ".join(f"{a.removeprefix('decoding.')}={j.params.get(a)}" for a in dec_axes)
        others = [t for t in s.over[j.run_id].split() if not t.startswith("decoding")]
        row = {"job": j.job, "decoding": j.tags.get("decoding", j.params.get("decoding.name")),
               "settings": settings, "other axes": " ".join(others)}
        row.update({k: j.metrics.get(k) for k in TRADEOFF_METRICS})
        row["reading"] = reads[j.run_id]
        rows.append(row)
    cols = [plain("job"), plain("decoding"),
            Column("settings", lambda r: r["settings"] or "-")]
    if any(r["other axes"] for r in rows):
        cols.append(Column("other axes", lambda r: r["other axes"] or "-"))
    cols += [*(metric(k) for k in TRADEOFF_METRICS), plain("reading")]
    return Table(pd.DataFrame(rows), cols)


def _applied(s: Sweep) -> list[tuple[JobRun, dict[str, Any]]]:
    """Each job with its results.json ``applied`` settings (jobs without any left out)."""
    pairs = [(j, (j.results or {}).get("applied") or {}) for j in s.jobs]
    return [(j, a) for j, a in pairs if a]


def applied_table(s: Sweep) -> Table:
    """The settings each job read back from its loaded model (results.json ``applied``),
    only those that differ across jobs (a key some job lacks counts as differing); the
    common ones are in :func:`applied_common_table`."""
    applied = _applied(s)
    keys = sorted({k for _, a in applied for k in a})
    varying = [k for k in keys if len(applied) > 1 and (
        any(k not in a for _, a in applied) or len({str(a[k]) for _, a in applied}) > 1)]
    rows = [{"job": j.job, **{k: a.get(k) for k in varying}} for j, a in applied]
    return Table(pd.DataFrame(rows), [plain("job"), *(plain(k) for k in varying)])


def applied_common_table(s: Sweep) -> Table:
    """The applied settings every job shares, one (setting, value) row each."""
    applied = _applied(s)
    shown = set(applied_table(s).frame.columns)
    keys = sorted({k for _, a in applied for k in a} - shown)
    rows = [{"setting": k, "value": applied[0][1][k]} for k in keys]
    return Table(pd.DataFrame(rows, columns=["setting", "value"]),
                 [plain("setting"), plain("value")])


def _joined(values: list[Any]) -> str:
    """One value, or the distinct values in first-seen order joined by ' / '."""
    seen: list[str] = []
    for v in values:
        s = "" if v is None else str(v)
        if s and s not in seen:
            seen.append(s)
    return " / ".join(seen) if seen else "-"


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


def provenance_rows(data: SweepData) -> list[tuple[str, str]]:
    """Where the numbers came from: sweep, dates, commit, command, hardware, versions."""
    t = data.parent_tags
    jobs = data.jobs
    provs = [(j.results or {}).get("provenance") or {} for j in jobs]
    dates = sorted(p["date"] for p in provs if p.get("date"))
    rows = [
        ("experiment", f"{data.experiment_name} (id {data.experiment_id})"),
        ("job run" if data.plain_job else "sweep parent run",
         f"{data.parent_id} ({data.parent_name}, {data.parent_status})"),
        ("sweep folder", t.get("sweep_dir", "-")),
        ("sweep started (UTC)", _iso(data.parent_start_time) if data.parent_start_time else "-"),
        ("jobs ran (UTC)", f"{dates[0]} … {dates[-1]}" if len(dates) > 1 else _joined(dates)),
        ("jobs", f"{len(jobs)} ({sum(j.status == 'FINISHED' for j in jobs)} finished)"),
        ("git commit", _joined([t.get("git_commit"), *(j.tags.get("git_commit") for j in jobs)])),
        ("command", t.get("command", "-")),
        ("hydra overrides", t.get("hydra_overrides", "-")),
    ]
    for axis in ("backend", "model", "workload"):
        rows.append((axis, _joined([j.tags.get(axis) for j in jobs])))
    hw_keys: list[str] = []
    for p in provs:
        hw_keys += [k for k in (p.get("hardware") or {}) if k not in hw_keys]
    if hw_keys:
        for k in hw_keys:
            rows.append((f"hardware.{k}", _joined([(p.get("hardware") or {}).get(k)
                                                   for p in provs])))
    else:  # no results.json: the tags still carry CPU and GPU
        for k in sorted({k for j in jobs for k in j.tags if k.startswith("hardware.")}):
            rows.append((k, _joined([j.tags.get(k) for j in jobs])))
    for k in sorted({k for j in jobs for k in j.tags if k.startswith("version.")}):
        rows.append((k, _joined([j.tags.get(k) for j in jobs])))
    return rows


def build_tables(data: SweepData, baseline: str | None = None) -> dict[str, Table]:
    """Every table of the report. Keys: ``jobs``, ``vs_baseline``, ``pareto``, ``latency``,
    ``tradeoffs``, ``applied`` (settings that differ), ``applied_common`` (the others),
    ``expected`` (the course's claims beside the measured ratios), ``provenance``,
    ``runs`` (the jobs' run names and ids), and
    from :mod:`pipeline.report.lengths` ``scaling``, ``length_ratios``, ``prefix_ttft``
    (empty when the sweep varies no length / has no prefix groups)."""
    s = Sweep.of(data, baseline)
    jobs = jobs_table(s)
    return {
        "jobs": jobs,
        "vs_baseline": vs_baseline_table(s),
        "pareto": pareto_table(s),
        "latency": latency_table(s),
        "tradeoffs": tradeoffs_table(s),
        "applied": applied_table(s),
        "applied_common": applied_common_table(s),
        "expected": expected_table(s),
        "provenance": Table(pd.DataFrame(provenance_rows(data), columns=["item", "value"]),
                            [plain("item"), plain("value")]),
        "runs": Table(jobs.frame, [plain(c) for c in ("job", "run", "run_id", "status")]),
        **length_tables(s),
    }
