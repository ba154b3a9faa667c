"""A search's bookkeeping (``hydra/sweeper=optuna``, the sweeper in
``hydra_plugins/infersweep_optuna``): what a finished job means to its trial (objective
values, constraint values, a quality verdict, or why it failed), which trials are best (the
feasible optimum, or the feasible Pareto front), the rerun of the best trial with repeats,
``<sweep>/search.json`` and the best trial on the sweep's MLflow parent run. Pure functions
except :func:`write_search_json` and the MLflow helpers; nothing here imports Optuna.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.schemas import SearchConfig

log = logging.getLogger(__name__)

#: job statuses whose metrics are a measurement (SKIPPED: ``resume=true`` found the same
#: job FINISHED before and returns its metrics)
MEASURED = ("FINISHED", "SKIPPED")


@dataclass
class Outcome:
    """What one job says to its trial: ``state`` ``complete`` (``values`` one per objective,
    ``constraints`` one per constraint, feasible when every one is <= 0; ``gate``: the
    quality verdict and its reason when a constraint needs one) or ``fail`` (``reason``
    says why)."""

    state: str
    values: list[float] = field(default_factory=list)
    constraints: list[float] = field(default_factory=list)
    reason: str | None = None
    gate: dict[str, Any] | None = None

    @property
    def feasible(self) -> bool:
        """Every constraint kept (Optuna's convention: a value <= 0 is kept)."""
        return self.state == "complete" and all(c <= 0 for c in self.constraints)


def _number(metrics: Mapping[str, Any], name: str) -> float | None:
    v = metrics.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def needs_gate(search: SearchConfig) -> bool:
    """Whether a constraint is a quality verdict (each trial is then gated)."""
    return any(c.gate_verdict_not is not None for c in search.constraints)


def verdict_breach(verdict: str | None, banned: str) -> float:
    """A ``gate_verdict_not`` constraint's value in Optuna's sign: 1.0 (broken) when the
    trial got the banned verdict or could not be judged (``verdict`` None: no baseline of
    its task), 0.0 (kept) for any other verdict."""
    return 1.0 if verdict is None or verdict == banned else 0.0


def job_outcome(job: Mapping[str, Any] | None, search: SearchConfig,
                gate: Mapping[str, Any] | None = None) -> Outcome:
    """The trial outcome of a job's return (``run.py``'s ``main``: ``status``, ``metrics``,
    ``error``; a results.json dict reads the same). A job that did not finish, or lacks an
    objective's or a constraint's metric, fails the trial. Constraint values follow
    Optuna's convention: ``metric - max`` and ``min - metric``, feasible when <= 0; a
    verdict constraint reads ``gate`` (the job's gate row: ``verdict``, ``reason``; None
    counts as not judged), see :func:`verdict_breach`."""
    if job is None:
        return Outcome("fail", reason="the job returned nothing (it raised)")
    status = str(job.get("status"))
    if status not in MEASURED:
        return Outcome("fail", reason=f"job {status}: {job.get('error') or 'no error given'}")
    metrics = job.get("metrics") or {}
    values: list[float] = []
    for o in search.objectives:
        v = _number(metrics, o.metric)
        if v is None:
            return Outcome("fail", reason=f"objective metric {o.metric} is not among the "
                                          f"job's finite metrics")
        values.append(v)
    constraints: list[float] = []
    judged = None
    for c in search.constraints:
        if c.gate_verdict_not is not None:
            row = gate or {"verdict": None, "reason": "the trial was not gated"}
            judged = {"verdict": row.get("verdict"), "reason": row.get("reason")}
            constraints.append(verdict_breach(judged["verdict"], c.gate_verdict_not))
            continue
        v = _number(metrics, str(c.metric))
        if v is None:
            return Outcome("fail", reason=f"constraint metric {c.metric} is not among the "
                                          f"job's finite metrics")
        # one number per constraint: the larger breach of its two bounds
        parts = [v - c.max] if c.max is not None else []
        parts += [c.min - v] if c.min is not None else []
        constraints.append(max(parts))
    return Outcome("complete", values, constraints, gate=judged)


def rerun_overrides(fixed: Sequence[str], best: Sequence[str], repeats: int) -> list[str]:
    """The rerun job's overrides: the search's fixed overrides (any ``workload.repeats``
    among them dropped), the best trial's overrides, then ``workload.repeats=<repeats>``."""
    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    return [o for o in fixed if key(o) != "workload.repeats"] + list(best) + [
        f"workload.repeats={repeats}"]


def rerun_result(job: int, overrides: Sequence[str], ret: Mapping[str, Any] | None,
                 search: SearchConfig) -> dict[str, Any]:
    """search.json's ``rerun`` block: the job, its overrides, its status and the objective
    as it logged it (with ``<objective>_repeat_mean`` and ``<objective>_ci95`` when logged,
    as for ``output_tokens_per_s``); an ``error`` when it did not finish."""
    name = search.objectives[0].metric
    status = str((ret or {}).get("status", "FAILED"))
    metrics = (ret or {}).get("metrics") or {}
    out: dict[str, Any] = {"job": job, "overrides": list(overrides), "status": status,
                           "metrics": {k: v for k in (name, f"{name}_repeat_mean",
                                                      f"{name}_ci95")
                                       if (v := _number(metrics, k)) is not None}}
    if status not in MEASURED:
        out["error"] = (ret or {}).get("error") or "the job returned nothing (it raised)"
    return out


def _dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere."""
    better = [s * x >= s * y for x, y, s in zip(a, b, signs, strict=True)]
    strictly = [s * x > s * y for x, y, s in zip(a, b, signs, strict=True)]
    return all(better) and any(strictly)


def best_trials(trials: Sequence[Mapping[str, Any]], directions: Sequence[str]
                ) -> list[Mapping[str, Any]]:
    """The best of ``trials`` (dicts with ``state``, ``values``, ``feasible``): among the
    feasible complete ones, the optimum of a single objective (ties: the earliest trial),
    or the Pareto front of several (in trial order). Empty when none is feasible."""
    ok = [t for t in trials if t.get("state") == "complete" and t.get("feasible")]
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    if not ok:
        return []
    if len(signs) == 1:
        return [max(ok, key=lambda t: signs[0] * t["values"][0])]
    return [t for t in ok
            if not any(_dominates(o["values"], t["values"], signs) for o in ok if o is not t)]


def search_summary(trials: list[dict[str, Any]], search: SearchConfig,
                   info: Mapping[str, Any]) -> dict[str, Any]:
    """``search.json``'s content: the study (``info``: name, storage, sampler, space...),
    the objectives and constraints, every trial, the best trial(s) and counts."""
    from dataclasses import asdict

    directions = [o.direction for o in search.objectives]
    best = best_trials(trials, directions)
    return {
        **info,
        "objectives": [asdict(o) for o in search.objectives],
        "constraints": [asdict(c) for c in search.constraints],
        "counts": {
            "trials": len(trials),
            "complete": sum(t["state"] == "complete" for t in trials),
            "failed": sum(t["state"] == "fail" for t in trials),
            "infeasible": sum(t["state"] == "complete" and not t["feasible"] for t in trials),
        },
        "trials": trials,
        "best": [dict(t) for t in best],
        "rerun": None,
    }


def write_search_json(sweep_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``<sweep_dir>/search.json``; returns its path."""
    path = sweep_dir / "search.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path


def print_search(summary: Mapping[str, Any]) -> None:
    """The search's lines at its end: counts and the best trial(s)."""
    c = summary["counts"]
    names = [o["metric"] for o in summary["objectives"]]
    print(f"\nSearch {summary.get('study_name')} ({summary.get('sampler')}): {c['trials']} "
          f"trial(s), {c['complete']} complete, {c['failed']} failed, {c['infeasible']} "
          f"infeasible")
    if not summary["best"]:
        print("  no feasible trial")
    for t in summary["best"]:
        vals = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, t["values"], strict=True))
        params = " ".join(t.get("overrides") or [f"{k}={v}" for k, v in t["params"].items()])
        print(f"  best: trial {t['number']} (job {t['job']}): {vals}; {params}")
    r = summary.get("rerun")
    if r:
        m = r["metrics"]
        figs = ", ".join(f"{k}={v:.4g}" for k, v in m.items()) or r.get("error")
        print(f"  rerun: job {r['job']} ({r['overrides'][-1]}, {r['status']}): {figs}")


def log_search_to_parent(config: Any, sweep_dir: Path, summary: Mapping[str, Any]) -> None:
    """Put the search on the sweep's MLflow parent run: trial counts, the best trial's
    values (``search.best.<metric>``, single objective) and params
    (``search.best.<key>``), the best and rerun job numbers and ``search.json``. Never
    raises."""
    from pipeline.tracking.job_runs import log_metrics
    from pipeline.tracking.parent_run import read_parent_id
    from pipeline.tracking.store import client_for

    parent = read_parent_id(sweep_dir)
    if not (parent and config.tracking.enabled and not config.dry_run):
        return
    c, best = summary["counts"], summary["best"]
    metrics: dict[str, float] = {f"search.trials_{k}": float(v) for k, v in c.items()
                                 if k != "trials"}
    params: dict[str, Any] = {}
    if len(best) == 1 and len(summary["objectives"]) == 1:
        metrics[f"search.best.{summary['objectives'][0]['metric']}"] = best[0]["values"][0]
        params = {f"search.best.{k}": v for k, v in best[0]["params"].items()}
    tags = {"search.best_jobs": " ".join(str(t["job"]) for t in best),
            "search.sampler": summary.get("sampler"), "search.study": summary.get("study_name")}
    if summary.get("rerun"):
        tags["search.rerun_job"] = str(summary["rerun"]["job"])
    try:
        client, _ = client_for(config)
        log_metrics(client, parent, metrics=metrics, params=params, tags=tags)
        client.log_artifact(parent, str(sweep_dir / "search.json"))
    except Exception as e:  # tracking must never cost the search's result
        log.warning("could not log the search to the sweep's parent run: %s", e)


def abandon_parent(config: Any, sweep_dir: Path) -> None:
    """A search refused before its first job: mark the parent run the sweep callback
    opened FAILED (else it would stay RUNNING). Never raises."""
    from pipeline.tracking.parent_run import read_parent_id
    from pipeline.tracking.store import client_for

    parent = read_parent_id(sweep_dir)
    if not (parent and config.tracking.enabled and not config.dry_run):
        return
    try:
        client, _ = client_for(config)
        client.set_terminated(parent, "FAILED")
    except Exception as e:
        log.warning("could not close the sweep's parent run: %s", e)
