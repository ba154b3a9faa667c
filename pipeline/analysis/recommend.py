"""Recommend a decoding preset (or backend, engine setting...) per use case from a sweep.

``python -m pipeline.analysis.recommend --sweep-dir outputs/multirun/<time>`` (or ``--parent-run
ID``) reads the sweep with :mod:`pipeline.report.collect` and, for each task workload
(use case), ranks the decoding presets by the task's metric: the first of its reference
metrics (``scoring.reference_metrics``, else ``scoring.task_reference_metrics``). Jobs that
differ only in their seed (or repeat) are pooled. For each preset it reports the quality
(every ``ref_*`` metric), diversity (distinct-2, self-BLEU) and speed (TPOT, output
tokens/s) it achieved, with a 95% bootstrap confidence interval of the task metric over the
per-request scores kept in each record's ``extra["ref_scores"]``. When the best preset's
interval overlaps the runner-up's the table says **within noise**; equal scores go to the
faster preset (lower mean TPOT). ``--slo-tpot-ms`` leaves
out presets whose mean TPOT is above the objective. Markdown is printed and written.

``--by KEY[,KEY]`` compares what else the sweep varied (``backend``, ``backend.max_num_seqs``;
default: whatever differs between a task's jobs, see :mod:`pipeline.analysis.recommend_groups`),
``--slo-ttft-ms``/``--slo-e2el-ms``/``--slo-percentile``/``--min-rate`` add bounds, and each
excluded candidate is listed with the bound it broke. A job the gate judged ``degraded`` is
excluded (fast but wrong). A sweep without a task metric (a speed sweep) is ranked by output
tokens/s, with the 95% CI of its repeats (``output_tokens_per_s_ci95``) where it has one.

The ranking value is the mean per-request score: the corpus score itself for exact match,
F1, ROUGE-L and pass@1; the mean sentence-level score for BLEU and chrF (their corpus scores
are shown beside it).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.analysis.recommend_groups import (
    SPEED,
    SloBounds,
    candidate_label,
    check_keys,
    group_label,
    parse_keys,
    pooled_speed,
    varying_keys,
)
from pipeline.errors import ConfigError

#: the use-case decoding preset written for each task (shown as "use-case preset")
TASK_PRESET = {"task_qa": "factual_qa", "task_math": "factual_qa",
               "task_translation": "translation", "task_summarization": "summarization",
               "task_code": "code"}
DEFAULT_OUTPUT_DIR = Path("outputs")
N_BOOT = 2000


@dataclass
class JobScores:
    """One finished job, reduced to what a recommendation needs."""

    task: str
    preset: str
    metric: str
    metrics: dict[str, float]
    per_request: list[float] = field(default_factory=list)
    verdict: str = ""
    """The gate's verdict on the job (tag ``gate_verdict``), '' when it has none."""


@dataclass
class Candidate:
    """A decoding preset on a task: pooled over the jobs (seeds, repeats) that ran it."""

    task: str
    preset: str
    metric: str
    value: float
    ci: tuple[float, float] | None
    n_requests: int
    n_jobs: int
    metrics: dict[str, float]
    meets_slo: bool = True
    broke: list[str] = field(default_factory=list)
    """Why it is excluded: each SLO bound it broke, or the gate's ``degraded``."""


@dataclass
class Recommendation:
    """The ranking of one task; ``best`` and ``runner_up`` among those meeting the SLO."""

    task: str
    metric: str
    ranked: list[Candidate]
    excluded: list[Candidate]

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None

    @property
    def runner_up(self) -> Candidate | None:
        return self.ranked[1] if len(self.ranked) > 1 else None

    @property
    def within_noise(self) -> bool | None:
        """True when best and runner-up CIs overlap; None when either has no CI."""
        b, r = self.best, self.runner_up
        if b is None or r is None or b.ci is None or r.ci is None:
            return None
        return b.ci[0] <= r.ci[1] and r.ci[0] <= b.ci[1]


def bootstrap_ci(scores: list[float], n_boot: int = N_BOOT, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``scores``; None for fewer than 2."""
    if len(scores) < 2:
        return None
    import numpy as np

    x = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _task_metric(config: dict[str, Any], metrics: dict[str, float]) -> str | None:
    from pipeline.metrics.reference import metric_key

    scoring = config.get("scoring") or {}
    names = scoring.get("reference_metrics")
    if names is None:
        task = (config.get("workload") or {}).get("name", "")
        names = (scoring.get("task_reference_metrics") or {}).get(task) or []
    for n in names:
        if metric_key(str(n)) in metrics:
            return metric_key(str(n))
    refs = [k for k in metrics if k.startswith("ref_") and k != "ref_scored_requests"]
    return sorted(refs)[0] if refs else None


def preset_label(config: dict[str, Any], overrides: Iterable[str]) -> str:
    """The decoding preset's name plus any ``decoding.*`` overrides of the job."""
    return group_label(config, overrides, "decoding")


def _rows(jobs: Iterable[Any]) -> list[tuple[Any, dict, dict, dict[str, float], str]]:
    """(job, results, config, metrics, ranking metric) of the FINISHED jobs with a task
    metric, or of all those with output tokens/s when none has a task metric."""
    rows = []
    for j in jobs:
        res = j.results or {}
        if j.status != "FINISHED" or res.get("status", "FINISHED") != "FINISHED":
            continue
        config = res.get("config") or {}
        metrics = {k: float(v) for k, v in (j.metrics or res.get("metrics") or {}).items()}
        rows.append((j, res, config, metrics, _task_metric(config, metrics)))
    scored = [r for r in rows if r[4] is not None]
    if not scored:  # a speed sweep: every job that measured output tokens/s
        scored = [(*r[:4], SPEED) for r in rows if SPEED in r[3]]
    return scored  # type: ignore[return-value]


def grouping_keys(jobs: Iterable[Any], by: list[str] | None = None) -> list[str]:
    """The keys that tell candidates apart: ``by`` once checked against the jobs' configs
    (a key none has is a ConfigError), else what varies between a task's jobs."""
    rows = _rows(jobs)
    configs = [r[2] for r in rows]
    if by is not None:
        check_keys(by, configs)
    return by or varying_keys(configs, [r[1].get("choices") for r in rows])


def job_scores(jobs: Iterable[Any], by: list[str] | None = None) -> list[JobScores]:
    """The FINISHED jobs of a sweep (``collect.JobRun``s) that have a task metric, or all
    FINISHED ones ranked by output tokens/s when none has; each labelled by its values of
    the grouping keys (:func:`grouping_keys`)."""
    jobs = list(jobs)
    keys = grouping_keys(jobs, by)
    out: list[JobScores] = []
    for j, res, config, metrics, metric in _rows(jobs):
        per = [float(r["extra"]["ref_scores"][metric]) for r in res.get("requests") or []
               if metric in ((r.get("extra") or {}).get("ref_scores") or {})]
        task = str((config.get("workload") or {}).get("name", "?"))
        label = candidate_label(config, res.get("overrides") or [], keys, res.get("choices"))
        verdict = str((getattr(j, "tags", None) or {}).get("gate_verdict", ""))
        out.append(JobScores(task, label, metric, metrics, per, verdict))
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def recommend(jobs: list[JobScores], slo_tpot_ms: float | None = None,
              n_boot: int = N_BOOT, seed: int = 0,
              bounds: SloBounds | None = None) -> list[Recommendation]:
    """Pool jobs by (task, preset), rank each task's presets by the task metric (highest
    first), and leave out the presets above ``slo_tpot_ms`` (mean TPOT), those breaking
    any of ``bounds``, and those with a job the gate judged ``degraded``."""
    if bounds is None:
        bounds = SloBounds(tpot_ms=slo_tpot_ms)
    groups: dict[tuple[str, str, str], list[JobScores]] = {}
    for js in jobs:
        groups.setdefault((js.task, js.metric, js.preset), []).append(js)
    by_task: dict[tuple[str, str], list[Candidate]] = {}
    for (task, metric, preset), members in groups.items():
        pooled = [s for m in members for s in m.per_request]
        keys = sorted({k for m in members for k in m.metrics})
        means = {k: _mean([m.metrics[k] for m in members if k in m.metrics]) for k in keys}
        if metric == SPEED:
            value, ci = pooled_speed([m.metrics for m in members])
        else:
            value = _mean(pooled) if pooled else means[metric]
            ci = bootstrap_ci(pooled, n_boot, seed)
        broke = bounds.broken(means)
        if any(m.verdict == "degraded" for m in members):
            broke.append("gate verdict degraded: fast but wrong")
        by_task.setdefault((task, metric), []).append(Candidate(
            task, preset, metric, value, ci, len(pooled), len(members), means, not broke,
            broke))
    recs = []
    for (task, metric), cands in sorted(by_task.items()):
        # ties go to the faster preset (lower mean TPOT), then by name
        cands.sort(key=lambda c: (-c.value, c.metrics.get("tpot_ms_mean", math.inf),
                                  c.preset))
        recs.append(Recommendation(task, metric, [c for c in cands if c.meets_slo],
                                   [c for c in cands if not c.meets_slo]))
    return recs


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _score(c: Candidate | None) -> str:
    if c is None:
        return "-"
    spec = ".1f" if c.metric == SPEED else ".3f"
    if c.ci is None:
        return f"{c.value:{spec}}" + (" (single measurement)" if c.metric == SPEED
                                      else " (no CI)")
    return f"{c.value:{spec}} [{c.ci[0]:{spec}}, {c.ci[1]:{spec}}]"


def _note(r: Recommendation, noun: str = "preset") -> str:
    if r.best is None:
        slo = any(b != "gate verdict degraded: fast but wrong" for c in r.excluded
                  for b in c.broke)
        return f"no {noun} meets the SLO" if slo else f"no {noun} left (gate: degraded)"
    if r.runner_up is None:
        return f"only one {noun}"
    wn = r.within_noise
    if wn is None:
        return ("single measurement (no repeats, no CI)" if r.metric == SPEED
                else "no CI (no per-request scores)")
    if r.best.value == r.runner_up.value:
        return (f"**within noise**: tie (equal scores; the faster {noun} is listed first)"
                if r.metric != SPEED else "**within noise**: tie (equal tok/s)")
    return ("**within noise**: best and runner-up CIs overlap" if wn
            else "best is ahead beyond noise")


def _header(recs: list[Recommendation], by: list[str] | None) -> list[str]:
    """Title and the line saying what is ranked by what."""
    decoding = by in (None, ["decoding"])
    title = ("# Decoding recommendations per use case" if decoding else
             f"# Recommendations per use case (by {', '.join(by or [])})")
    if recs and all(r.metric == SPEED for r in recs):
        how = ("Ranked by output tokens/s (higher is better): the sweep has no task metric. "
               "95% CI from the repeats (output_tokens_per_s_ci95), else single measurement "
               "(pooled over seeds).")
    else:
        how = ("Task metric: the first reference metric of the task; 95% bootstrap CI over "
               "per-request scores (pooled over seeds/repeats).")
    return [title, "", how]


def render_markdown(recs: list[Recommendation], source: str = "",
                    slo_tpot_ms: float | None = None, bounds: SloBounds | None = None,
                    by: list[str] | None = None) -> str:
    """The recommendation as markdown: a summary table, then each task's full ranking and
    the excluded candidates with the bound each broke. ``by``: the grouping keys (None or
    ``["decoding"]``: decoding presets)."""
    bounds = bounds or SloBounds(tpot_ms=slo_tpot_ms)
    noun = "preset" if by in (None, ["decoding"]) else "candidate"
    title, blank, how = _header(recs, by)
    lines = [title, blank]
    if source:
        lines += [f"Sweep: {source}", ""]
    lines += [how + (f" {bounds.describe()}" if bounds.any else ""), "",
              f"| use case | metric | best {noun} | score [95% CI] | runner-up | score [95% CI] "
              "| note | distinct-2 | self-BLEU | TPOT ms | out tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        b, ru = r.best, r.runner_up
        m = b.metrics if b else {}
        lines.append(
            f"| {r.task} | {r.metric} | {b.preset if b else '-'} | {_score(b)} | "
            f"{ru.preset if ru else '-'} | {_score(ru)} | {_note(r, noun)} | "
            f"{_fmt(m.get('distinct_2'))} | {_fmt(m.get('self_bleu'))} | "
            f"{_fmt(m.get('tpot_ms_mean'), '.1f')} | {_fmt(m.get('output_tokens_per_s'), '.1f')} |")
    for r in recs:
        ref_keys = sorted({k for c in r.ranked + r.excluded for k in c.metrics
                           if k.startswith("ref_") and k != "ref_scored_requests"})
        own = TASK_PRESET.get(r.task)
        head = ["rank", noun, "score [95% CI]", "n", "jobs", *ref_keys, "distinct-2",
                "self-BLEU", "TPOT ms", "out tok/s"]
        lines += ["", f"## {r.task} ({r.metric})", "", "| " + " | ".join(head) + " |",
                  "|---" * len(head) + "|"]
        for i, c in enumerate(r.ranked + r.excluded, start=1):
            rank = str(i) if c.meets_slo else ("SLO x" if any(
                "degraded" not in b for b in c.broke) else "excluded")
            name = c.preset + (" (use-case preset)" if own and c.preset == own else "")
            cells = [rank, name, _score(c), str(c.n_requests) if c.metric != SPEED else "-",
                     str(c.n_jobs), *(_fmt(c.metrics.get(k)) for k in ref_keys),
                     _fmt(c.metrics.get("distinct_2")), _fmt(c.metrics.get("self_bleu")),
                     _fmt(c.metrics.get("tpot_ms_mean"), ".1f"),
                     _fmt(c.metrics.get("output_tokens_per_s"), ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
        if r.excluded:
            lines += ["", "Excluded: " + "; ".join(f"{c.preset} ({', '.join(c.broke)})"
                                                   for c in r.excluded)]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.analysis.recommend", description=(
        "Best decoding preset (or whatever the sweep varied) per use case (task) of a "
        "sweep, read from MLflow."))
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep-dir", type=Path, help="a multirun folder")
    which.add_argument("--parent-run", help="the sweep's parent run id")
    ap.add_argument("--tracking-uri", help="MLflow store (default: the sweep folder's store, "
                    "else sqlite under outputs/mlflow)")
    ap.add_argument("--by", help="grouping keys, comma-separated: dotted config keys "
                    "(backend.max_num_seqs) or groups (backend, decoding, model); default: "
                    "what differs between a task's jobs (seed and repeats pooled)")
    ap.add_argument("--slo-tpot-ms", type=float, help="leave out presets above this mean TPOT")
    ap.add_argument("--slo-ttft-ms", type=float, help="leave out candidates above this TTFT")
    ap.add_argument("--slo-e2el-ms", type=float, help="leave out candidates above this E2EL")
    ap.add_argument("--slo-percentile", type=int, help="the SLOs hold at this percentile "
                    "(50, 90 or 99: those a job logs); default: the mean")
    ap.add_argument("--min-rate", type=float, help="leave out load-profile candidates whose "
                    "max_rate_under_slo (req/s) is below this")
    ap.add_argument("--output", type=Path, help="markdown file (default: "
                    "outputs/reports/<sweep>/recommendations.md)")
    ap.add_argument("--n-boot", type=int, default=N_BOOT, help="bootstrap resamples")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry: read the sweep from MLflow, rank, print and write the markdown."""
    args = _parser().parse_args(argv)
    try:
        bounds = SloBounds(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms,
                           args.slo_percentile, args.min_rate)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    by = parse_keys(args.by)
    from mlflow.exceptions import MlflowException

    from pipeline.report.collect import ReportError, collect_sweep

    try:
        _, data = collect_sweep(args.tracking_uri, sweep_dir=args.sweep_dir,
                                run_id=args.parent_run, output_dir=DEFAULT_OUTPUT_DIR)
        pid = data.parent_id
    except (ReportError, MlflowException) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    try:
        keys = grouping_keys(data.jobs, by)
        scores = job_scores(data.jobs, keys)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not scores:
        print(f"error: no FINISHED job of sweep {pid} has a reference metric (ref_*) or "
              "output tokens/s", file=sys.stderr)
        return 1
    text = render_markdown(recommend(scores, n_boot=args.n_boot, bounds=bounds),
                           f"{data.sweep_name} (parent run {pid})", bounds=bounds,
                           by=keys)
    out = args.output or DEFAULT_OUTPUT_DIR / "reports" / data.sweep_name / "recommendations.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
