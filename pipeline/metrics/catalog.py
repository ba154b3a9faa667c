"""The one metric catalog: every metric the pipeline logs, and how the ones it shows read.

The rows (:data:`ENTRIES`, in :mod:`pipeline.metrics.catalog_entries` and
:mod:`~pipeline.metrics.catalog_entries_runs`) name each metric as
it is logged to MLflow and results.json, or a family of them as a pattern such as
``ttft_ms_<stat>``; :func:`entry_for` finds a key's row and :func:`uncovered` lists the
keys no row covers (the tests hold every key a real job, a load profile and a gate sweep
log against it). ``python -m pipeline.metrics.catalog`` writes docs/metrics.md from the
rows (``--check``: exit 1 when that file is stale).

The metrics shown in the terminal tables, on the sweep's parent and in the report are a
selection (:data:`METRICS`, :data:`HEADLINE`) with a header and number format; a metric
shown anywhere is formatted by :func:`format_metric`, so a number reads the same in the
terminal, in report.md and in report.html.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.metrics.catalog_entries import GROUPS, HIGHER, JOB_ENTRIES, LOWER, NEUTRAL, Entry
from pipeline.metrics.catalog_entries_runs import RUN_ENTRIES

#: every row, in docs/metrics.md's order within each group
ENTRIES: tuple[Entry, ...] = JOB_ENTRIES + RUN_ENTRIES

__all__ = ["ENTRIES", "GROUPS", "HEADLINE", "HIGHER", "LOWER", "METRICS", "MIB", "NEUTRAL",
           "PLACEHOLDERS", "SPECS", "Entry", "MetricSpec", "entry_for", "format_metric",
           "format_number", "logged_metric_keys", "main", "mib", "missing", "pattern_regex",
           "uncovered"]

MIB = 2**20

# The headline metrics: the terminal table's columns and the per-job figures put on the
# sweep's parent run as job<N>.<metric> (a selection from the catalog, not a second one).
HEADLINE = ("output_tokens_per_s", "ttft_ms_mean", "tpot_ms_mean", "e2el_ms_p90",
            "peak_rss_bytes", "perplexity", "self_bleu", "distinct_2")

#: the numeric gate figures of a pair (``gate.<figure>`` on the optimized job's run)
GATE_FIGURES = ("exact_match_rate", "first_divergence_min", "mean_kl", "max_kl", "ppl_delta",
                "speedup", "verdict_code")
#: the phases :class:`pipeline.measure.timing.PhaseTimer` times in a job
PHASES = ("model_prepare", "load", "warmup", "generate", "scoring")
#: the summary statistics of a latency family (:func:`pipeline.metrics.performance.summarize`)
STATS = ("mean", "std", "p50", "p90", "p99")

_NAME = r"[A-Za-z0-9_]+"
#: the named placeholders of a pattern row: (what it stands for, regex). ``<a|b>`` in a
#: pattern is one of the words listed
PLACEHOLDERS: dict[str, tuple[str, str]] = {
    "stat": (" ".join(f"`{s}`" for s in STATS), "|".join(STATS)),
    "phase": (" ".join(f"`{p}`" for p in PHASES), "|".join(PHASES)),
    "name": ("a reference metric's name (`scoring.reference_metrics`), characters outside "
             "`[A-Za-z0-9_]` made `_`", _NAME),
    "N": ("a job number of the sweep, or a pair number", "[0-9]+"),
    "headline": (" ".join(f"`{k}`" for k in HEADLINE), "|".join(map(re.escape, HEADLINE))),
    "figure": (" ".join(f"`{f}`" for f in GATE_FIGURES) + " `ref_<name>`",
               "|".join(GATE_FIGURES) + f"|ref_{_NAME}"),
}
_SLOT = re.compile(r"<([^<>]+)>")


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """The regex a catalog name stands for: literal text, a named placeholder
    (:data:`PLACEHOLDERS`) or ``<a|b>`` (one of those words). A name without ``<`` is
    itself. An unknown placeholder raises ``ValueError`` naming it."""
    out, pos = [], 0
    for m in _SLOT.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        slot = m.group(1)
        if slot in PLACEHOLDERS:
            out.append(f"(?:{PLACEHOLDERS[slot][1]})")
        elif "|" in slot:
            out.append("(?:" + "|".join(re.escape(w) for w in slot.split("|")) + ")")
        else:
            raise ValueError(f"catalog name {pattern!r}: unknown placeholder <{slot}>; "
                             f"allowed: {', '.join(f'<{p}>' for p in PLACEHOLDERS)} or <a|b>")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out))


@lru_cache(maxsize=8)
def _index(catalog: tuple[Entry, ...]) -> tuple[dict[str, Entry],
                                                  list[tuple[re.Pattern[str], Entry]]]:
    exact = {e.name: e for e in catalog if "<" not in e.name}
    patterns = [(pattern_regex(e.name), e) for e in catalog if "<" in e.name]
    return exact, patterns


def entry_for(key: str, catalog: Sequence[Entry] = ENTRIES) -> Entry | None:
    """The catalog row that covers ``key``: its own row, else the first pattern row that
    matches all of it; None when no row does."""
    exact, patterns = _index(tuple(catalog))
    if key in exact:
        return exact[key]
    return next((e for rx, e in patterns if rx.fullmatch(key)), None)


def uncovered(keys: Iterable[str], catalog: Sequence[Entry] = ENTRIES) -> list[str]:
    """The keys (sorted) that no row of ``catalog`` covers: metrics logged but defined
    nowhere."""
    return sorted({k for k in keys if entry_for(k, catalog) is None})


def logged_metric_keys(client: Any, run_ids: Iterable[str]) -> set[str]:
    """Every metric key MLflow holds for these runs and their sweep's parent runs (an
    ``MlflowClient``; a run's parent is its ``mlflow.parentRunId`` tag)."""
    keys: set[str] = set()
    seen: set[str] = set()
    todo = list(run_ids)
    while todo:
        rid = todo.pop()
        if rid in seen:
            continue
        seen.add(rid)
        run = client.get_run(rid)
        keys.update(run.data.metrics)
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            todo.append(parent)
    return keys


# --------------------------------------------------------------------------- display


@dataclass(frozen=True)
class MetricSpec:
    """A metric as it is shown: MLflow key, column header, display unit, format spec
    (``mib``: bytes shown in MiB) and whether a higher value is better (from its catalog
    row's direction)."""

    key: str
    header: str
    unit: str
    fmt: str
    higher_is_better: bool


def _shown(key: str, header: str, unit: str, fmt: str) -> MetricSpec:
    entry = entry_for(key)
    if entry is None:  # a shown metric must be defined in the catalog
        raise ValueError(f"metric {key!r} is shown but has no catalog row")
    return MetricSpec(key, header, unit, fmt, entry.direction == HIGHER)


METRICS = (
    _shown("output_tokens_per_s", "out tok/s", "tok/s", ".1f"),
    _shown("ttft_ms_mean", "TTFT mean ms", "ms", ".0f"),
    _shown("tpot_ms_mean", "TPOT mean ms", "ms", ".1f"),
    _shown("e2el_ms_mean", "E2EL mean ms", "ms", ".0f"),
    _shown("e2el_ms_p90", "E2EL p90 ms", "ms", ".0f"),
    _shown("peak_rss_bytes", "peak RSS MiB", "MiB", "mib"),
    _shown("peak_rss_above_load_bytes", "peak RSS above load MiB", "MiB", "mib"),
    _shown("cuda_max_allocated_bytes", "CUDA max alloc MiB", "MiB", "mib"),
    # how close to the machine's limit, and what start-up cost (hf compile, vLLM engine)
    _shown("roofline_share", "roofline share", "", ".2f"),
    _shown("compile_s", "compile s", "s", ".1f"),
    _shown("engine_start_s", "engine start s", "s", ".1f"),
    _shown("perplexity", "PPL", "", ".3f"),
    _shown("self_bleu", "self-BLEU", "", ".3f"),
    _shown("distinct_2", "distinct-2", "", ".3f"),
    _shown("rep_2", "rep-2", "", ".3f"),
    # against each request's reference (scoring.reference_metrics, docs/quality.md)
    _shown("ref_exact_match", "exact match", "", ".3f"),
    _shown("ref_f1", "token F1", "", ".3f"),
    _shown("ref_bleu", "BLEU", "", ".1f"),
    _shown("ref_chrf", "chrF", "", ".1f"),
    _shown("ref_rougeL", "ROUGE-L", "", ".3f"),
    _shown("ref_pass_at_1", "pass@1", "", ".3f"),
    # speculative decoding (docs/speculative-quantization.md)
    _shown("spec_tokens_per_target_step", "tokens/target step", "", ".2f"),
    _shown("spec_acceptance_rate", "spec acceptance", "", ".2f"),
    _shown("spec_mean_accepted_tokens", "accepted/step", "", ".2f"),
    # the gate: an optimized job against its baseline (pipeline.analysis)
    _shown("gate.exact_match_rate", "gate exact match", "", ".2f"),
    _shown("gate.mean_kl", "gate mean KL", "nats", ".2e"),
    _shown("gate.ppl_delta", "gate PPL delta", "", "+.3f"),
    _shown("gate.speedup", "gate tok/s x", "x", ".2f"),
)
SPECS = {m.key: m for m in METRICS}


def missing(v: Any) -> bool:
    """True for no value: ``None`` or NaN (pandas' empty cell)."""
    return v is None or (isinstance(v, float) and v != v)


def mib(n_bytes: float) -> str:
    """Bytes as whole MiB (the one place bytes become MiB for display)."""
    return f"{float(n_bytes) / MIB:.0f}"


def format_number(v: Any, fmt: str) -> str:
    """``v`` with a format spec (``mib``: bytes in MiB); ``-`` when missing."""
    if missing(v):
        return "-"
    return mib(v) if fmt == "mib" else format(float(v), fmt)


def format_metric(key: str, v: Any) -> str:
    """A metric value as it is shown everywhere (``-`` when missing; a metric outside the
    shown selection as ``str``)."""
    spec = SPECS.get(key)
    if spec is None:
        return "-" if missing(v) else str(v)
    return format_number(v, spec.fmt)


# --------------------------------------------------------------------------- docs/metrics.md

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def main(argv: list[str] | None = None) -> int:
    """Write docs/metrics.md from the catalog; with ``--check`` only compare (exit 1 when
    the file differs from what the catalog gives, naming the command that fixes it)."""
    from pipeline.metrics.catalog_doc import render

    ap = argparse.ArgumentParser(prog="python -m pipeline.metrics.catalog",
                                 description="Write the metric reference (docs/metrics.md) "
                                             "from the metric catalog.")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when the file is not what the catalog gives; write nothing")
    ap.add_argument("--out", type=Path, default=DOC, help=f"the file (default: {DOC})")
    args = ap.parse_args(argv)
    text = render(ENTRIES, PLACEHOLDERS, HEADLINE)
    if args.check:
        current = args.out.read_text() if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is stale: run `python -m pipeline.metrics.catalog`",
                  file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(ENTRIES)} catalog rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
