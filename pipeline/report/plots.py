"""PNG plots for the sweep report (matplotlib, Agg canvas; no pyplot global state).

:func:`plot_images` turns the report's raw tables and request timings into plain points;
each figure function takes those points and returns PNG bytes, so the caller decides where
they are written or embedded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter

from pipeline.metrics.catalog import missing
from pipeline.report import lengths, serving
from pipeline.report.collect import SweepData
from pipeline.report.figures import colour, png
from pipeline.report.tables import (
    LATENCY_AXES,
    Table,
    flag,
    request_latencies,
    short_label,
    varying_overrides,
)

# Captions of the report's figures, by image name.
CAPTIONS = {
    "quality_vs_diversity": "Quality vs diversity: perplexity against self-BLEU, one point a job.",
    "throughput_vs_latency": "Output tokens/s against mean E2EL and mean TTFT; the Pareto "
                             "front (no job is both faster and lower-latency) is ringed.",
    "latency_distributions": "Per-request latencies (the first measured repeat of each job, "
                             "from its results.json in MLflow).",
    **lengths.CAPTIONS,
}
LATENCY_LABELS = {"e2el_ms_mean": "mean E2EL (ms, lower is better)",
                  "ttft_ms_mean": "mean TTFT (ms, lower is better)"}


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this sweep", ha="center", va="center",
            transform=ax.transAxes, color="grey")


def quality_vs_diversity(points: Sequence[Mapping[str, Any]]) -> bytes:
    """Perplexity against self-BLEU, one labelled point per job.

    ``points``: dicts with ``label``, ``index`` (colour), ``self_bleu``, ``perplexity``.
    """
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    pts = [p for p in points if p.get("self_bleu") is not None
           and p.get("perplexity") is not None]
    for p in pts:
        ax.scatter([p["self_bleu"]], [p["perplexity"]], s=70, color=colour(int(p["index"])),
                   edgecolor="black", zorder=3)
        ax.annotate(str(p["label"]), (p["self_bleu"], p["perplexity"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=9)
    if not pts:
        _empty(ax, "perplexity / self-BLEU")
    ax.set_xlabel("self-BLEU (lower = more diverse across prompts)")
    ax.set_ylabel("perplexity under the scorer (lower = more likely)")
    ax.set_title("Quality vs diversity")
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    return png(fig)


def throughput_vs_latency(points: Sequence[Mapping[str, Any]],
                          latencies: Sequence[tuple[str, str]]) -> bytes:
    """Output tokens/s against each latency in ``latencies`` ((key, axis label) pairs), one
    panel each, with the Pareto front (``front_<key>`` True) joined and ringed."""
    fig = Figure(figsize=(6.0 * len(latencies), 5))
    for n, (key, xlabel) in enumerate(latencies):
        ax = fig.add_subplot(1, len(latencies), n + 1)
        pts = [p for p in points if p.get(key) is not None
               and p.get("output_tokens_per_s") is not None]
        for p in pts:
            ax.scatter([p[key]], [p["output_tokens_per_s"]], s=70,
                       color=colour(int(p["index"])), edgecolor="black", zorder=3)
            ax.annotate(str(p["label"]), (p[key], p["output_tokens_per_s"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=9)
        front = sorted((p for p in pts if p.get(f"front_{key}")),
                       key=lambda p: float(p[key]))
        if front:
            xs = [float(p[key]) for p in front]
            ys = [float(p["output_tokens_per_s"]) for p in front]
            ax.plot(xs, ys, "--", color="black", lw=1, zorder=2, label="Pareto front")
            ax.scatter(xs, ys, s=220, facecolors="none", edgecolors="black", lw=1.5, zorder=4)
            ax.legend(loc="best", fontsize=9)
        if not pts:
            _empty(ax, "throughput / latency")
        if pts:  # from 0 (margins would show negative latencies), room for the labels
            ax.set_xlim(0, 1.15 * max(float(p[key]) for p in pts) or 1)
            ax.set_ylim(0, 1.15 * max(float(p["output_tokens_per_s"]) for p in pts) or 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("output tokens/s (higher is better)")
        ax.set_title(f"Throughput vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.margins(0.2)
    fig.tight_layout()
    return png(fig)


def latency_distributions(series: Sequence[Mapping[str, Any]]) -> bytes:
    """Per-request E2EL and TTFT (ms) per job: a box plot with the requests overlaid.

    ``series``: dicts with ``label``, ``index``, ``e2el_ms`` and ``ttft_ms`` (lists).
    """
    fig = Figure(figsize=(max(7.0, 1.6 * len(series) + 3), 8.5))
    for n, (key, title) in enumerate((("e2el_ms", "End-to-end latency per request"),
                                      ("ttft_ms", "Time to first token per request"))):
        ax = fig.add_subplot(2, 1, n + 1)
        data = [(s, [float(v) for v in s.get(key) or []]) for s in series]
        data = [(s, v) for s, v in data if v]
        if data:
            pos = list(range(1, len(data) + 1))
            box = ax.boxplot([v for _, v in data], positions=pos, widths=0.5,
                             patch_artist=True, showmeans=True, showfliers=False,
                             meanprops={"marker": "D", "markerfacecolor": "white",
                                        "markeredgecolor": "black", "markersize": 6},
                             medianprops={"color": "black"})
            for patch, (s, _) in zip(box["boxes"], data, strict=True):
                patch.set_facecolor(colour(int(s["index"])))
                patch.set_alpha(0.45)
            for x, (s, v) in zip(pos, data, strict=True):
                # a deterministic spread, so identical values stay visible side by side
                k = len(v)
                xs = [x - 0.15 + 0.3 * (i / (k - 1) if k > 1 else 0.5) for i in range(k)]
                ax.scatter(xs, v, s=14, color=colour(int(s["index"])),
                           edgecolor="black", lw=0.4, zorder=3)
            ax.set_xticks(pos, [str(s["label"]) for s, _ in data], rotation=15, ha="right",
                          fontsize=9)
            lo = min(min(v) for _, v in data)
            hi = max(max(v) for _, v in data)
            if lo > 0 and hi / lo > 20:  # one slow job would squash the others flat
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            _empty(ax, "per-request timings")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return png(fig)


def scaling(series: Sequence[Mapping[str, Any]], metric: lengths.ScalingMetric,
            xlabel: str) -> bytes:
    """One scaling figure: ``metric`` against length on a log-2 x axis, one line per
    configuration.

    ``series``: dicts with ``label``, ``index`` (colour) and ``points`` ((length, value)
    pairs; a None value is left out).
    """
    fig = Figure(figsize=(7.5, 5))
    ax = fig.add_subplot()
    ticks: set[int] = set()
    low = 0.0
    for s in series:
        pts = sorted((int(x), float(y)) for x, y in s["points"] if y is not None)
        if not pts:
            continue
        ticks.update(x for x, _ in pts)
        low = min(low, *(y for _, y in pts))
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=colour(int(s["index"])),
                markeredgecolor="black", label=str(s["label"]))
    if ticks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.xaxis.set_minor_locator(NullLocator())
        if low == 0:  # from 0, unless a figure is negative (memory freed after load)
            ax.set_ylim(bottom=0)
        ax.legend(loc="best", fontsize=9)
    else:
        _empty(ax, metric.title.lower())
    ax.set_xlabel(f"{xlabel} (log scale)")
    ax.set_ylabel(metric.ylabel)
    ax.set_title(f"{metric.title} against {xlabel}")
    ax.grid(alpha=0.3)
    return png(fig)


def scaling_series(frame: Any) -> list[tuple[lengths.ScalingMetric, list[dict[str, Any]], str]]:
    """Per scaling figure of a ``scaling`` table's frame: its metric, one series per
    configuration and the x label; none when no length varies."""
    metrics = lengths.scaling_images(frame)
    if not metrics:
        return []
    rows = frame.to_dict("records")
    xlabel = lengths.LENGTH_WORDS[rows[0]["length_param"]]
    out = []
    for m in metrics:
        series: dict[int, dict[str, Any]] = {}
        for r in rows:
            s = series.setdefault(int(r["index"]), {"label": r["config"],
                                                    "index": r["index"], "points": []})
            s["points"].append((r["length"], _val(r.get(m.key))))
        out.append((m, list(series.values()), xlabel))
    return out


def scaling_plots(frame: Any) -> dict[str, bytes]:
    """The scaling figures (image name -> PNG) of a ``scaling`` table's frame; none when no
    length varies."""
    return {m.image: scaling(series, m, xlabel) for m, series, xlabel in scaling_series(frame)}


def _val(v: Any) -> float | None:
    return None if missing(v) else float(v)


def plot_inputs(data: SweepData, tables: Mapping[str, Table]) -> dict[str, Any]:
    """The points every figure is drawn from (the PNGs here, the interactive plots in
    :mod:`pipeline.report.interactive`): ``quality`` and ``throughput`` points, the
    ``latency_axes`` of the Pareto table and the per-request ``latency`` series."""
    over = varying_overrides(data.jobs)
    idx = {j.job: i for i, j in enumerate(data.jobs)}
    label = {j.job: short_label(j, over[j.run_id]) for j in data.jobs}
    qd = [{"label": label[r["job"]], "index": idx[r["job"]],
           "self_bleu": _val(r.get("self_bleu")), "perplexity": _val(r.get("perplexity"))}
          for r in tables["jobs"].frame.to_dict("records")]
    par = tables["pareto"].frame
    lat_axes = [(k, LATENCY_LABELS[k]) for k in LATENCY_AXES if k in par.columns]
    tl = []
    for r in par.to_dict("records"):
        p: dict[str, Any] = {"label": label[r["job"]], "index": idx[r["job"]],
                             "output_tokens_per_s": _val(r["output_tokens_per_s"])}
        for k, _ in lat_axes:
            p[k] = _val(r[k])
            p[f"front_{k}"] = flag(r[f"front_{k}"])
        tl.append(p)
    series = []
    for j in data.jobs:
        e2el, ttft = request_latencies(j.results)
        series.append({"label": label[j.job], "index": idx[j.job], "e2el_ms": e2el,
                       "ttft_ms": ttft})
    return {"quality": qd, "throughput": tl,
            "latency_axes": lat_axes or [("e2el_ms_mean", "mean E2EL (ms)")],
            "latency": series}


def plot_images(data: SweepData, tables: Mapping[str, Table]) -> dict[str, bytes]:
    """The report's PNGs (name -> bytes), drawn from the tables and the request timings."""
    pts = plot_inputs(data, tables)
    return {
        "quality_vs_diversity": quality_vs_diversity(pts["quality"]),
        "throughput_vs_latency": throughput_vs_latency(pts["throughput"], pts["latency_axes"]),
        "latency_distributions": latency_distributions(pts["latency"]),
        **(scaling_plots(tables["scaling"].frame) if "scaling" in tables else {}),
        **serving.images(data),  # load-profile curves, when a job ran one
    }
