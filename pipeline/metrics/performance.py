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

import numpy as np

from pipeline.records import RequestRecord

__all__ = [
    "GOODPUT_SLO_KEYS",
    "batch_phase_metrics",
    "e2el",
    "goodput",
    "itl",
    "latency_metrics",
    "mean_ci95",
    "peak_concurrency",
    "summarize",
    "throughput_metrics",
    "tpot",
    "ttft",
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


def _meets_slo(r: RequestRecord, slo: Mapping[str, float]) -> bool:
    if not r.ok:
        return False
    for key, limit_ms in slo.items():
        if key == "ttft_ms":
            value = ttft(r)
            # No first token means TTFT cannot be shown to meet the target.
            if value is None or value * 1000.0 > limit_ms:
                return False
        elif key == "tpot_ms":
            value = tpot(r)
            # Single-token outputs have no decode phase, so no TPOT to violate.
            if value is not None and value * 1000.0 > limit_ms:
                return False
        elif key == "e2el_ms" and e2el(r) * 1000.0 > limit_ms:
            return False
    return True


def goodput(
    records: Sequence[RequestRecord], wall_s: float, slo: Mapping[str, float]
) -> dict[str, float]:
    """Rate and fraction of requests meeting every configured SLO (``<=`` threshold, ms).

    ``slo`` keys must be among :data:`GOODPUT_SLO_KEYS`. A request is good if it succeeded
    and meets every SLO; a request without a TPOT (N_out <= 1) meets the TPOT SLO, one
    without a first token fails the TTFT SLO. ``goodput_fraction`` is good / all records
    (0.0 for no records). An empty ``slo`` gives ``{}``: goodput is not configured.
    """
    unknown = [k for k in slo if k not in GOODPUT_SLO_KEYS]
    if unknown:
        raise ValueError(
            f"unknown goodput SLO key {unknown[0]!r}; allowed keys: {', '.join(GOODPUT_SLO_KEYS)}"
        )
    if not slo:
        return {}
    _check_wall(wall_s)
    good = sum(1 for r in records if _meets_slo(r, slo))
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
