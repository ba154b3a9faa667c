"""The report's serving curves: jobs that ran a load profile (``JobResult.load_points``,
read from each run's results.json artifact in MLflow, like the per-request latencies).

One figure, four panels: TTFT, ITL and E2EL (p50 solid, p99 dashed) against the achieved
request rate, and goodput against the offered rate, one colour per job, with the SLO lines
and the knee. Saturated points are triangles, invalid ones (see
``pipeline/serving/points.py``) crosses, so a doubtful point is seen, not averaged away.

The knee: the open-loop point with the highest achieved rate among those that kept up
(achieved >= 90% of offered), not saturated and valid (the ``sync`` point if none did; the
closed-loop ``max`` point is a ceiling, not a sustainable load). Beyond it more offered
load buys latency, not throughput.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from pipeline.report.collect import SweepData
from pipeline.report.figures import colour, png

IMAGE = "serving_curves"
CAPTION = ("Latency against achieved request rate (p50 solid, p99 dashed) and goodput "
           "against offered rate, one colour per job; SLOs dotted, the knee ringed, "
           "saturated points ▲, invalid points ✕.")
#: panel -> (latency key stem, SLO key in the workload config shown on it)
PANELS = (("TTFT", "ttft", "slo_ttft_ms"), ("ITL", "itl", "slo_tpot_ms"),
          ("E2EL", "e2el", "slo_e2el_ms"))
KEEP_UP = 0.9


def curves(data: SweepData) -> list[dict[str, Any]]:
    """The jobs with load points: label, colour index, points, the workload's SLOs."""
    out = []
    for i, j in enumerate(data.jobs):
        res = j.results or {}
        pts = res.get("load_points") or []
        if pts:
            w = (res.get("config") or {}).get("workload") or {}
            out.append({"label": f"{j.job}: {w.get('profile', '?')}", "index": i,
                        "points": pts, "slo": {k: w.get(k) for _, _, k in PANELS}})
    return out


def knee(points: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """See the module docstring."""
    kept = [p for p in points if p.get("valid") and not p.get("saturated")
            and p.get("offered_rate") is not None
            and p["achieved_rate"] >= KEEP_UP * p["offered_rate"]]
    if not kept:  # no open-loop point kept up: the sync point is all the server sustains
        kept = [p for p in points if p.get("kind") == "sync" and p.get("valid")]
    return max(kept, key=lambda p: p["achieved_rate"], default=None)


def _load_order(p: Mapping[str, Any]) -> tuple[int, float]:
    rank = {"sync": 0, "max": 2}.get(p.get("kind", ""), 1)
    return rank, float(p.get("offered_rate") or 0.0)


def _marker(p: Mapping[str, Any]) -> str:
    return "x" if not p.get("valid") else "^" if p.get("saturated") else "o"


def figure(cs: Sequence[Mapping[str, Any]]) -> bytes:
    """The four-panel PNG."""
    fig = Figure(figsize=(13, 9))
    axes = [fig.add_subplot(2, 2, n + 1) for n in range(4)]
    for c in cs:
        col = colour(int(c["index"]))
        # in order of load: sync, the open-loop rates, the closed-loop max
        pts = sorted(c["points"], key=_load_order)
        k = knee(pts)
        for ax, (name, stem, slo_key) in zip(axes, PANELS, strict=False):
            for q, style in (("p50", "-"), ("p99", "--")):
                xy = [(p["achieved_rate"], p.get(f"{stem}_ms_{q}")) for p in pts]
                xy = [(x, y) for x, y in xy if y is not None]
                if not xy:
                    continue
                ax.plot(*zip(*xy, strict=True), style, color=col, lw=1.2,
                        label=f"{c['label']} {q}")
                for p in pts:
                    if p.get(f"{stem}_ms_{q}") is not None:
                        ax.scatter([p["achieved_rate"]], [p[f"{stem}_ms_{q}"]],
                                   marker=_marker(p), color=col, zorder=3)
            if k is not None and k.get(f"{stem}_ms_p99") is not None:
                ax.scatter([k["achieved_rate"]], [k[f"{stem}_ms_p99"]], s=220,
                           facecolors="none", edgecolors="black", lw=1.5, zorder=4)
            if c["slo"].get(slo_key):
                ax.axhline(float(c["slo"][slo_key]), ls=":", color=col, lw=1)
            ax.set_title(f"{name} vs achieved rate")
            ax.set_xlabel("achieved requests/s")
            ax.set_ylabel(f"{name} (ms, lower is better)")
        ax = axes[3]
        rated = sorted((p for p in c["points"] if p.get("offered_rate") is not None),
                       key=lambda p: p["offered_rate"])
        gp = [(p["offered_rate"], p["goodput_requests_per_s"]) for p in rated
              if p.get("goodput_requests_per_s") is not None]
        if gp:
            ax.plot(*zip(*gp, strict=True), "-", color=col, label=c["label"])
            for p in rated:
                if p.get("goodput_requests_per_s") is not None:
                    ax.scatter([p["offered_rate"]], [p["goodput_requests_per_s"]],
                               marker=_marker(p), color=col, zorder=3)
        if k is not None and k.get("offered_rate") is not None and \
                k.get("goodput_requests_per_s") is not None:
            ax.scatter([k["offered_rate"]], [k["goodput_requests_per_s"]], s=220,
                       facecolors="none", edgecolors="black", lw=1.5, zorder=4)
    ax = axes[3]
    lim = max((p["offered_rate"] for c in cs for p in c["points"]
               if p.get("offered_rate") is not None), default=1.0)
    ax.plot([0, lim], [0, lim], ":", color="grey", lw=1, label="goodput = offered")
    ax.set_title("Goodput vs offered rate")
    ax.set_xlabel("offered requests/s")
    ax.set_ylabel("requests/s meeting every SLO (higher is better)")
    for a in axes:
        a.grid(alpha=0.3)
        a.set_xlim(left=0)
        a.set_ylim(bottom=0)
        if a.get_legend_handles_labels()[0]:
            a.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return png(fig)


def table(cs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per point: what was offered and achieved, the latencies, the verdicts."""
    rows = []
    for c in cs:
        k = knee(c["points"])
        for p in c["points"]:
            def f(key: str, fmt: str = "{:.0f}", p: Mapping[str, Any] = p) -> str:
                v = p.get(key)
                return "-" if v is None else fmt.format(v)

            flags = [x for x, on in (("knee", p is k), ("saturated", p.get("saturated")),
                                     ("slo ok", p.get("slo_met"))) if on]
            if not p.get("valid"):
                flags.append("INVALID: " + "; ".join(p.get("invalid_reasons") or []))
            rows.append({
                "job": c["label"], "point": p["index"], "kind": p["kind"],
                "offered req/s": f("offered_rate", "{:.2f}"),
                "realized req/s": f("offered_rate_realized", "{:.2f}"),
                "achieved req/s": f("achieved_rate", "{:.2f}"),
                "sent/ok": f"{p['requests_sent']}/{p['requests_completed']}",
                "TTFT p50/p99 ms": f"{f('ttft_ms_p50')}/{f('ttft_ms_p99')}",
                "ITL p50/p99 ms": f"{f('itl_ms_p50', '{:.1f}')}/{f('itl_ms_p99', '{:.1f}')}",
                "E2EL p50/p99 ms": f"{f('e2el_ms_p50')}/{f('e2el_ms_p99')}",
                "TTFT sched p99 ms": f("ttft_sched_ms_p99"),
                "lag p99 ms": f("dispatch_lag_ms_p99", "{:.1f}"),
                "goodput req/s": f("goodput_requests_per_s", "{:.2f}"),
                "KV max %": f("engine_kv_cache_usage_max", "{:.1%}").rstrip("%"),
                "waiting max": f("engine_requests_waiting_max"),
                "client CPU %": f("client_cpu_percent"),
                "flags": ", ".join(flags),
            })
    return pd.DataFrame(rows)


def images(data: SweepData) -> dict[str, bytes]:
    """``{IMAGE: png}`` when a job ran a load profile, else nothing."""
    cs = curves(data)
    return {IMAGE: figure(cs)} if cs else {}


def sections(data: SweepData) -> list[tuple[str, list[tuple[str, Any, str]]]]:
    """The report section as (title, [(block kind, value, caption)]); render wraps it."""
    cs = curves(data)
    if not cs:
        return []
    return [("Serving curves", [
        ("text", "Jobs that ran a load profile (`workload.profile`); one row per load "
                 "point. TTFT/ITL/E2EL from the actual send (vLLM's convention), TTFT sched "
                 "from the scheduled send (MLPerf's); lag = how late requests were sent. "
                 "The knee is the highest achieved rate among open-loop points that kept "
                 "up (achieved ≥ 90% of offered), valid and not saturated.", ""),
        ("image", IMAGE, CAPTION),
        ("table", table(cs), ""),
    ])]
