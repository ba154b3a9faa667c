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
  because the point was stopped early are counted apart (``aborted``), not as errors;
- ``client_rate``: the point fell short of its offered rate (below) *because the client's
  own sends fell behind the schedule* (dispatch lag, a concurrency cap): the server was
  never offered the rate.

Rates. An open-loop point's ``achieved_rate`` is the rate the server completed requests,
read the same way as the rate the schedule offered: ``offered_rate_realized`` = (n - 1) /
the span of the scheduled sends, ``completion_rate`` = (k - 1) / the span of the k
completions (a short point's drain tail does not read as a shortfall), and
``achieved_rate`` = the smaller of the two (a server cannot finish requests faster than
they arrive: more is the point's drain). A closed-loop point (``sync``, ``max``) has no
schedule: completed / wall. Whenever ``completion_rate`` < ``saturation_rate_ratio`` x
the offered rate the point is **saturated** (the server did not keep up), whatever TTFT
did — or, when the sends themselves fell that far behind, **invalid** (``client_rate``).
A point's capacity is its achieved rate, never its offered one.

SLOs on TTFT and E2EL are judged in ``slo_dialect``: ``schedule`` (the default for
open-loop points: from the scheduled send, MLPerf's rule, so client-side lateness or
queueing cannot hide from them) or ``send`` (from the actual send, vLLM's). Closed-loop
points have no schedule to be late against and are always judged from the send; each
point names the dialect it was judged in.

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
    "offered_rate", "offered_rate_realized", "achieved_rate", "completion_rate",
    "sent_rate", "output_tokens_per_s",
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


def span_rate(times: Sequence[float]) -> float | None:
    """Events per second over their own span, ``(n - 1) / (last - first)``: the estimator
    used alike for the schedule (offered), the sends and the completions (achieved), so
    they compare like with like. None for fewer than two events or a zero span."""
    if len(times) < 2:
        return None
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else None


def rate_verdict(offered: float | None, sent: float | None, completed: float | None,
                 ratio: float, concurrency: int | None = None,
                 lag_p99_ms: float | None = None) -> tuple[str | None, str | None]:
    """Judge an open-loop point by its rates (requests/s): ``(kind, reason)``.

    ``kind`` is None when the completions kept up (``completed >= ratio x offered``);
    ``"client"`` when they did not and the client's own sends had already fallen that far
    behind the schedule (its dispatch lag or a concurrency cap: the server was never
    offered the rate, so the point is invalid); ``"saturated"`` otherwise (the server did
    not keep up). TTFT plays no part: a shortfall is a shortfall. ``completed`` None (no
    two completions) counts as 0; ``offered`` None (a closed loop) is never judged.
    """
    if offered is None or offered <= 0:
        return None, None
    done = completed or 0.0
    if done >= ratio * offered:
        return None, None
    short = (f"achieved {done:.2f} req/s < {ratio:g} x offered {offered:.2f} req/s")
    if sent is not None and sent < ratio * offered:
        why = []
        if concurrency:
            why.append(f"concurrency cap {concurrency}")
        if lag_p99_ms is not None:
            why.append(f"dispatch lag p99 {lag_p99_ms:.0f} ms")
        return "client", (f"client_rate: {short}: the client itself sent only {sent:.2f} "
                          f"req/s ({', '.join(why) or 'client fell behind'}), so the "
                          f"server was never offered the rate")
    return "saturated", f"saturated: {short} (the server did not keep up)"


def summarize_point(
    index: int, kind: str, offered_rate: float | None, concurrency: int | None,
    records: Sequence[RequestRecord], wall_s: float, scheduled: int,
    slo: Mapping[str, float], percentile: float, cpu_percent: float,
    limits: Mapping[str, float], stop_reason: str | None = None,
    engine: Mapping[str, float] | None = None, slo_dialect: str = "schedule",
) -> dict[str, Any]:
    """The point's dict: what was offered, what was achieved, latencies in both timing
    conventions, SLOs (judged in ``slo_dialect`` for an open-loop point, from the send
    for a closed-loop one), goodput, saturation and validity. ``limits`` holds
    ``max_client_cpu_percent``, ``max_dispatch_lag_ms`` and ``saturation_rate_ratio``."""
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
    dues = [float(r.extra["t_scheduled"]) for r in records if "t_scheduled" in r.extra]
    verdict: tuple[str | None, str | None] = (None, None)
    p.update(performance.schedule_metrics(records))
    if offered_rate is not None:
        realized = span_rate(dues)
        if realized is not None:
            p["offered_rate_realized"] = realized
        sent = span_rate([r.t_start for r in records])
        done = span_rate([r.t_end for r in ok])
        p["sent_rate"], p["completion_rate"] = sent, done
        offered = realized or offered_rate
        # capacity is what was achieved: never more than what arrived (see module doc)
        p["achieved_rate"] = min(done, offered) if done is not None else p["achieved_rate"]
        verdict = rate_verdict(offered, sent, done, limits["saturation_rate_ratio"],
                               concurrency, p.get("dispatch_lag_ms_p99"))
    p.update(performance.latency_metrics(records))
    p.update(performance.weighted_means(records))
    # a closed loop has no schedule to be late against: judged from the send
    dialect = slo_dialect if offered_rate is not None else "send"
    if slo and wall_s > 0:
        p["slo_dialect"] = dialect
        p.update(performance.goodput(records, wall_s, slo, dialect))
        p.update(performance.slo_percentiles(records, slo, percentile, dialect))
        p["slo_met"] = bool(p["slo_met"])
    p["token_count_mismatches"] = token_count_mismatches(records)
    p.update(engine or {})
    live_saturated = bool(stop_reason and stop_reason.startswith("saturated"))
    p["saturated"] = live_saturated or verdict[0] == "saturated"
    p["stop_reason"] = stop_reason
    p["saturation_reason"] = (stop_reason if live_saturated
                              else verdict[1] if verdict[0] == "saturated" else None)
    reasons: list[str] = []
    if verdict[0] == "client":
        reasons.append(str(verdict[1]))
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


def capacity_under_slo(points: Sequence[Mapping[str, Any]]) -> float:
    """The highest achieved rate among open-loop points that pass (:func:`passes`; 0.0
    when none): a capacity is what the server was seen to deliver within the SLOs, never
    a rate that was merely offered."""
    best = slo_point(points)
    return float(best["achieved_rate"]) if best is not None else 0.0


def slo_point(points: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The point behind :func:`capacity_under_slo`: the passing open-loop point with the
    highest achieved rate (None when none passes). Its ``output_tokens_per_s`` prices a
    token at that capacity (``usd_per_million_output_tokens_at_slo``)."""
    good = [p for p in points if p["offered_rate"] is not None and passes(p)]
    return max(good, key=lambda p: float(p["achieved_rate"]), default=None)


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

    ``max_rate_under_slo``: slo_search's answer; for sweep/ramp with SLOs set, the same
    rule (:func:`capacity_under_slo`): the highest *achieved* rate among passing open-loop
    points (0 when none). ``saturation_rate``: the lowest offered rate at which a point
    saturated (a load level, not a capacity; absent if none).
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
        out["max_rate_under_slo"] = capacity_under_slo(points)
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
