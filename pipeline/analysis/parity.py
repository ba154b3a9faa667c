"""Token parity between backends: do two jobs that differ only in ``backend`` generate the
same token ids for the same prompts?

Greedy (and deterministic beam) decoding should agree token for token when both engines
compute in float32; in bfloat16 small rounding differences flip an argmax sooner or later
and the outputs diverge from there on. Sampled decodings use different random streams in
each engine, so their parity is reported but not expected.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.records import JobResult, finished_jobs
from pipeline.tracking.job_runs import log_metrics
from pipeline.tracking.parent_run import read_parent_id
from pipeline.tracking.store import client_for

log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where ``a`` and ``b`` differ (a length difference counts
    as a divergence at the shorter length); ``None`` when they are identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def token_parity(a_records: list[dict], b_records: list[dict]) -> dict[str, Any]:
    """Compare the generated token ids of two jobs' ``requests`` lists, prompt by prompt.

    Records are matched by ``index``. A prompt missing from either side, or failed on
    either side, counts as compared and not matching (first divergence 0). One whose token
    ids are missing where text was generated (a server that streams text only) is not
    compared: ``exact_match`` None, left out of the rate (equal empty id lists would
    otherwise read as a match of nothing, and re-tokenized text is not what was
    generated). Returns ``prompts`` (per index: ``exact_match``, ``first_divergence``,
    token counts), ``num_prompts``, ``num_compared``, ``exact_matches`` and
    ``exact_match_rate`` (over the compared prompts; ``None`` when none was compared).
    """
    a = {r["index"]: r for r in a_records}
    b = {r["index"]: r for r in b_records}
    prompts = []
    for idx in sorted(set(a) | set(b)):
        ra, rb = a.get(idx), b.get(idx)
        row: dict[str, Any] = {"index": idx}
        if ra is None or rb is None or ra.get("error") or rb.get("error"):
            row.update(exact_match=False, first_divergence=0,
                       note="missing or failed on one side")
        elif any(not r.get("output_token_ids") and r.get("text") for r in (ra, rb)):
            row.update(exact_match=None, first_divergence=None,
                       note="text without token ids on one side: not compared")
        else:
            ta, tb = list(ra["output_token_ids"]), list(rb["output_token_ids"])
            div = first_divergence(ta, tb)
            row.update(exact_match=div is None, first_divergence=div,
                       a_tokens=len(ta), b_tokens=len(tb))
        prompts.append(row)
    compared = [p for p in prompts if p["exact_match"] is not None]
    matches = sum(bool(p["exact_match"]) for p in compared)
    return {
        "prompts": prompts,
        "num_prompts": len(prompts),
        "num_compared": len(compared),
        "exact_matches": matches,
        "exact_match_rate": matches / len(compared) if compared else None,
    }


def _without_backend(config: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "backend"}, sort_keys=True,
                      default=str)


def _overrides(r: JobResult) -> list[str]:
    return list(r.overrides or r.provenance.get("overrides", []))


def _backend(job: tuple[Path, JobResult]) -> str:
    return str(job[1].config["backend"]["name"])


def _deterministic(config: Mapping[str, Any]) -> bool:
    d = config.get("decoding", {})
    return not (d.get("do_sample") and d.get("temperature", 1.0) > 0)


def sweep_parity(sweep_dir: Path) -> dict[str, Any] | None:
    """Parity for every pair of FINISHED jobs in ``sweep_dir`` whose resolved configs differ
    only in ``backend``; writes ``<sweep_dir>/parity.json`` and returns its content, or
    ``None`` (and writes nothing) when the sweep holds no such pair.

    The headline ``exact_match_rate`` pools the prompts of deterministic pairs (greedy or
    beam) only; sampled pairs are listed with ``deterministic: false``.
    """
    sweep_dir = Path(sweep_dir)
    jobs = finished_jobs(sweep_dir)
    groups: dict[str, list[tuple[Path, JobResult]]] = {}
    for job_dir, r in jobs:
        groups.setdefault(_without_backend(r.config), []).append((job_dir, r))
    pairs = []
    for members in groups.values():
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                x, y = members[i], members[j]
                if _backend(x) == _backend(y):
                    continue
                if _backend(x) > _backend(y):  # a stable orientation: hf before vllm
                    x, y = y, x
                (dir_a, a), (dir_b, b) = x, y
                pairs.append({
                    "a": {"backend": _backend(x), "job": a.job_num, "dir": dir_a.name},
                    "b": {"backend": _backend(y), "job": b.job_num, "dir": dir_b.name},
                    "decoding": a.config.get("decoding", {}).get("name"),
                    "deterministic": _deterministic(a.config),
                    "overrides": [o for o in _overrides(a) if not o.startswith("backend")],
                    **token_parity(a.requests, b.requests),
                })
    if not pairs:
        return None
    pooled = [p for p in pairs if p["deterministic"]]
    n = sum(p["num_compared"] for p in pooled)
    out = {
        "sweep_dir": str(sweep_dir),
        "pairs": pairs,
        "exact_match_rate": (sum(p["exact_matches"] for p in pooled) / n) if n else None,
    }
    (sweep_dir / PARITY_FILE).write_text(json.dumps(out, indent=1))
    return out


def parity_lines(parity: Mapping[str, Any]) -> list[str]:
    """One line per compared pair, for the terminal."""
    lines = []
    for p in parity["pairs"]:
        divs = [r["first_divergence"] for r in p["prompts"] if r["exact_match"] is False]
        where = f"; first divergence at token {min(divs)}" if divs else ""
        note = "" if p["deterministic"] else " (sampled: parity not expected)"
        rate = p["exact_match_rate"]
        label = " ".join(p["overrides"]) or f"decoding={p['decoding']}"
        head = (f"parity {p['a']['backend']} (job {p['a']['job']}) vs {p['b']['backend']} "
                f"(job {p['b']['job']}), {label}: ")
        if not p["num_compared"] and p["num_prompts"]:
            lines.append(head + "not compared (one side returned text without token ids)")
            continue
        lines.append(
            head + f"{p['exact_matches']}/{p['num_compared']} prompts identical"
            f"{f' ({rate:.0%})' if rate is not None else ''}{where}{note}"
        )
    return lines


def report_sweep_parity(config: Any, sweep_dir: Path) -> dict[str, Any] | None:
    """Sweep-end hook: compute parity, print one line per pair, and put
    ``parity_exact_match_rate`` and ``parity.json`` on the sweep's MLflow parent run.
    Never raises: parity is a report, not a reason to fail a finished sweep."""
    try:
        parity = sweep_parity(sweep_dir)
    except Exception as e:
        log.warning("parity: could not compare the sweep's backends: %s", e)
        return None
    if parity is None:
        return None
    print("\n".join(parity_lines(parity)))
    parent = read_parent_id(Path(sweep_dir))
    if parent and config.tracking.enabled:
        try:
            client, _ = client_for(config)
            metrics = {f"parity.pair{i}.exact_match_rate": p["exact_match_rate"]
                       for i, p in enumerate(parity["pairs"])
                       if p["exact_match_rate"] is not None}
            if parity["exact_match_rate"] is not None:
                metrics["parity_exact_match_rate"] = parity["exact_match_rate"]
            log_metrics(client, parent, metrics=metrics)
            client.log_artifact(parent, str(Path(sweep_dir) / PARITY_FILE))
        except Exception as e:
            log.warning("parity: could not log to the MLflow parent run: %s", e)
    return parity
