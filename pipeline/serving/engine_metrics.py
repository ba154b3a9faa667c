"""The engine's own view of a load point, from its Prometheus ``/metrics`` (vLLM has one).

Gauges (KV-cache usage, requests running / waiting) are instantaneous, so a background
thread samples them once a second during the point and keeps the maximum; counters
(preemptions, prefix-cache queries and hits) are read before and after the point and
differenced. One GET a second is a negligible load on the client next to the stream reads.
Series names: vLLM v1 (``vllm:kv_cache_usage_perc``, ``vllm:num_preemptions_total``,
``vllm:prefix_cache_{queries,hits}_total``) with the v0 names as fallbacks.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from typing import Any

from pipeline.serving.http_json import http_get_json

#: gauge -> names it has had across vLLM versions (first found wins)
GAUGES = {
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "requests_waiting": ("vllm:num_requests_waiting",),
    "requests_running": ("vllm:num_requests_running",),
}
COUNTERS = {
    "preemptions": ("vllm:num_preemptions_total", "vllm:num_preemptions"),
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total",),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total",),
}
_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum every sample of each series over its labels (one engine: one sample each)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        if math.isfinite(v):
            out[m.group(1)] = out.get(m.group(1), 0.0) + v
    return out


def _pick(series: dict[str, float], names: tuple[str, ...]) -> float | None:
    return next((series[n] for n in names if n in series), None)


class EngineSampler:
    """Scrape ``url`` before, during (every ``interval_s``) and after a point.

    Use as a context manager; ``metrics()`` afterwards gives ``engine_*`` keys, or {} when
    the endpoint has no (readable) ``/metrics``. Never raises for the endpoint.
    """

    def __init__(self, url: str | None, interval_s: float = 1.0) -> None:
        self.url = url
        self.interval_s = interval_s
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape(self) -> dict[str, float]:
        if not self.url:
            return {}
        with contextlib.suppress(OSError, ValueError):
            status, body = http_get_json(self.url, 2.0)
            if status == 200 and isinstance(body, str):
                return parse_prometheus(body)
        return {}

    def _sample(self) -> None:
        series = self.scrape()
        if not series:
            return
        self.samples += 1
        for key, names in GAUGES.items():
            v = _pick(series, names)
            if v is not None:
                self.peaks[key] = max(self.peaks.get(key, v), v)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> EngineSampler:
        self.before = self.scrape()
        if self.before:  # no /metrics: no thread either
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="engine-metrics")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5.0)
            self._sample()
            self.after = self.scrape()

    def metrics(self) -> dict[str, float]:
        """``engine_kv_cache_usage_max`` (0-1), ``engine_requests_{waiting,running}_max``,
        ``engine_preemptions`` (during the point), ``engine_prefix_cache_hit_rate``."""
        if not self.before or not self.after:
            return {}
        out = {f"engine_{k}_max": v for k, v in self.peaks.items()}
        delta: dict[str, float] = {}
        for key, names in COUNTERS.items():
            a, b = _pick(self.before, names), _pick(self.after, names)
            if a is not None and b is not None:
                delta[key] = b - a
        if "preemptions" in delta:
            out["engine_preemptions"] = delta["preemptions"]
        if delta.get("prefix_cache_queries"):
            out["engine_prefix_cache_hit_rate"] = (delta.get("prefix_cache_hits", 0.0)
                                                   / delta["prefix_cache_queries"])
        out["engine_metrics_samples"] = float(self.samples)
        return out
