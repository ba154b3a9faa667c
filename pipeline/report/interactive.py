"""Interactive versions of the report's plots for report.html (plotly: hover values, click
a legend entry to hide or show a series), drawn from the same points as the PNGs.

report.md keeps the PNGs. report.html stays one self-contained file: plotly.js is inlined
once, with the first figure (:func:`figure_html`), and every later figure reuses it. When
plotly is not installed :func:`figures` returns nothing and the HTML embeds the PNGs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.report import lengths
from pipeline.report.collect import SweepData
from pipeline.report.figures import colour
from pipeline.report.plots import plot_inputs, scaling_series
from pipeline.report.tables import Table

HEIGHT = 480


def available() -> bool:
    """Whether plotly can be imported (the HTML falls back to PNGs otherwise)."""
    try:
        import plotly.graph_objects  # noqa: F401
    except ImportError:
        return False
    return True


def _layout(fig: Any, title: str, height: int = HEIGHT) -> Any:
    fig.update_layout(title=title, template="plotly_white", height=height,
                      hovermode="closest", legend={"title": {"text": "click to hide/show"}},
                      margin={"l": 60, "r": 20, "t": 60, "b": 50})
    return fig


def quality_vs_diversity(points: Sequence[Mapping[str, Any]]) -> Any:
    """Perplexity against self-BLEU, one trace (legend entry) per job."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for p in points:
        if p.get("self_bleu") is None or p.get("perplexity") is None:
            continue
        fig.add_trace(go.Scatter(
            x=[p["self_bleu"]], y=[p["perplexity"]], mode="markers+text", name=str(p["label"]),
            text=[str(p["label"])], textposition="top right",
            marker={"size": 12, "color": colour(int(p["index"])), "line": {"width": 1}},
            hovertemplate="%{text}<br>self-BLEU %{x:.3f}<br>perplexity %{y:.3f}<extra></extra>"))
    fig.update_xaxes(title="self-BLEU (lower = more diverse across prompts)")
    fig.update_yaxes(title="perplexity under the scorer (lower = more likely)")
    return _layout(fig, "Quality vs diversity")


def throughput_vs_latency(points: Sequence[Mapping[str, Any]],
                          latencies: Sequence[tuple[str, str]]) -> Any:
    """Output tokens/s against each latency, one panel each; a job's markers share one
    legend entry across panels, the Pareto front is a dashed line per panel."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(latencies),
                        subplot_titles=[f"Throughput vs {lab.split(' (')[0]}"
                                        for _, lab in latencies])
    for n, (key, xlabel) in enumerate(latencies, start=1):
        pts = [p for p in points if p.get(key) is not None
               and p.get("output_tokens_per_s") is not None]
        for p in pts:
            fig.add_trace(go.Scatter(
                x=[p[key]], y=[p["output_tokens_per_s"]], mode="markers", name=str(p["label"]),
                legendgroup=str(p["label"]), showlegend=n == 1,
                marker={"size": 12, "color": colour(int(p["index"])), "line": {"width": 1}},
                hovertemplate=(f"{p['label']}<br>{xlabel.split(' (')[0]} %{{x:.1f}} ms"
                               "<br>%{y:.2f} tok/s<extra></extra>")), row=1, col=n)
        front = sorted((p for p in pts if p.get(f"front_{key}")), key=lambda p: float(p[key]))
        if front:
            fig.add_trace(go.Scatter(
                x=[p[key] for p in front], y=[p["output_tokens_per_s"] for p in front],
                mode="lines+markers", name="Pareto front", legendgroup="front",
                showlegend=n == 1, line={"dash": "dash", "color": "black", "width": 1},
                marker={"symbol": "circle-open", "size": 22, "color": "black",
                        "line": {"width": 1.5}}, hoverinfo="skip"),
                row=1, col=n)
        fig.update_xaxes(title=xlabel, rangemode="tozero", row=1, col=n)
        fig.update_yaxes(title="output tokens/s (higher is better)", rangemode="tozero",
                         row=1, col=n)
    return _layout(fig, "Throughput vs latency")


def latency_distributions(series: Sequence[Mapping[str, Any]]) -> Any:
    """Per-request E2EL (top) and TTFT (bottom) per job: box plots with every request."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, subplot_titles=(
        "End-to-end latency per request", "Time to first token per request"))
    for n, key in enumerate(("e2el_ms", "ttft_ms"), start=1):
        for s in series:
            vals = [float(v) for v in s.get(key) or []]
            if not vals:
                continue
            fig.add_trace(go.Box(
                y=vals, name=str(s["label"]), legendgroup=str(s["label"]), showlegend=n == 1,
                boxpoints="all", jitter=0.3, boxmean=True,
                marker={"color": colour(int(s["index"]))},
                hovertemplate="%{y:.0f} ms<extra>" + str(s["label"]) + "</extra>"),
                row=n, col=1)
        fig.update_yaxes(title="ms", row=n, col=1)
    return _layout(fig, "Per-request latency", height=2 * HEIGHT)


def scaling(series: Sequence[Mapping[str, Any]], metric: lengths.ScalingMetric,
            xlabel: str) -> Any:
    """``metric`` against length (log-2 axis), one line (legend entry) per configuration."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for s in series:
        pts = sorted((int(x), float(y)) for x, y in s["points"] if y is not None)
        if pts:
            fig.add_trace(go.Scatter(
                x=[x for x, _ in pts], y=[y for _, y in pts], mode="lines+markers",
                name=str(s["label"]), marker={"color": colour(int(s["index"]))},
                hovertemplate=f"{s['label']}<br>%{{x}}: %{{y:.2f}}<extra></extra>"))
    fig.update_xaxes(title=f"{xlabel} (log scale)", type="log", dtick=0.30103)
    fig.update_yaxes(title=metric.ylabel, rangemode="tozero")
    return _layout(fig, f"{metric.title} against {xlabel}")


def figure_html(fig: Any, name: str, first: bool) -> str:
    """A figure as an HTML fragment; ``first`` inlines plotly.js (once per page)."""
    return str(fig.to_html(full_html=False, include_plotlyjs=bool(first), div_id=f"plot-{name}",
                           default_height=f"{fig.layout.height or HEIGHT}px",
                           config={"displaylogo": False, "responsive": True}))


def figures(data: SweepData, tables: Mapping[str, Table]) -> dict[str, Any]:
    """Interactive figures by image name (the PNG each replaces in report.html); empty
    without plotly. Plots with no interactive version (serving's load curves) keep the PNG."""
    if not available():
        return {}
    pts = plot_inputs(data, tables)
    out = {
        "quality_vs_diversity": quality_vs_diversity(pts["quality"]),
        "throughput_vs_latency": throughput_vs_latency(pts["throughput"], pts["latency_axes"]),
        "latency_distributions": latency_distributions(pts["latency"]),
    }
    if "scaling" in tables:
        for m, series, xlabel in scaling_series(tables["scaling"].frame):
            out[m.image] = scaling(series, m, xlabel)
    return out
