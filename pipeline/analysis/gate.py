"""Sweep-end gate: for each optimized job of a sweep, "fast but wrong?" against its baseline.

Pairs: a job's baseline is named by ``scoring.reference_run`` (a job number of this sweep or
an MLflow run id whose ``results.json`` artifact is read), or found in the sweep: among the
FINISHED jobs that compute the same task -- equal model, decoding, workload and seed, and
equal backend *task* fields, whatever the backend -- the one with the fewest optimizations
switched on is the baseline of the others. What each ``backend.*`` field is (task,
optimization with its "off" value, or bookkeeping) is declared by its backend class
(``Backend.settings``, :class:`pipeline.backends.base.Setting`), never listed here.

The figures (``gate_rules.py``) go to ``<sweep>/gate.json``, to each optimized job's MLflow
run (``gate.*`` metrics, a ``gate_verdict`` tag), to the sweep's parent run (``gate.job<N>.*``)
and from there to the report's "Fast but wrong?" table.

Teacher-forced KL needs a backend that can score a token sequence (``next_token_logprobs``,
duck-typed: today the transformers backend); the two settings are loaded one after the other
in this process for at most ``scoring.gate_max_requests`` requests each (the cost stays small).
:func:`gate_one` gates one job against the fixed baseline (a search's trial, right after it).
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pipeline.analysis.gate_rules as g
from pipeline.analysis.parity import token_parity
from pipeline.backends.base import Setting
from pipeline.records import JobResult, finished_jobs
from pipeline.tracking.job_runs import RUN_ID_FILE, log_metrics
from pipeline.tracking.parent_run import read_parent_id
from pipeline.tracking.store import client_for

log = logging.getLogger(__name__)

GATE_FILE = "gate.json"

#: top-level config sections that never change what a job computes
NOT_TASK = ("paths", "tracking", "print_table", "dry_run", "resume", "scoring", "measure")


@functools.cache
def _declarations(impl: str) -> tuple[dict[str, Setting], tuple[str, ...]] | None:
    """The backend class's field declarations and inherent optimizations, or None when its
    ``impl`` cannot be imported (every field then counts as a task field)."""
    from pipeline.backends import backend_class

    try:
        cls = backend_class(impl)
    except Exception as e:
        log.warning("gate: backend.impl=%r cannot be imported (%s); its fields are all "
                    "treated as task fields", impl, e)
        return None
    return cls.declared_settings(), tuple(cls.inherent_optimizations)


def _fields(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Setting]]:
    b = dict(config.get("backend") or {})
    decl = _declarations(str(b.get("impl")))
    return b, decl[0] if decl else {}


def task_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The backend's task fields that are not at a neutral value, by name (value in
    effect). An undeclared field counts as a task field: it might change anything."""
    b, decl = _fields(config)
    out = {}
    for k, v in b.items():
        d = decl.get(k)
        if d is None:
            out[k] = v
        elif d.role == "task" and d.is_on(config, k):
            out[k] = d.value(config, k)
    return out


def optimizations_on(config: dict[str, Any]) -> dict[str, Any]:
    """The backend's optimization fields that are read for this job and not at their
    'off' value (value in effect), as the backend class declares them."""
    b, decl = _fields(config)
    return {k: d.value(config, k) for k, d in decl.items()
            if d.role == "optimization" and k in b and d.is_on(config, k)}


def optimization_count(config: dict[str, Any]) -> int:
    """Optimizations on plus those the engine always applies (how the baseline is picked:
    the least-optimized comparable job)."""
    decl = _declarations(str((config.get("backend") or {}).get("impl")))
    return len(optimizations_on(config)) + (len(decl[1]) if decl else 0)


def _state(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return str((config.get("backend") or {}).get("impl")), optimizations_on(config)


def comparable_key(config: dict[str, Any]) -> str:
    """The resolved config without what never changes results and without the backend's
    optimization and bookkeeping fields: jobs with equal keys compute the same task, on
    the same backend or on different ones (hf can be the baseline of vLLM)."""
    c = {k: v for k, v in config.items() if k not in NOT_TASK}
    c["backend"] = task_fields(config)
    return json.dumps(c, sort_keys=True, default=str)


def find_pairs(jobs: list[tuple[Path, JobResult]], reference_run: str | None = None,
               reference: tuple[Path | None, JobResult] | None = None
               ) -> list[tuple[tuple[Path | None, JobResult], tuple[Path, JobResult]]]:
    """(baseline, optimized) pairs. With a ``reference`` (a job loaded from
    ``scoring.reference_run``), every job comparable to it is paired with it; else, per
    group of comparable jobs, the least-optimized job (:func:`optimization_count`, lowest
    job number on a tie) is the baseline of every other job of the group that runs another
    backend or switches other optimizations on."""
    if reference_run is not None and reference is None:
        by_num = {str(r.job_num): (d, r) for d, r in jobs}
        if str(reference_run) in by_num:
            reference = by_num[str(reference_run)]
    if reference is not None:
        key = comparable_key(reference[1].config)
        return [(reference, j) for j in jobs
                if j[1] is not reference[1] and comparable_key(j[1].config) == key
                and _state(j[1].config) != _state(reference[1].config)]
    groups: dict[str, list[tuple[Path, JobResult]]] = {}
    for j in jobs:
        groups.setdefault(comparable_key(j[1].config), []).append(j)
    pairs = []
    for members in groups.values():
        if len(members) < 2:
            continue
        base = min(members, key=lambda j: (optimization_count(j[1].config),
                                           j[1].job_num if j[1].job_num is not None else 1e9))
        for j in members:
            if j is not base and _state(j[1].config) != _state(base[1].config):
                pairs.append((base, j))
    return pairs


def gated_optimizations(base: dict[str, Any], opt: dict[str, Any]) -> dict[str, Any]:
    """What the optimized job switches on beyond its baseline (value in effect); a
    different backend is named as ``backend``."""
    (impl_b, on_b), (impl_o, on_o) = _state(base), _state(opt)
    out = {k: v for k, v in on_o.items() if on_b.get(k, _OFF) != v}
    if impl_b != impl_o:
        out = {"backend": (opt.get("backend") or {}).get("name"), **out}
    return out


_OFF = object()


def kl_informative(base: dict[str, Any], opt: dict[str, Any]) -> bool:
    """False when the two jobs run the same backend and differ only in fields declared
    ``numerics=False`` (speculative decoding: the same model scores every token, so
    teacher-forced KL is 0 by construction)."""
    (impl_b, on_b), (impl_o, on_o) = _state(base), _state(opt)
    if impl_b != impl_o:
        return True
    _, decl = _fields(base)
    differ = {k for k in set(on_b) | set(on_o) if on_b.get(k) != on_o.get(k)}
    return any(decl[k].numerics for k in differ)


def can_score(config: dict[str, Any]) -> bool:
    """Whether the job's backend can score a token sequence (``next_token_logprobs``)."""
    from pipeline.backends import backend_class

    try:
        cls = backend_class((config.get("backend") or {}).get("impl"))
    except Exception:
        return False
    return hasattr(cls, "next_token_logprobs")


def _scoring_backend(config: dict[str, Any], cache_dir: Path) -> tuple[Any, Any, Any]:
    """(backend loaded with a job's settings, its spec, its requests) or (None, spec, None)
    when the backend cannot score a token sequence."""
    from omegaconf import OmegaConf

    from pipeline.backends import backend_class, make_backend
    from pipeline.config import validate
    from pipeline.workload import load_prompts
    from pipeline.workload.prepare import prepare_requests

    spec = validate(OmegaConf.create(config))
    spec.paths.cache_dir = str(cache_dir)  # the sweep's cache, whatever the job's cwd was
    if not hasattr(backend_class(spec.backend.impl), "next_token_logprobs"):
        return None, spec, None
    # the requests as the job built them: same tokenizer, template and lengths
    prepared = prepare_requests(spec, load_prompts(spec.workload))
    backend = make_backend(spec, prepared.model_dir)
    backend.load()
    return backend, spec, prepared.requests


def teacher_forced(base: JobResult, opt: JobResult, cache_dir: Path, max_requests: int
                   ) -> tuple[list[float], list[float], list[float]] | None:
    """Per-position KL(baseline || optimized) and the NLL of each baseline token under both
    settings, teacher-forced on the baseline's first ``max_requests`` successful
    generations; None when a backend cannot score sequences."""
    import torch

    records = [r for r in base.requests if not r.get("error") and r.get("output_token_ids")]
    records = sorted(records, key=lambda r: r["index"])[:max_requests]
    if not records or not (can_score(base.config) and can_score(opt.config)):
        return None  # checked first: loading the baseline for nothing costs a model load
    backend, _, requests = _scoring_backend(base.config, cache_dir)
    if backend is None:
        return None
    by_index = {q.index: q for q in requests}
    seqs = [(list(by_index[r["index"]].prompt_token_ids), list(r["output_token_ids"]))
            for r in records if r["index"] in by_index]
    try:
        base_lp = [backend.next_token_logprobs(p, c) for p, c in seqs]
    finally:
        backend.close()
    backend, _, _ = _scoring_backend(opt.config, cache_dir)
    if backend is None:
        return None
    kls: list[float] = []
    nll_b: list[float] = []
    nll_o: list[float] = []
    try:
        for (p, c), lp_b in zip(seqs, base_lp, strict=True):
            lp_o = backend.next_token_logprobs(p, c)
            kls.extend(torch.sum(lp_b.exp() * (lp_b - lp_o), -1).clamp_min(0).tolist())
            idx = torch.tensor(c).unsqueeze(-1)
            nll_b.extend((-lp_b.gather(-1, idx)).squeeze(-1).tolist())
            nll_o.extend((-lp_o.gather(-1, idx)).squeeze(-1).tolist())
    finally:
        backend.close()
    return kls, nll_b, nll_o


def _label(r: JobResult) -> str:
    return " ".join(r.overrides or []) or "(defaults)"


def _load_reference(config: Any, ref: str) -> tuple[None, JobResult] | None:
    """A baseline from an MLflow run id: its ``results.json`` artifact."""
    try:
        client, _ = client_for(config)
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(ref, "results.json", tmp)
            return None, JobResult.from_dict(json.loads(Path(path).read_text()))
    except Exception as e:
        log.warning("gate: scoring.reference_run=%r is neither a job of this sweep nor a "
                    "readable MLflow run (%s)", ref, e)
        return None


def _settings(config: Any) -> tuple[str | None, int]:
    scoring = config.get("scoring", {}) if hasattr(config, "get") else {}
    ref = scoring.get("reference_run")
    return (None if ref in (None, "") else str(ref)), int(scoring.get("gate_max_requests", 4)
                                                          or 0)


def _pair_row(base: tuple[Path | None, JobResult], opt: tuple[Path, JobResult],
              cache_dir: Path, max_requests: int) -> dict[str, Any]:
    """Every gate figure of one (baseline, optimized) pair, its verdict and who they are."""
    (bdir, b), (odir, o) = base, opt
    informative = kl_informative(b.config, o.config)
    tf = None
    if informative and max_requests > 0:
        try:
            tf = teacher_forced(b, o, cache_dir, max_requests)
        except Exception as e:  # a report: never fail the finished sweep
            log.warning("gate: teacher-forced scoring failed for job %s: %s", o.job_num, e)
    row = g.summarize(token_parity(b.requests, o.requests), *(tf or (None, None, None)),
                      b.metrics, o.metrics, informative)
    row.update(
        baseline={"job": b.job_num, "dir": bdir.name if bdir else None,
                  "run_id": b.mlflow_run_id, "label": _label(b)},
        optimized={"job": o.job_num, "dir": odir.name,
                   "label": " ".join(x for x in o.overrides or []
                                     if x not in (b.overrides or [])) or _label(o)},
        optimizations=gated_optimizations(b.config, o.config),
        speedup=_speedup(b.metrics, o.metrics),
    )
    return row


def gate_one(config: Any, sweep_dir: Path, job_dir: Path) -> dict[str, Any]:
    """One finished job of the sweep (its folder's results.json) against the fixed baseline
    ``scoring.reference_run`` (a job number of the sweep or an MLflow run id): the gate's
    row (``verdict``, ``reason``, the figures) as :func:`sweep_gate` computes it, or
    ``{"verdict": None, "reason": why}`` when it cannot be judged (no baseline, the job did
    not finish, another task than the baseline's). Writes nothing."""
    ref, max_requests = _settings(config)
    try:
        job = JobResult.from_dict(json.loads((Path(job_dir) / "results.json").read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        return {"verdict": None, "reason": f"no readable results.json in {job_dir} ({e})"}
    by_num = {str(r.job_num): (d, r) for d, r in finished_jobs(Path(sweep_dir))}
    reference = by_num.get(str(ref)) if not ref or ref.isdigit() else _load_reference(config, ref)
    if not (job.finished and job.config):
        return {"verdict": None, "reason": f"the job is {job.status}, not FINISHED"}
    if reference is None:
        return {"verdict": None, "reason": f"no finished baseline scoring.reference_run={ref}"}
    if comparable_key(reference[1].config) != comparable_key(job.config):
        return {"verdict": None, "reason": f"not comparable with baseline {ref}: another task"}
    cache_dir = Path(str(config.paths.cache_dir)).resolve()
    return _pair_row(reference, (Path(job_dir), job), cache_dir, max_requests)


def sweep_gate(config: Any, sweep_dir: Path) -> dict[str, Any] | None:
    """The gate for every (baseline, optimized) pair of the sweep; writes gate.json and
    returns it, or None when the sweep has no such pair."""
    jobs = finished_jobs(sweep_dir := Path(sweep_dir))
    ref, max_requests = _settings(config)
    reference = None
    if ref is not None and ref not in {str(r.job_num) for _, r in jobs}:
        reference = _load_reference(config, ref)
    pairs = find_pairs(jobs, ref, reference)
    if not pairs:
        return None
    cache = Path(str(config.paths.cache_dir)).resolve()
    out_pairs = [_pair_row(b, o, cache, max_requests) for b, o in pairs]
    result = {"sweep_dir": str(sweep_dir), "pairs": out_pairs, "thresholds": g.THRESHOLDS}
    (sweep_dir / GATE_FILE).write_text(json.dumps(result, indent=1, default=str))
    return result


def _speedup(base: dict[str, float], opt: dict[str, float]) -> float | None:
    k = "output_tokens_per_s"
    return opt[k] / base[k] if base.get(k) and opt.get(k) else None


def gate_lines(gate: dict[str, Any]) -> list[str]:
    """One terminal line per pair."""
    lines = []
    for p in gate["pairs"]:
        kl = f", mean KL {p['mean_kl']:.2e}" if p["mean_kl"] is not None else ""
        sp = f", {p['speedup']:.2f}x tok/s" if p.get("speedup") else ""
        em = p["exact_match_rate"]
        lines.append(
            f"gate job {p['optimized']['job']} ({p['optimized']['label']}) vs baseline job "
            f"{p['baseline']['job']}: {p['verdict'].upper()} — "
            f"exact match {em:.0%}{kl}{sp}; {p['reason']}" if em is not None else
            f"gate job {p['optimized']['job']}: {p['verdict']} ({p['reason']})")
    return lines


_METRIC_FIELDS = ("exact_match_rate", "first_divergence_min", "mean_kl", "max_kl", "ppl_delta",
                  "speedup")


def gate_metrics(p: dict[str, Any]) -> dict[str, float]:
    """The numeric gate figures of one pair, as ``gate.*`` metrics."""
    out = {f"gate.{k}": float(p[k]) for k in _METRIC_FIELDS if p.get(k) is not None}
    out.update({f"gate.{k}": float(v) for k, v in p["task_metric_deltas"].items()})
    out["gate.verdict_code"] = float(g.VERDICTS.index(p["verdict"]))
    return out


def report_sweep_gate(config: Any, sweep_dir: Path) -> dict[str, Any] | None:
    """Sweep-end hook: run the gate, print a line per pair, log the figures to each
    optimized job's MLflow run and a summary to the parent. Never raises."""
    try:
        gate = sweep_gate(config, sweep_dir)
    except Exception as e:
        log.warning("gate: could not compare the sweep's optimized jobs: %s", e)
        return None
    if gate is None:
        return None
    print("\n".join(gate_lines(gate)))
    if not config.tracking.enabled:
        return gate
    try:
        client, _ = client_for(config)
        parent = read_parent_id(Path(sweep_dir))
        summary: dict[str, float] = {}
        tags: dict[str, str] = {}
        for p in gate["pairs"]:
            job = p["optimized"]["job"]
            metrics = gate_metrics(p)
            run_file = Path(sweep_dir) / p["optimized"]["dir"] / RUN_ID_FILE
            if run_file.is_file():
                log_metrics(client, run_file.read_text().strip(), metrics=metrics, tags={
                    "gate_verdict": p["verdict"], "gate_reason": p["reason"][:500],
                    "gate_baseline_job": str(p["baseline"]["job"]),
                    "gate_optimizations": ", ".join(
                        f"{k}={v}" for k, v in p["optimizations"].items())[:500]})
            summary.update({f"gate.job{job}.{k.removeprefix('gate.')}": v
                            for k, v in metrics.items()})
            tags[f"gate.job{job}.verdict"] = p["verdict"]
        if parent:
            log_metrics(client, parent, metrics=summary, tags=tags)
            client.log_artifact(parent, str(Path(sweep_dir) / GATE_FILE))
    except Exception as e:
        log.warning("gate: could not log to MLflow: %s", e)
    return gate


__all__ = ["report_sweep_gate", "sweep_gate", "gate_one", "find_pairs", "teacher_forced",
           "optimizations_on", "optimization_count", "gated_optimizations", "task_fields",
           "comparable_key", "kl_informative"]
