"""Per-turn metrics of multi-turn conversations: does a growing history slow the first token?

A conversation's turn ``t`` sends the whole history so far (the earlier user turns and the
model's answers) plus the new user turn, so its prompt, and the prefill, grow with ``t``.
Records of such a workload carry ``extra["conversation_id"]``, ``extra["turn"]`` (1-based)
and, where the server reports it, ``extra["cached_prompt_tokens"]`` (prompt tokens served
from its prefix cache). :func:`turn_table` groups the records by turn; every percentile is
:func:`pipeline.metrics.performance.summarize`'s, as for the job's own latencies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.metrics.performance import e2el, summarize, ttft
from pipeline.records import RequestRecord

__all__ = ["PREFIX", "RATIO_KEY", "last_turn_over_first", "turn_metrics", "turn_table"]

#: the MLflow key prefix of a turn row's figures (logged with step = the turn number)
PREFIX = "turn."
#: the job-level figure: TTFT p50 of the last turn / TTFT p50 of turn 1
RATIO_KEY = "ttft_ms_last_turn_over_first"


def _as_record(r: RequestRecord | Mapping[str, Any]) -> RequestRecord:
    """A record as the metric functions take it; a results.json ``requests`` entry is
    read into one (only the fields the turn figures use)."""
    if isinstance(r, RequestRecord):
        return r
    return RequestRecord(
        index=int(r.get("index") or 0), prompt="", text="",
        prompt_tokens=int(r.get("prompt_tokens") or 0), output_token_ids=[],
        t_start=float(r["t_start"]),
        t_first_token=None if r.get("t_first_token") is None else float(r["t_first_token"]),
        t_end=float(r["t_end"]), error=r.get("error"), extra=dict(r.get("extra") or {}))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def _row(turn: int, recs: Sequence[RequestRecord]) -> dict[str, float]:
    ok = [r for r in recs if r.ok]
    row: dict[str, float] = {"turn": turn, "requests": len(ok), "errors": len(recs) - len(ok)}
    first = summarize([v * 1000.0 for v in map(ttft, ok) if v is not None])
    row.update({f"ttft_ms_{k}": first[k] for k in ("p50", "p99", "mean") if k in first})
    whole = summarize([e2el(r) * 1000.0 for r in ok])
    if whole:
        row["e2el_ms_p50"] = whole["p50"]
    if ok:
        row["prompt_tokens_mean"] = _mean([r.prompt_tokens for r in ok])
        cached = [r.extra.get("cached_prompt_tokens") for r in ok]
        # a mean over some requests only would compare different requests across turns
        if all(c is not None for c in cached):
            row["cached_prompt_tokens_mean"] = _mean([float(c) for c in cached])
            row["uncached_prompt_tokens_mean"] = _mean(
                [r.prompt_tokens - float(c) for r, c in zip(ok, cached, strict=True)])
    return row


def turn_table(records: Iterable[RequestRecord | Mapping[str, Any]]) -> list[dict[str, float]]:
    """One row per turn number present, in turn order: ``turn``, ``requests`` (the
    successful ones), ``errors``, ``ttft_ms_p50``/``_p99``/``_mean`` and ``e2el_ms_p50``
    (ms, over the successful requests), ``prompt_tokens_mean`` (the prefill), and
    ``cached_prompt_tokens_mean`` / ``uncached_prompt_tokens_mean`` (prompt - cached) only
    when every successful request of the turn reports its cached tokens. A figure with no
    request to compute it from is left out of its row. ``records``: RequestRecords or
    results.json ``requests`` dicts; those without ``extra["turn"]`` are ignored, so a
    workload without conversations gives ``[]``."""
    by_turn: dict[int, list[RequestRecord]] = defaultdict(list)
    for r in records:
        extra = r.extra if isinstance(r, RequestRecord) else r.get("extra") or {}
        if extra.get("turn") is not None:  # other workloads' records are never read
            by_turn[int(extra["turn"])].append(_as_record(r))
    return [_row(t, by_turn[t]) for t in sorted(by_turn)]


def turn_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """A turn row as MLflow metrics: ``turn.<figure>`` (the turn number is the step)."""
    return {f"{PREFIX}{k}": v for k, v in row.items() if k != "turn"}


def last_turn_over_first(table: Sequence[Mapping[str, float]]) -> float | None:
    """TTFT p50 of the last turn with one / TTFT p50 of turn 1: what the grown history
    costs the first token (above 1: slower). None without turn 1, without a later turn or
    with a zero first figure."""
    p50 = {int(r["turn"]): r["ttft_ms_p50"] for r in table if "ttft_ms_p50" in r}
    last = max(p50, default=None)
    if last is None or last <= 1 or not p50.get(1):
        return None
    return p50[last] / p50[1]
