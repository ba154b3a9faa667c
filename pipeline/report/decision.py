"""The report's decision section: which configuration of the sweep to pick, for speed, for
quality or for cost, and which ones no other configuration beats on all three.

Axes, per finished job:

- speed: ``max_rate_under_slo`` (req/s) where the jobs ran load profiles with SLOs, else
  output tokens/s (the mean over repeats where the workload repeated, with its 95% CI);
- quality: the task metric (a ``ref_*`` metric, higher is better) where jobs have one, else
  the gate's |perplexity change| against each optimized job's baseline (its baselines at 0),
  else greedy parity with the baseline, else perplexity under the scorer;
- cost: ``usd_per_million_output_tokens`` (``..._at_slo`` for load profiles) when priced.

The Pareto front holds the jobs no other job matches or beats on every axis and beats on
one. A job the gate judged ``degraded`` is drawn but never on the front nor recommended:
it is fast because it no longer computes the same model. Each recommendation says whether
it is "within noise" of others (their 95% CIs of output tok/s overlap) or a single
measurement (no CI to judge by).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from pipeline.analysis.gate_rules import NOT_TASK_METRICS
from pipeline.measure.energy import NOT_MEASURED
from pipeline.metrics.catalog import format_number
from pipeline.metrics.cost import COST_AT_SLO_KEY, COST_KEY, PRICE_PARAM, SOURCE_PARAM
from pipeline.report import noise
from pipeline.report.collect import JobRun, SweepData
from pipeline.report.figures import colour, png
from pipeline.report.render import Block, Section
from pipeline.report.table_model import short_label, varying_overrides

IMAGE = "decision_front"
CAPTION = ("Speed against quality, one point a job: the Pareto front (no other job at least "
           "as good on every axis and better on one) is ringed and joined; a red cross marks "
           "a job the gate judged degraded (never recommended).")
#: task metrics in the order a quality axis prefers them when jobs have several
REF_PREFERENCE = ("ref_pass_at_1", "ref_exact_match", "ref_f1", "ref_rougeL", "ref_chrf",
                  "ref_bleu")


@dataclass(frozen=True)
class Axis:
    """One decision axis: how it reads and each job's value (by run id)."""

    key: str
    label: str
    higher_is_better: bool
    values: Mapping[str, float]
    fmt: str = ".3g"


@dataclass
class Decision:
    """The section's content: axes, jobs on the front, the recommendations."""

    axes: list[Axis]
    front: dict[str, bool]
    degraded: set[str]
    picks: list[tuple[str, str, str]] = field(default_factory=list)  # objective, id, text


def pareto_front(points: Sequence[Sequence[float]], higher: Sequence[bool],
                 eligible: Sequence[bool] | None = None) -> list[bool]:
    """For each point (one value per axis; ``higher[k]``: larger is better on axis k):
    True when it is eligible and no other eligible point is at least as good on every axis
    and better on one. Equal points do not dominate each other (both stay on the front);
    an ineligible point is never on it and dominates nothing."""
    ok = list(eligible) if eligible is not None else [True] * len(points)

    def better_eq(a: float, b: float, hi: bool) -> bool:
        return a >= b if hi else a <= b

    out = []
    for i, p in enumerate(points):
        dominated = any(
            ok[j] and j != i
            and all(better_eq(q[k], p[k], higher[k]) for k in range(len(higher)))
            and any(q[k] != p[k] for k in range(len(higher)))
            for j, q in enumerate(points))
        out.append(ok[i] and not dominated)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def speed_axis(jobs: Sequence[JobRun]) -> tuple[Axis, dict[str, noise.Figure]]:
    """``max_rate_under_slo`` where a job has it, else output tok/s (repeat mean where
    logged); with the tok/s figures (value, CI) the noise notes use."""
    slo = {j.run_id: float(j.metrics["max_rate_under_slo"]) for j in jobs
           if _finite(j.metrics.get("max_rate_under_slo"))}
    if slo:
        return Axis("max_rate_under_slo", "max rate under SLO (req/s, higher is better)",
                    True, slo, ".2f"), {}
    figs = {j.run_id: f for j in jobs
            if (f := noise.figure(j.metrics, "output_tokens_per_s")) is not None}
    return Axis("output_tokens_per_s", "output tok/s (higher is better)", True,
                {k: f.value for k, f in figs.items()}, ".1f"), figs


def quality_axis(jobs: Sequence[JobRun]) -> Axis | None:
    """The quality axis (module doc: the order of preference); None when no job has any."""
    refs: dict[str, int] = {}
    for j in jobs:
        for k, v in j.metrics.items():
            if k.startswith("ref_") and k not in NOT_TASK_METRICS and _finite(v):
                refs[k] = refs.get(k, 0) + 1
    if refs:
        order = {k: i for i, k in enumerate(REF_PREFERENCE)}
        key = max(refs, key=lambda k: (refs[k], -order.get(k, len(order)), k))
        return Axis(key, f"task metric {key} (higher is better)", True,
                    {j.run_id: float(j.metrics[key]) for j in jobs
                     if _finite(j.metrics.get(key))})
    baselines = {j.tags["gate_baseline_job"] for j in jobs if j.tags.get("gate_baseline_job")}
    for key, label, hi, at_base in (
            ("gate.ppl_delta", "|perplexity change| vs the gate's baseline (lower is better)",
             False, 0.0),
            ("gate.exact_match_rate", "greedy parity with the gate's baseline (higher is "
                                      "better)", True, 1.0)):
        if any(_finite(j.metrics.get(key)) for j in jobs):
            vals = {j.run_id: (abs(float(j.metrics[key])) if not hi
                               else float(j.metrics[key]))
                    for j in jobs if _finite(j.metrics.get(key))}
            vals.update({j.run_id: at_base for j in jobs if str(j.job) in baselines})
            return Axis(key, label, hi, vals, ".2%")
    ppl = {j.run_id: float(j.metrics["perplexity"]) for j in jobs
           if _finite(j.metrics.get("perplexity"))}
    if ppl:
        return Axis("perplexity", "perplexity under the scorer (lower is better)", False, ppl,
                    ".3f")
    return None


def cost_axis(jobs: Sequence[JobRun], at_slo: bool) -> Axis | None:
    """Cost per million output tokens (at the SLO for load profiles); None unpriced."""
    key = COST_AT_SLO_KEY if at_slo else COST_KEY
    vals = {j.run_id: float(j.metrics[key]) for j in jobs if _finite(j.metrics.get(key))}
    if not vals:
        return None
    return Axis(key, "USD per million output tokens (lower is better)", False, vals, ".3f")


def decide(jobs: Sequence[JobRun], labels: Mapping[str, str] | None = None) -> Decision:
    """The axes, the front and the recommendations over the finished ``jobs``
    (``labels``: run id -> the job's swept overrides, named in the recommendations)."""
    labels = labels or {}
    speed, figs = speed_axis(jobs)
    axes = [a for a in (speed, quality_axis(jobs),
                        cost_axis(jobs, speed.key == "max_rate_under_slo")) if a is not None]
    degraded = {j.run_id for j in jobs if j.tags.get("gate_verdict") == "degraded"}
    ids = [j.run_id for j in jobs if all(j.run_id in a.values for a in axes)]
    on = pareto_front([[a.values[i] for a in axes] for i in ids],
                      [a.higher_is_better for a in axes], [i not in degraded for i in ids])
    d = Decision(axes, dict(zip(ids, on, strict=True)), degraded)
    cost = next((a for a in axes if a.key in (COST_KEY, COST_AT_SLO_KEY)), None)
    quality = next((a for a in axes if a is not speed and a is not cost), None)
    front = [i for i in ids if d.front[i]]
    names = {j.run_id: f"job {j.job}" for j in jobs}
    for objective, axis in (("fastest", speed), ("best quality", quality),
                            ("cheapest", cost)):
        if axis is None or not front:
            continue
        # ties on the objective go to the better figure on the other axes, in order
        best = max(front, key=lambda i, ax=axis: tuple(
            (1 if a.higher_is_better else -1) * a.values[i]
            for a in (ax, *(b for b in axes if b is not ax))))
        label = f" ({labels[best]})" if labels.get(best) else ""
        text = (f"{names[best]}{label} at "
                f"{format_number(axis.values[best], axis.fmt)} {axis.label.split(' (')[0]}")
        interval = _intervals(axis, figs)
        if not any(i != best and i not in degraded for i in ids):
            text += "; the only job to choose from"
        elif best in interval:
            near = [i for i in ids if i != best and i not in degraded and i in interval
                    and _overlap(interval[i], interval[best])]
            text += (f"; within noise of {', '.join(names[i] for i in near)} (95% CIs "
                     "overlap)" if near else "; ahead beyond noise (no 95% CI overlaps)")
        elif axis.key in ("output_tokens_per_s", COST_KEY):
            text += "; single measurement (no 95% CI: run with workload.repeats >= 2)"
        else:  # task metrics, perplexity, gate figures, load-profile rates: no CI logged
            text += "; single measurement (no 95% CI for this figure)"
        d.picks.append((objective, best, text))
    return d


def _intervals(axis: Axis, figs: Mapping[str, noise.Figure]) -> dict[str, tuple[float, float]]:
    """95% intervals on ``axis`` where the output tok/s has one: the tok/s interval itself,
    or for cost (price / tok/s) the cost scaled by the tok/s interval's relative width."""
    out: dict[str, tuple[float, float]] = {}
    for i, v in axis.values.items():
        f = figs.get(i)
        if f is None or f.ci95 is None or f.value <= 0:
            continue
        if axis.key == "output_tokens_per_s":
            out[i] = (f.value - f.ci95, f.value + f.ci95)
        elif axis.key == COST_KEY:
            r = f.ci95 / f.value
            out[i] = (v / (1 + r), v / (1 - r) if r < 1 else math.inf)
    return out


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def plot(points: Sequence[Mapping[str, Any]], xlabel: str, ylabel: str) -> bytes:
    """Speed (y) against quality (x), one labelled point a job; ``front`` points ringed and
    joined in quality order, ``degraded`` ones crossed in red. ``points``: dicts with
    ``label``, ``index``, ``x``, ``y``, ``front``, ``degraded``."""
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    for p in points:
        ax.scatter([p["x"]], [p["y"]], s=70, color=colour(int(p["index"])), edgecolor="black",
                   zorder=3)
        ax.annotate(str(p["label"]), (p["x"], p["y"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=9)
    front = sorted((p for p in points if p["front"]), key=lambda p: p["x"])
    if front:
        ax.plot([p["x"] for p in front], [p["y"] for p in front], "--", color="black", lw=1,
                zorder=2, label="Pareto front")
        ax.scatter([p["x"] for p in front], [p["y"] for p in front], s=220, facecolors="none",
                   edgecolors="black", lw=1.5, zorder=4)
    bad = [p for p in points if p["degraded"]]
    if bad:
        ax.scatter([p["x"] for p in bad], [p["y"] for p in bad], s=160, marker="x",
                   color="red", lw=2, zorder=5, label="degraded (gate)")
    if front or bad:
        ax.legend(loc="best", fontsize=9)
    if not points:
        ax.text(0.5, 0.5, "no job with both figures", ha="center", va="center",
                transform=ax.transAxes, color="grey")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("Speed vs quality")
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    return png(fig)


def _lines(jobs: Sequence[JobRun]) -> list[str]:
    """The cost and energy lines: the price and its source, the energy counter, or why
    there is none."""
    lines = []
    priced = [j for j in jobs if j.params.get(PRICE_PARAM)]
    if priced:
        prices = sorted({(j.params[PRICE_PARAM], j.params.get(SOURCE_PARAM, "")) for j in priced})
        lines.append("cost: priced at " + "; ".join(f"${p}/h ({s})" for p, s in prices)
                     + ": the hour is spread over the tokens each job produced, so a busy "
                       "machine is assumed")
    else:
        lines.append("cost: not priced (set `cost.usd_per_hour=<USD per hour>`, and "
                     "`cost.price_source=...`, to get USD per million output tokens)")
    sources = sorted({j.params.get("energy_source", "?") for j in jobs
                      if _finite(j.metrics.get("energy_j"))})
    if sources:
        lines.append(f"energy: measured by {', '.join(sources)} over the measured phase "
                     "(the whole device, not this model alone)")
    else:
        lines.append(NOT_MEASURED)
    return lines


def section(data: SweepData) -> tuple[Section, dict[str, bytes]] | None:
    """The "Which configuration?" section and its image; None when no job finished."""
    jobs = [j for j in data.jobs if j.status == "FINISHED"]
    if not jobs:
        return None
    over = varying_overrides(data.jobs)
    d = decide(jobs, over)
    idx = {j.run_id: i for i, j in enumerate(data.jobs)}
    rows = []
    for j in jobs:
        row: dict[str, Any] = {"job": j.job, "config": over[j.run_id]}
        for a in d.axes:
            row[a.label.split(" (")[0]] = format_number(a.values.get(j.run_id), a.fmt)
        if any(_finite(x.metrics.get("joules_per_output_token")) for x in jobs):
            row["J/out tok"] = format_number(j.metrics.get("joules_per_output_token"), ".3g")
        row["gate verdict"] = j.tags.get("gate_verdict", "-")
        row["on the front"] = ("degraded: never recommended" if j.run_id in d.degraded
                               else "yes" if d.front.get(j.run_id)
                               else "no" if j.run_id in d.front else "missing a figure")
        rows.append(row)
    text = ("Pareto front over " + ", ".join(a.label for a in d.axes) + ". A job is on the "
            "front when no other job is at least as good on every axis and better on one; "
            "jobs the gate judged degraded are shown but never recommended.")
    blocks = [Block("text", text),
              Block("list", [f"{o}: {t}" for o, _, t in d.picks] or
                    ["no recommendation: no job has every figure"]),
              Block("table", pd.DataFrame(rows)),
              Block("list", _lines(jobs))]
    images: dict[str, bytes] = {}
    if len(d.axes) > 1 and d.axes[1].key not in (COST_KEY, COST_AT_SLO_KEY):
        speed, quality = d.axes[0], d.axes[1]
        pts = [{"label": short_label(j, over[j.run_id]), "index": idx[j.run_id],
                "x": quality.values[j.run_id], "y": speed.values[j.run_id],
                "front": d.front.get(j.run_id, False), "degraded": j.run_id in d.degraded}
               for j in jobs if j.run_id in quality.values and j.run_id in speed.values]
        images[IMAGE] = plot(pts, quality.label, speed.label)
        blocks.insert(3, Block("image", IMAGE, CAPTION))
    return Section("Which configuration?", blocks), images
