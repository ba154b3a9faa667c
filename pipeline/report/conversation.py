"""The report's conversation section: does a growing conversation slow the first token?

Jobs whose requests are turns of multi-turn conversations (records with ``extra.turn``,
read from each run's results.json artifact in MLflow, like the per-request latencies) get
one figure, two panels: TTFT p50 against the turn, and the mean prompt tokens against the
turn (the history each turn resends), with the tokens the server's prefix cache served
dashed where it reports them; one line per job, labelled and coloured as in the other
plots. A table per job gives the turn rows of :func:`pipeline.metrics.turns.turn_table`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from pipeline.metrics.catalog import format_number
from pipeline.metrics.turns import RATIO_KEY, last_turn_over_first, turn_table
from pipeline.report.collect import SweepData
from pipeline.report.figures import colour, png
from pipeline.report.render import Block, Section
from pipeline.report.table_model import short_label, varying_overrides

TITLE = "Does a growing conversation slow the first token?"
IMAGE = "conversation_turns"
CAPTION = ("TTFT p50 against the turn of the conversation, and the mean prompt tokens each "
           "turn sends (the whole history so far; dashed: served from the server's prefix "
           "cache, where it reports them), one colour per job.")
#: the sections the conversation section follows (the last of them present)
AFTER = ("Per-request latency", "Serving curves")
#: table column -> (turn row key, format)
COLUMNS = (("ok", "requests", ".0f"), ("errors", "errors", ".0f"),
           ("TTFT p50 ms", "ttft_ms_p50", ".0f"), ("TTFT p99 ms", "ttft_ms_p99", ".0f"),
           ("TTFT mean ms", "ttft_ms_mean", ".0f"), ("E2EL p50 ms", "e2el_ms_p50", ".0f"),
           ("prompt tokens", "prompt_tokens_mean", ".1f"),
           ("cached tokens", "cached_prompt_tokens_mean", ".1f"),
           ("uncached tokens", "uncached_prompt_tokens_mean", ".1f"))


def series(data: SweepData) -> list[dict[str, Any]]:
    """The jobs with turn records: label, colour index and turn table, in job order."""
    over = varying_overrides(data.jobs)
    out = []
    for i, j in enumerate(data.jobs):
        table = turn_table((j.results or {}).get("requests") or [])
        if table:
            out.append({"label": short_label(j, over[j.run_id]), "index": i, "turns": table})
    return out


def _line(ax: Any, rows: Sequence[Mapping[str, float]], key: str, style: str, col: str,
          label: str) -> None:
    xy = [(int(r["turn"]), float(r[key])) for r in rows if key in r]
    if xy:
        ax.plot(*zip(*xy, strict=True), style, marker="o", color=col,
                markeredgecolor="black", label=label)


def figure(ss: Sequence[Mapping[str, Any]]) -> bytes:
    """The two-panel PNG: TTFT p50 vs turn; prompt (solid) and cached (dashed) tokens vs
    turn."""
    fig = Figure(figsize=(13, 5))
    ttft_ax, tok_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    turns: set[int] = set()
    for s in ss:
        col = colour(int(s["index"]))
        turns.update(int(r["turn"]) for r in s["turns"])
        _line(ttft_ax, s["turns"], "ttft_ms_p50", "-", col, s["label"])
        _line(tok_ax, s["turns"], "prompt_tokens_mean", "-", col, f"{s['label']} prompt")
        _line(tok_ax, s["turns"], "cached_prompt_tokens_mean", "--", col,
              f"{s['label']} cached")
    for ax, title, ylabel in (
            (ttft_ax, "TTFT p50 per turn", "TTFT p50 (ms, lower is better)"),
            (tok_ax, "Prompt tokens per turn", "mean prompt tokens")):
        ax.set_xticks(sorted(turns))
        ax.set_xlabel("turn of the conversation")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return png(fig)


def table(rows: Sequence[Mapping[str, float]]) -> pd.DataFrame:
    """One job's turn rows as shown; the cached columns only where some turn has them."""
    cols = [c for c in COLUMNS if not c[1].endswith("cached_prompt_tokens_mean")
            or any(c[1] in r for r in rows)]
    return pd.DataFrame([{"turn": int(r["turn"]),
                          **{name: format_number(r.get(key), fmt) for name, key, fmt in cols}}
                         for r in rows])


def section(data: SweepData) -> tuple[Section, dict[str, bytes]] | None:
    """The section and its image; None when no job has turn records."""
    ss = series(data)
    if not ss:
        return None
    blocks = [Block("text", (
        "Jobs whose requests are turns of multi-turn conversations: each turn's prompt is "
        "the conversation so far (earlier turns and the model's answers) plus the new user "
        "turn, so the prefill grows with the turn. Per turn, over its successful requests: "
        "TTFT and E2EL in ms, mean prompt tokens, and where the server reports them for "
        "every request of the turn, the tokens its prefix cache served (cached) and the "
        "rest (uncached: what was prefilled).")), Block("image", IMAGE, CAPTION)]
    for s in ss:
        ratio = last_turn_over_first(s["turns"])
        note = ("" if ratio is None else
                f": TTFT p50 of the last turn / turn 1 = {ratio:.2f}x (`{RATIO_KEY}`)")
        blocks += [Block("text", f"Job {s['label']}{note}."), Block("table", table(s["turns"]))]
    return Section(TITLE, blocks), {IMAGE: figure(ss)}


def insert(sections: list[Section], conv: Section) -> None:
    """Put ``conv`` after the last of :data:`AFTER` present (else at the end)."""
    at = max((i + 1 for i, s in enumerate(sections) if s.title in AFTER),
             default=len(sections))
    sections.insert(at, conv)
