"""Run a load profile (``workload.profile`` != fixed) against an online backend.

:func:`pipeline.job_measure.measure` hands over here after validation; the job's usual result comes
back (the records of every point, tagged ``extra["point"]``, and job-level metrics), and
every point's dict goes to ``points_out`` (``JobResult.load_points``). Each point goes
through the backend's ordinary ``serve()``: the client is steered by a
:class:`~pipeline.serving.client.PointControl` (over-saturation stop, duration), so any
online backend (``vllm_server``, ``openai``) runs every profile unchanged.

Concurrency: ``sync`` sends one request at a time, ``max`` every request at once with no
cap, open-loop points follow their arrival schedule (``workload.arrival``, ``burstiness``)
with no cap either: ``workload.concurrency`` is for ``profile=fixed`` only. A cap on an
open loop turns the server's slowness into client-side queueing (coordinated omission):
the offered rate is then never offered, and a capped point could only be thrown away.
Every point records ``concurrency`` (null for open-loop points).

``trace`` (``workload.source=trace``) is one open-loop point at the trace's own send times
(:func:`pipeline.workload.trace.replay_plan`): every request once, never stopped early, its
offered rate the schedule's own; the job also logs its latencies as a fixed job does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.config import Config
from pipeline.measure.memory import PeakRSSSampler
from pipeline.measure.timing import PhaseTimer, clock
from pipeline.metrics import performance
from pipeline.records import Request, RequestRecord
from pipeline.serving import points as pts
from pipeline.serving.client import PointControl, point_control
from pipeline.serving.engine_metrics import EngineSampler
from pipeline.workload.arrivals import arrival_offsets
from pipeline.workload.profiles import (
    SaturationRule,
    SloSearch,
    point_size,
    ramp_rates,
    sweep_rates,
)
from pipeline.workload.prompts import annotate_records

log = logging.getLogger(__name__)


class ProfileRunner:
    """Runs points one after another and keeps their records and dicts."""

    def __init__(self, backend: Any, spec: Config, requests: list[Request]) -> None:
        self.backend = backend
        self.spec = spec
        self.w = spec.workload
        self.requests = requests
        self.slo = performance.slo_bounds(self.w)
        self.limits = {"max_client_cpu_percent": self.w.max_client_cpu_percent,
                       "max_dispatch_lag_ms": self.w.max_dispatch_lag_ms,
                       "saturation_rate_ratio": self.w.saturation_rate_ratio}
        self.slo_dialect = self.w.slo_dialect
        if self.w.concurrency is not None:
            log.info("workload.concurrency=%s applies to profile=fixed only: the %s "
                     "profile's open-loop points are not capped", self.w.concurrency,
                     self.w.profile)
        self.points: list[dict[str, Any]] = []
        self.records: list[RequestRecord] = []
        url_of: Callable[[], str | None] | None = getattr(backend, "metrics_url", None)
        self.metrics_url = url_of() if url_of is not None else None

    def point(self, kind: str, rate: float | None = None,
              schedule: list[float] | None = None) -> dict[str, Any]:
        """Run one point: ``sync``, ``max``, an open-loop ``rate`` (requests/s), or every
        request at the given ``schedule`` (seconds; ``rate`` is then the one it offers)."""
        import psutil

        w, k = self.w, len(self.points)
        n = len(self.requests) if schedule else point_size(w, len(self.requests), rate)
        reqs = [self.requests[i % len(self.requests)] for i in range(n)]
        if schedule:
            send_at, conc = list(schedule), None
        elif rate is None:
            send_at, conc = [0.0] * n, (1 if kind == "sync" else None)
        else:
            send_at = arrival_offsets(n, rate, w.arrival, w.burstiness, self.spec.seed + k)
            conc = None  # an open loop: see the module docstring
        ctrl = PointControl(grace_s=w.point_grace_s)
        if rate is not None and not schedule:  # a given schedule is replayed whole
            ctrl.stop_rule = SaturationRule(rate, w.saturation_rate_ratio,
                                            w.saturation_ttft_growth)
            ctrl.deadline_s = w.point_duration_s
        proc = psutil.Process()
        proc.cpu_percent(None)  # starts the interval the reading after the point covers
        with EngineSampler(self.metrics_url) as engine, point_control(ctrl):
            t0 = clock()
            try:
                recs = self.backend.serve(reqs, self.spec.decoding, send_at=send_at,
                                          concurrency=conc, timeout_s=w.request_timeout_s,
                                          max_new_tokens=w.max_new_tokens,
                                          fixed_length=w.fixed_length)
            except Exception as e:
                # every request failing fails the job, unless we aborted them ourselves
                if ctrl.stop_reason is None or getattr(e, "records", None) is None:
                    raise
                recs = list(e.records)  # type: ignore[attr-defined]
            wall = clock() - t0
        cpu = proc.cpu_percent(None)
        annotate_records(recs, self.requests)
        for r in recs:
            r.extra["point"] = k
        p = pts.summarize_point(k, kind, rate, conc, recs, wall, n, self.slo,
                                w.slo_percentile, cpu, self.limits, ctrl.stop_reason,
                                engine.metrics(), self.slo_dialect)
        self.points.append(p)
        self.records.extend(recs)
        print(_line(p), flush=True)
        return p

    # ----------------------------------------------------------------- profiles

    def trace(self) -> None:
        from pipeline.workload.trace import replay_plan

        plan = replay_plan(self.w)
        if len(plan.send_at) != len(self.requests):
            raise RuntimeError(f"{len(self.requests)} requests for {len(plan.send_at)} "
                               f"trace lines")
        p = self.point("trace", pts.span_rate(plan.send_at), schedule=plan.send_at)
        for r in self.records:
            r.extra.update(plan.extra[r.index])
        p["trace_span_s"] = plan.send_at[-1]

    def sweep(self) -> None:
        sync, mx = self.point("sync"), self.point("max")
        for rate in sweep_rates(sync["achieved_rate"], mx["achieved_rate"],
                                self.w.sweep_points):
            self.point("rate", rate)

    def ramp(self) -> None:
        for rate in ramp_rates(self.w):
            if self.point("rate", rate)["saturated"]:
                break  # beyond the first saturated rate the load would only queue

    def slo_search(self) -> float:
        sync = self.point("sync")
        if not pts.passes(sync):
            return 0.0  # not even one request at a time meets the SLOs
        mx = self.point("max")
        search = SloSearch(start=max(mx["achieved_rate"], sync["achieved_rate"]),
                           tolerance=self.w.search_tolerance, budget=self.w.max_points - 2)
        while (rate := search.next_rate()) is not None:
            search.record(rate, pts.passes(self.point("rate", rate)))
        # the search steers by offered rates; the answer is what passing points achieved
        return pts.capacity_under_slo(self.points)


def _line(p: dict[str, Any]) -> str:
    rate = f"{p['offered_rate']:.2f}/s" if p["offered_rate"] is not None else p["kind"]
    flags = [f for f, on in (("saturated", p["saturated"]), ("INVALID", not p["valid"]),
                             ("slo ok", p.get("slo_met"))) if on]
    return (f"point {p['index']} {rate}: {p['requests_completed']}/{p['requests_sent']} ok, "
            f"achieved {p['achieved_rate']:.2f} req/s, "
            f"TTFT p50 {p.get('ttft_ms_p50', float('nan')):.0f}"
            f" ms, ITL p50 {p.get('itl_ms_p50', float('nan')):.1f} ms"
            + (f" [{', '.join(flags)}]" if flags else ""))


def run_profile(backend: Any, spec: Config, requests: list[Request], timer: PhaseTimer,
                points_out: list[dict[str, Any]] | None = None,
                ) -> tuple[list[RequestRecord], dict[str, float]]:
    """Warm up, run the profile's points, return (records, job metrics); the points go to
    ``points_out``. Same contract as ``experiment.measure``."""
    w = spec.workload
    with timer.phase("warmup"):
        for _ in range(w.warmup):
            backend.serve(requests[:1], spec.decoding, send_at=[0.0], concurrency=1,
                          timeout_s=w.request_timeout_s, max_new_tokens=w.max_new_tokens,
                          fixed_length=w.fixed_length)
    run = ProfileRunner(backend, spec, requests)
    answer: float | None = None
    with timer.phase("generate"), PeakRSSSampler(spec.measure.rss_sample_interval_s,
                                                 extra_pids=backend.child_pids) as mem:
        t0 = clock()
        if w.profile == "sweep":
            run.sweep()
        elif w.profile == "ramp":
            run.ramp()
        elif w.profile == "slo_search":
            answer = run.slo_search()
        elif w.profile == "trace":
            run.trace()
        else:
            raise ValueError(f"workload.profile={w.profile!r}: no points to run")
        wall = clock() - t0
    metrics = pts.summary_metrics(run.points, w.profile, answer)
    if w.profile == "trace":  # one point: the job's latencies, as a fixed job logs them
        metrics.update(performance.latency_metrics(run.records))
        metrics.update(performance.schedule_metrics(run.records))
    if "max_rate_under_slo" in metrics:
        print(f"max_rate_under_slo {metrics['max_rate_under_slo']:.2f} req/s (achieved; "
              f"TTFT/E2EL SLOs judged from the {run.slo_dialect} on open-loop points)",
              flush=True)
    metrics["measured_wall_s"] = wall
    metrics["peak_rss_bytes"] = float(mem.peak_bytes)
    if points_out is not None:
        points_out.extend(run.points)
    return run.records, metrics
