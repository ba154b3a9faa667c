"""Load profiles: which load points a job runs, in which order (``workload.profile``).

A *point* is one stretch of load: closed-loop (``sync``: one request at a time; ``max``:
every request at once) or open-loop at an offered request rate. This module only plans:
the rates, the SLO search and the over-saturation rule are pure functions of what was
measured, so they are tested without a server; :mod:`pipeline.serving.runner` runs them.

- ``fixed``: today's single phase (``experiment.measure``), no points.
- ``sweep``: ``sync``, then ``max``, then ``sweep_points`` rates spaced linearly from the
  sync throughput (excluded: it was just measured) up to the max throughput (included:
  open-loop at the closed-loop ceiling is where saturation shows), GuideLLM-style.
- ``slo_search``: ``sync`` and ``max`` as above, then bracket the highest rate whose SLOs
  hold at ``slo_percentile`` (start at the max throughput; double while it passes, halve
  while it fails), then bisect until ``(hi - lo) / lo <= search_tolerance``, within
  ``max_points`` points in all. The search steers by offered rates; the answer is the
  highest *achieved* rate among the passing points (a capacity is what was delivered).
- ``ramp``: ``sweep_points`` rates rising linearly from ``ramp_start_rate`` (default
  ``ramp_end_rate / sweep_points``) to ``ramp_end_rate``, stopping after the first
  saturated point (the load beyond it would only queue).

Nothing here imports more than the standard library: validation runs it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipeline.config import fail

if TYPE_CHECKING:
    from pipeline.config import Config, WorkloadConfig


def check_profile(spec: Config, online: bool) -> None:
    """Refuse a load profile on an offline backend, before anything loads: an offline
    backend runs batches through ``generate()`` and has no arrival schedule to vary."""
    p = spec.workload.profile
    if p != "fixed" and not online:
        fail("workload.profile", p,
             f"backend {spec.backend.name} is offline (it generates in batches, with no "
             f"request rate to vary); load profiles need an online backend (a server, one "
             f"with serve()), or use workload.profile=fixed")


# ----------------------------------------------------------------------------- rates


def sweep_rates(sync_rate: float, max_rate: float, points: int) -> list[float]:
    """``points`` rates from just above ``sync_rate`` up to ``max_rate`` inclusive,
    linearly spaced (``sync_rate`` itself was measured closed-loop already). Rates are
    requests/s; a max below sync (no gain from batching) gives a flat sweep at sync."""
    top = max(max_rate, sync_rate)
    step = (top - sync_rate) / points
    if step <= 0:
        return [sync_rate] * points
    return [sync_rate + step * (i + 1) for i in range(points)]


def ramp_rates(w: WorkloadConfig) -> list[float]:
    """``sweep_points`` rates rising linearly from ``ramp_start_rate`` to ``ramp_end_rate``."""
    end = float(w.ramp_end_rate or 0.0)
    n = w.sweep_points
    start = float(w.ramp_start_rate) if w.ramp_start_rate is not None else end / n
    if n == 1:
        return [end]
    return [start + (end - start) * i / (n - 1) for i in range(n)]


@dataclass
class SloSearch:
    """Bracket, then bisect, the highest request rate whose SLOs hold.

    ``next_rate()`` gives the rate to try (None: done); ``record(rate, passed)`` feeds
    back each point's verdict. ``lo`` is the highest rate seen to pass, ``hi`` the lowest
    seen to fail. The bracket starts at ``start`` (the measured max throughput): while it
    passes the rate doubles, while it fails it halves; then the midpoint until the
    relative gap ``(hi - lo) / lo`` is within ``tolerance``. ``budget`` bounds the points.
    """

    start: float
    tolerance: float
    budget: int
    lo: float | None = None
    hi: float | None = None
    tried: int = 0

    def next_rate(self) -> float | None:
        if self.tried >= self.budget or self.converged:
            return None
        if self.lo is None and self.hi is None:
            return self.start
        if self.hi is None:
            assert self.lo is not None
            return self.lo * 2.0
        if self.lo is None:
            return self.hi / 2.0
        return (self.lo + self.hi) / 2.0

    @property
    def converged(self) -> bool:
        return (self.lo is not None and self.hi is not None
                and (self.hi - self.lo) / self.lo <= self.tolerance)

    def record(self, rate: float, passed: bool) -> None:
        self.tried += 1
        if passed:
            self.lo = rate if self.lo is None else max(self.lo, rate)
        else:
            self.hi = rate if self.hi is None else min(self.hi, rate)

    @property
    def answer(self) -> float:
        """The highest rate seen to pass (0.0 when none did)."""
        return self.lo if self.lo is not None else 0.0


# ------------------------------------------------------------------- over-saturation


class Live(Protocol):
    """What the rule reads of each request (``pipeline.serving.client.LiveRequest``); seconds
    since the point's start, None for what has not happened yet."""

    due: float
    t_start: float | None
    t_first_token: float | None
    t_end: float | None


@dataclass
class SaturationRule:
    """Live over-saturation of an open-loop point: the server no longer keeps up, so the
    point is ended early (the post-hoc verdict, ``pipeline.serving.points.rate_verdict``,
    judges every point's whole span anyway; this rule only bounds the load).

    At each check (the client calls it every 0.25 s), with ``W = max(1 s, 16 / rate)``
    (long enough to expect 16 arrivals) and at least ``2 W`` into the point:

    1. *completions fall behind arrivals*: the requests completed in the trailing ``W``
       seconds are fewer than ``rate_ratio`` x the requests *scheduled* in a window as
       long, shifted back by those completions' median latency from their schedule. Like
       is compared with like (the same stretch of the schedule, seen at both ends), so a
       Poisson schedule's bursts do not read as a shortfall; past capacity the latency
       grows and the shifted window holds more arrivals than the server completed;
    2. *TTFT trends upward*, measured from the **scheduled** send (a request the client
       has not even sent yet counts with its wait so far, so a client-side queue cannot
       hide it): the median over the newest quarter of the requests due so far (at least
       4) is at least ``ttft_growth`` x the median of the first quarter.

    Both must hold at two consecutive checks, so one slow step cannot end a point.
    """

    offered_rate: float
    rate_ratio: float = 0.9
    ttft_growth: float = 2.0
    hits: int = 0
    last: str | None = None

    def __call__(self, live: Sequence[Live], elapsed: float) -> str | None:
        reason = self.check(live, elapsed)
        self.hits = self.hits + 1 if reason else 0
        self.last = reason
        return reason if self.hits >= 2 else None

    def check(self, live: Sequence[Live], elapsed: float) -> str | None:
        window = max(1.0, 16.0 / self.offered_rate)
        if elapsed < 2 * window:
            return None
        recent = [r for r in live if r.t_end is not None and r.t_end > elapsed - window]
        # nothing completed lately: compare with the window just before it
        shift = (statistics.median((r.t_end or 0.0) - r.due for r in recent) if recent
                 else window)
        due = sum(1 for r in live if elapsed - window - shift < r.due <= elapsed - shift)
        if due < 4 or len(recent) >= self.rate_ratio * due:
            return None
        waiting = sorted((r for r in live if r.due <= elapsed), key=lambda r: r.due)
        k = max(4, len(waiting) // 4)
        if len(waiting) < 2 * k:
            return None

        def waited(r: Live) -> float:
            end = r.t_first_token if r.t_first_token is not None else elapsed
            return end - r.due

        first = statistics.median(waited(r) for r in waiting[:k])
        newest = statistics.median(waited(r) for r in waiting[-k:])
        if newest < self.ttft_growth * max(first, 1e-3):
            return None
        return (f"saturated: completed {len(recent)} requests in the last {window:.1f} s "
                f"< {self.rate_ratio:g} x the {due} scheduled {shift:.2f} s before them "
                f"(offered {self.offered_rate:.2f} req/s), and TTFT from the schedule of the "
                f"newest {k} requests {newest * 1000:.0f} ms >= {self.ttft_growth:g} x the "
                f"first {k}'s {first * 1000:.0f} ms")


def point_size(w: WorkloadConfig, n_prompts: int, rate: float | None) -> int:
    """Requests scheduled for one point: ``point_requests`` (default: the prompt count);
    an open-loop point with ``point_duration_s`` schedules ``rate x duration`` (+1) and is
    stopped at the duration."""
    if rate is not None and w.point_duration_s is not None:
        return max(1, int(rate * w.point_duration_s) + 1)
    return w.point_requests or n_prompts
