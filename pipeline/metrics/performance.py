"""Latency, throughput and batching metrics computed from :class:`RequestRecord` timelines.

Records carry times in seconds on one monotonic clock; every exported key named ``*_ms`` is
in milliseconds. The definitions are the README's "Metrics" table and, where that is
silent, vLLM's benchmark_serving (linear percentiles, TPOT excluding the first token).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from pipeline.records import RequestRecord

__all__ = [
    "GOODPUT_SLO_KEYS",
    "SLO_DIALECTS",
    "batch_phase_metrics",
    "e2el",
    "e2el_sched",
    "goodput",
    "itl",
    "latency_metrics",
    "mean_ci95",
    "peak_concurrency",
    "schedule_metrics",
    "slo_percentiles",
    "slo_value",
    "summarize",
    "throughput_metrics",
    "tpot",
    "ttft",
    "ttft_sched",
    "weighted_means",
]

#: SLO keys accepted by :func:`goodput`, all thresholds in milliseconds
GOODPUT_SLO_KEYS: tuple[str, ...] = ("ttft_ms", "tpot_ms", "e2el_ms")

_PERCENTILES: tuple[int, ...] = (50, 90, 99)

# Two-sided 95% Student's t critical values t_{0.975, df} for df = 1..30 (standard tables).
# A table keeps scipy out of the dependency set; repeats are few, so small df matter most.
_T_975: tuple[float, ...] = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
# Past df = 30 the t quantile is within ~4% of the normal one (2.04 -> 1.96) and shrinks
# towards it, so the normal value is used rather than a longer table.
_Z_975 = 1.96


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Summary statistics of ``values``: ``mean``, ``std`` (population), ``p50/p90/p99``.

    Percentiles use numpy's linear interpolation, as vLLM's benchmarks do, so numbers are
    comparable. An empty input gives ``{}`` rather than NaNs, so callers can omit the family.
    """
    if len(values) == 0:
        return {}
    arr = np.asarray(values, dtype=float)
    out = {"mean": float(arr.mean()), "std": float(arr.std(ddof=0))}
    for p in _PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def ttft(r: RequestRecord) -> float | None:
    """Time to first token in seconds, or ``None`` when no token arrived."""
    if r.t_first_token is None:
        return None
    return r.t_first_token - r.t_start


def e2el(r: RequestRecord) -> float:
    """End-to-end latency in seconds."""
    return r.t_end - r.t_start


def tpot(r: RequestRecord) -> float | None:
    """Time per output token after the first, in seconds; ``None`` unless N_out > 1.

    The first token is excluded because its latency is TTFT (prefill), not decode.
    """
    first = ttft(r)
    if first is None or r.output_tokens <= 1:
        return None
    return (e2el(r) - first) / (r.output_tokens - 1)


def itl(r: RequestRecord) -> list[float]:
    """Inter-token latencies in seconds: gaps between consecutive ``token_times``."""
    times = r.token_times
    if times is None or len(times) < 2:
        return []
    return [b - a for a, b in pairwise(times)]


def _prefixed_ms(prefix: str, values_s: Sequence[float]) -> dict[str, float]:
    stats = summarize([v * 1000.0 for v in values_s])
    return {f"{prefix}_ms_{k}": v for k, v in stats.items()}


def latency_metrics(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Flat latency summary over successful records, in milliseconds.

    Keys are ``{ttft,tpot,itl,e2el}_ms_{mean,std,p50,p90,p99}``. ITL pools the gaps of all
    requests (every gap weighs the same, not every request). A family with no values
    (e.g. ITL from a backend without per-token times) is left out entirely.
    """
    ok = [r for r in records if r.ok]
    ttfts = [v for v in (ttft(r) for r in ok) if v is not None]
    tpots = [v for v in (tpot(r) for r in ok) if v is not None]
    itls = [gap for r in ok for gap in itl(r)]
    e2els = [e2el(r) for r in ok]
    out: dict[str, float] = {}
    out.update(_prefixed_ms("ttft", ttfts))
    out.update(_prefixed_ms("tpot", tpots))
    out.update(_prefixed_ms("itl", itls))
    out.update(_prefixed_ms("e2el", e2els))
    return out


def _check_wall(wall_s: float) -> None:
    if not wall_s > 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s}")


def throughput_metrics(records: Sequence[RequestRecord], wall_s: float) -> dict[str, float]:
    """Throughput over the measured phase lasting ``wall_s`` seconds.

    Token and request counts (including ``total_prompt_tokens``) cover successful records
    only, so they describe the same work as the rates; ``num_requests`` counts all records
    and ``error_rate`` is ``num_failed / num_requests`` (0.0 for no records).
    """
    _check_wall(wall_s)
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    num = len(records)
    failed = num - len(ok)
    return {
        "output_tokens_per_s": out_tokens / wall_s,
        "requests_per_s": len(ok) / wall_s,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "num_requests": num,
        "num_failed": failed,
        "error_rate": failed / num if num else 0.0,
    }


def batch_phase_metrics(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Prefill time and decode rate of an offline batched run.

    Records sharing an identical ``t_start`` form one batch (offline backends stamp the
    whole batch with one start time). ``prefill_s_mean`` is the mean over batches of the
    delay to the batch's first token; ``decode_tokens_per_s`` divides the tokens generated
    after each request's first token by the time from the batch's first token to its last
    end, both summed over batches (batches with zero decode time are skipped). Only
    successful records with a first token count; a key is omitted when nothing feeds it.
    """
    batches: dict[float, list[RequestRecord]] = defaultdict(list)
    for r in records:
        if r.ok and r.t_first_token is not None:
            batches[r.t_start].append(r)
    if not batches:
        return {}
    prefills: list[float] = []
    decode_tokens = 0
    decode_time = 0.0
    for t_start, batch in batches.items():
        first = min(r.t_first_token for r in batch if r.t_first_token is not None)
        prefills.append(first - t_start)
        span = max(r.t_end for r in batch) - first
        if span <= 0:
            continue
        decode_tokens += sum(max(r.output_tokens - 1, 0) for r in batch)
        decode_time += span
    out = {"prefill_s_mean": float(np.mean(prefills))}
    if decode_time > 0:
        out["decode_tokens_per_s"] = decode_tokens / decode_time
    return out


#: the two timing conventions an SLO on TTFT/E2EL can be judged in (see "load points")
SLO_DIALECTS: tuple[str, ...] = ("schedule", "send")


def slo_value(r: RequestRecord, key: str, dialect: str = "send") -> float | None:
    """The latency an SLO ``key`` judges, in seconds (None: the request has none).

    ``dialect="send"`` measures TTFT and E2EL from the actual send (vLLM's convention);
    ``"schedule"`` from the scheduled send (MLPerf's), falling back to the actual send for
    a record without a schedule. TPOT is the same in both: it starts at the first token.
    """
    if dialect not in SLO_DIALECTS:
        raise ValueError(f"unknown SLO dialect {dialect!r}; allowed: {', '.join(SLO_DIALECTS)}")
    sched = dialect == "schedule" and r.extra.get("t_scheduled") is not None
    if key == "ttft_ms":
        return ttft_sched(r) if sched else ttft(r)
    if key == "tpot_ms":
        return tpot(r)
    if key == "e2el_ms":
        return e2el_sched(r) if sched else e2el(r)
    raise ValueError(f"unknown SLO key {key!r}; allowed: {', '.join(GOODPUT_SLO_KEYS)}")


def _meets_slo(r: RequestRecord, slo: Mapping[str, float], dialect: str = "send") -> bool:
    if not r.ok:
        return False
    for key, limit_ms in slo.items():
        value = slo_value(r, key, dialect)
        if value is None:
            # No first token means TTFT cannot be shown to meet the target; single-token
            # outputs have no decode phase, so no TPOT to violate.
            if key == "tpot_ms":
                continue
            return False
        if value * 1000.0 > limit_ms:
            return False
    return True


def slo_bounds(w: Any) -> dict[str, float]:
    """The workload's SLOs that are set, keyed as :func:`goodput` reads them (``ttft_ms``,
    ``tpot_ms``, ``e2el_ms``); ``w`` is a ``WorkloadConfig``."""
    return {k: v for k, v in (("ttft_ms", w.slo_ttft_ms), ("tpot_ms", w.slo_tpot_ms),
                              ("e2el_ms", w.slo_e2el_ms)) if v is not None}


def goodput(
    records: Sequence[RequestRecord], wall_s: float, slo: Mapping[str, float],
    dialect: str = "send",
) -> dict[str, float]:
    """Rate and fraction of requests meeting every configured SLO (``<=`` threshold, ms).

    ``slo`` keys must be among :data:`GOODPUT_SLO_KEYS`. A request is good if it succeeded
    and meets every SLO; a request without a TPOT (N_out <= 1) meets the TPOT SLO, one
    without a first token fails the TTFT SLO. ``goodput_fraction`` is good / all records
    (0.0 for no records). An empty ``slo`` gives ``{}``: goodput is not configured.
    ``dialect``: TTFT/E2EL from the actual send (``send``) or the scheduled one
    (``schedule``), as :func:`slo_value`.
    """
    unknown = [k for k in slo if k not in GOODPUT_SLO_KEYS]
    if unknown:
        raise ValueError(
            f"unknown goodput SLO key {unknown[0]!r}; allowed keys: {', '.join(GOODPUT_SLO_KEYS)}"
        )
    if not slo:
        return {}
    _check_wall(wall_s)
    good = sum(1 for r in records if _meets_slo(r, slo, dialect))
    return {
        "goodput_requests_per_s": good / wall_s,
        "goodput_fraction": good / len(records) if records else 0.0,
    }


def _t_critical(df: int) -> float:
    return _T_975[df - 1] if df <= len(_T_975) else _Z_975


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its two-sided 95% confidence interval (Student's t).

    Half-width is ``t_{0.975, n-1} * s / sqrt(n)`` with the sample std ``s`` (ddof=1).
    A single value has no interval: it gives ``(value, 0.0)``, so a half-width of 0 with
    n = 1 means "unknown", not "exact". No values raises ``ValueError``.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value")
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if n == 1:
        return mean, 0.0
    half = _t_critical(n - 1) * float(arr.std(ddof=1)) / math.sqrt(n)
    return mean, half


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Largest number of requests in flight at once, over half-open ``[t_start, t_end)``.

    All records count, failed ones included: they occupied the server too. At equal times
    ends are processed before starts, so back-to-back requests do not overlap.
    """
    # -1 sorts before +1, which puts an end ahead of a start at the same instant.
    events = sorted([(r.t_start, 1) for r in records] + [(r.t_end, -1) for r in records])
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


# ------------------------------------------------------------ load points (profiles)
#
# Two timing conventions for open-loop load (docs/serving.md, "Timing"):
# - vLLM's (the plain names, ttft/e2el above): from the actual send, ``t_start``;
# - MLPerf's (``*_sched``): from the scheduled send, ``extra["t_scheduled"]``, so that a
#   client that falls behind its schedule cannot hide the delay from the latency.
# They differ by the dispatch lag plus any client-side queueing for a concurrency slot.


def ttft_sched(r: RequestRecord) -> float | None:
    """Time to first token from the scheduled send (seconds); None without either."""
    due = r.extra.get("t_scheduled")
    if due is None or r.t_first_token is None:
        return None
    return r.t_first_token - float(due)


def e2el_sched(r: RequestRecord) -> float | None:
    """End-to-end latency from the scheduled send (seconds); None without a schedule."""
    due = r.extra.get("t_scheduled")
    return None if due is None else r.t_end - float(due)


def schedule_metrics(records: Sequence[RequestRecord]) -> dict[str, float]:
    """``ttft_sched_ms_*`` and ``e2el_sched_ms_*`` over successful records, and
    ``dispatch_lag_ms_{p50,p99,max}`` over every record that was sent (a failed request
    was dispatched late or not regardless of how it ended)."""
    ok = [r for r in records if r.ok]
    out: dict[str, float] = {}
    out.update(_prefixed_ms("ttft_sched", [v for v in map(ttft_sched, ok) if v is not None]))
    out.update(_prefixed_ms("e2el_sched", [v for v in map(e2el_sched, ok) if v is not None]))
    lags = [float(r.extra["dispatch_lag_s"]) * 1000.0 for r in records
            if r.extra.get("dispatch_lag_s") is not None]
    if lags:
        out["dispatch_lag_ms_p50"] = float(np.percentile(lags, 50))
        out["dispatch_lag_ms_p99"] = float(np.percentile(lags, 99))
        out["dispatch_lag_ms_max"] = float(max(lags))
    return out


def weighted_means(records: Sequence[RequestRecord]) -> dict[str, float]:
    """The two weightings of the decode rate, named so they cannot be confused.

    ``tpot_ms_mean`` (:func:`latency_metrics`) and ``itl_ms_request_weighted_mean`` weigh
    every *request* the same (a short request counts as much as a long one);
    ``tpot_ms_token_weighted_mean`` = Σ(E2EL − TTFT) / Σ(N_out − 1) and ``itl_ms_mean``
    (pooled gaps) weigh every *token* (or chunk) the same. Under load the two drift apart
    when long and short requests see different batches.
    """
    ok = [r for r in records if r.ok]
    num = den = 0.0
    for r in ok:
        first = ttft(r)
        if first is not None and r.output_tokens > 1:
            num += e2el(r) - first
            den += r.output_tokens - 1
    per_req = [float(np.mean(g)) for g in (itl(r) for r in ok) if g]
    out: dict[str, float] = {}
    if den:
        out["tpot_ms_token_weighted_mean"] = num / den * 1000.0
    if per_req:
        out["itl_ms_request_weighted_mean"] = float(np.mean(per_req)) * 1000.0
    return out


def slo_percentiles(records: Sequence[RequestRecord], slo: Mapping[str, float],
                    percentile: float, dialect: str = "send") -> dict[str, float]:
    """Each SLO'd latency at ``percentile`` over *all* records, and ``slo_met`` (1.0/0.0).

    A failed (or aborted) request counts as infinitely late, so errors can never help a
    point pass; a request with no TPOT (N_out <= 1) counts as 0 for the TPOT SLO. TTFT and
    E2EL are from the actual send (``dialect="send"``, vLLM's convention) or from the
    scheduled send (``"schedule"``, MLPerf's: client-side lateness and queueing count).
    """
    unknown = [k for k in slo if k not in GOODPUT_SLO_KEYS]
    if unknown:
        raise ValueError(f"unknown SLO key {unknown[0]!r}; allowed: {', '.join(GOODPUT_SLO_KEYS)}")
    out: dict[str, float] = {}
    met = bool(records)
    for key, limit_ms in slo.items():
        vals: list[float] = []
        for r in records:
            if not r.ok:
                vals.append(math.inf)
                continue
            v = slo_value(r, key, dialect)
            if v is None:
                v = 0.0 if key == "tpot_ms" else math.inf
            vals.append(v * 1000.0)
        # inverted_cdf: the smallest value with at least `percentile`% of requests at or
        # below it, i.e. exactly "P% of requests meet the SLO"; no interpolation with inf
        value = (float(np.percentile(vals, percentile, method="inverted_cdf")) if vals
                 else math.inf)
        out[f"slo_{key}_p{percentile:g}"] = value
        met = met and value <= limit_ms
    out["slo_met"] = float(met)
    return out
