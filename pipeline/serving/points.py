"""One load point's figures and verdicts: metrics, SLOs at a percentile, saturation,
validity. A point is a plain dict (``JobResult.load_points`` holds them, JSON as is).

Validity: a point measures the server only if the client kept up. It is flagged
``valid: false`` with its ``invalid_reasons`` when

- ``client_cpu``: this process used more than ``max_client_cpu_percent`` of one core
  during the point (psutil ``cpu_percent``, all its threads): the client may be what
  limits the rate;
- ``dispatch_lag``: the p99 of how late requests were sent against their schedule is over
  ``max_dispatch_lag_ms``: the offered rate was not the one offered;
- ``token_count``: the server's ``usage.completion_tokens`` disagrees with the client's
  own count (exact with token ids; with chunks only when there are *more* output chunks
  than tokens, since a server may put several tokens in one chunk);
- ``errors``: requests failed (HTTP errors, timeouts, cut streams). Requests aborted
  because the point was stopped early are counted apart (``aborted``), not as errors.

A flagged point stays in ``load_points`` and on the curves, marked, and never counts as
passing an SLO; summaries say how many points were invalid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.metrics import performance
from pipeline.records import RequestRecord

#: per-point keys logged to MLflow as ``load.<key>`` with ``step`` = the point's index
CURVE_KEYS = (
    "offered_rate", "offered_rate_realized", "achieved_rate", "output_tokens_per_s",
    "requests_sent", "requests_completed", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
    "e2el_ms_p50", "e2el_ms_p99", "tpot_ms_mean", "tpot_ms_token_weighted_mean",
    "ttft_sched_ms_p50", "ttft_sched_ms_p99", "e2el_sched_ms_p50", "e2el_sched_ms_p99",
    "dispatch_lag_ms_p50", "dispatch_lag_ms_p99", "goodput_requests_per_s",
    "goodput_fraction", "slo_met", "saturated", "valid", "client_cpu_percent", "errors",
    "aborted", "token_count_mismatches", "engine_kv_cache_usage_max",
    "engine_requests_waiting_max", "engine_requests_running_max", "engine_preemptions",
    "engine_prefix_cache_hit_rate",
)


def token_count_mismatches(records: Sequence[RequestRecord]) -> int:
    """Successful records whose server usage count disagrees with the client's count."""
    bad = 0
    for r in records:
        if not r.ok or r.extra.get("output_tokens_source") != "usage":
            continue
        mine = r.extra.get("client_tokens")
        if mine is None:
            continue
        exact = r.extra.get("client_tokens_source") == "token_ids"
        if (mine != r.output_tokens) if exact else (mine > r.output_tokens):
            bad += 1
    return bad


def summarize_point(
    index: int, kind: str, offered_rate: float | None, concurrency: int | None,
    records: Sequence[RequestRecord], wall_s: float, scheduled: int,
    slo: Mapping[str, float], percentile: float, cpu_percent: float,
    limits: Mapping[str, float], stop_reason: str | None = None,
    engine: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The point's dict: what was offered, what was achieved, latencies in both timing
    conventions, SLOs, goodput, saturation and validity."""
    ok = [r for r in records if r.ok]
    aborted = sum(bool(r.extra.get("aborted")) for r in records)
    errors = len(records) - len(ok) - aborted
    p: dict[str, Any] = {
        "index": index, "kind": kind, "offered_rate": offered_rate,
        "concurrency": concurrency, "requests_scheduled": scheduled,
        "requests_sent": len(records), "requests_completed": len(ok),
        "errors": errors, "aborted": aborted, "wall_s": wall_s,
        "achieved_rate": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tokens_per_s": (sum(r.output_tokens for r in ok) / wall_s
                                if wall_s > 0 else 0.0),
        "peak_concurrency": performance.peak_concurrency(records) if records else 0,
        "client_cpu_percent": cpu_percent,
    }
    # the rate the schedule really offered: a short Poisson schedule can be well off the
    # nominal rate, and achieved is to be read against this one
    dues = sorted(float(r.extra["t_scheduled"]) for r in records if "t_scheduled" in r.extra)
    if offered_rate is not None and len(dues) >= 2 and dues[-1] > dues[0]:
        p["offered_rate_realized"] = (len(dues) - 1) / (dues[-1] - dues[0])
    p.update(performance.latency_metrics(records))
    p.update(performance.weighted_means(records))
    p.update(performance.schedule_metrics(records))
    if slo and wall_s > 0:
        p.update(performance.goodput(records, wall_s, slo))
        p.update(performance.slo_percentiles(records, slo, percentile))
        p["slo_met"] = bool(p["slo_met"])
    p["token_count_mismatches"] = token_count_mismatches(records)
    p.update(engine or {})
    p["saturated"] = bool(stop_reason and stop_reason.startswith("saturated"))
    p["stop_reason"] = stop_reason
    reasons: list[str] = []
    if cpu_percent > limits["max_client_cpu_percent"]:
        reasons.append(f"client_cpu: {cpu_percent:.0f}% of a core > "
                       f"{limits['max_client_cpu_percent']:g}%")
    lag = p.get("dispatch_lag_ms_p99")
    if lag is not None and lag > limits["max_dispatch_lag_ms"]:
        reasons.append(f"dispatch_lag: p99 {lag:.1f} ms > {limits['max_dispatch_lag_ms']:g} ms")
    if p["token_count_mismatches"]:
        reasons.append(f"token_count: {p['token_count_mismatches']} requests where usage "
                       f"differs from the client's count")
    if errors:
        first = next(r.error for r in records if not r.ok and not r.extra.get("aborted"))
        reasons.append(f"errors: {errors}/{len(records)} failed (first: {str(first)[:120]})")
    p["valid"] = not reasons
    p["invalid_reasons"] = reasons
    return p


def passes(point: Mapping[str, Any]) -> bool:
    """A point passes the SLOs when they hold at the percentile, it did not saturate and
    it is valid: an unreliable point can never raise the answer."""
    return bool(point.get("slo_met")) and not point["saturated"] and bool(point["valid"])


def curve_metrics(point: Mapping[str, Any]) -> dict[str, float]:
    """The point's numbers for MLflow (``load.<key>``; booleans as 0/1)."""
    out: dict[str, float] = {}
    for k in CURVE_KEYS:
        v = point.get(k)
        # bool is an int: it is logged as 0/1
        if isinstance(v, int | float) and math.isfinite(v):
            out[f"load.{k}"] = float(v)
    return out


def summary_metrics(points: Sequence[Mapping[str, Any]], profile: str,
                    slo_answer: float | None) -> dict[str, float]:
    """Job-level figures over the curve.

    ``max_rate_under_slo``: slo_search's answer; for sweep/ramp with SLOs set, the highest
    offered rate among passing points (0 when none). ``saturation_rate``: the lowest
    offered rate at which a point was stopped as saturated (absent if none).
    ``max_throughput_requests_per_s``: the ``max`` point's achieved rate.
    ``output_tokens_per_s``: the highest of the valid points (the throughput ceiling).
    """
    out: dict[str, float] = {"points_run": float(len(points)),
                             "points_invalid": float(sum(not p["valid"] for p in points)),
                             "points_saturated": float(sum(p["saturated"] for p in points))}
    rated = [p for p in points if p["offered_rate"] is not None]
    if slo_answer is not None:
        out["max_rate_under_slo"] = slo_answer
    elif any("slo_met" in p for p in points):
        good = [p["offered_rate"] for p in rated if passes(p)]
        out["max_rate_under_slo"] = max(good) if good else 0.0
    sat = [p["offered_rate"] for p in rated if p["saturated"]]
    if sat:
        out["saturation_rate"] = min(sat)
    for p in points:
        if p["kind"] in ("sync", "max"):
            out[f"{p['kind']}_requests_per_s"] = p["achieved_rate"]
    if "max_requests_per_s" in out:
        out["max_throughput_requests_per_s"] = out.pop("max_requests_per_s")
    valid = [p for p in points if p["valid"]] or list(points)
    if valid:
        out["output_tokens_per_s"] = max(p["output_tokens_per_s"] for p in valid)
        out["requests_per_s"] = max(p["achieved_rate"] for p in valid)
    out["peak_concurrency"] = float(max((p["peak_concurrency"] for p in points), default=0))
    out["num_requests"] = float(sum(p["requests_sent"] for p in points))
    out["num_failed"] = float(sum(p["errors"] for p in points))
    return out
