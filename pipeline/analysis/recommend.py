"""Recommend a decoding preset per use case from a sweep in MLflow.

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
    name = str((config.get("decoding") or {}).get("name", "?"))
    extra = sorted(o for o in overrides if o.lstrip("+").startswith("decoding."))
    return " ".join([name, *extra])


def job_scores(jobs: Iterable[Any]) -> list[JobScores]:
    """The FINISHED jobs of a sweep (``collect.JobRun``s) that have a task metric."""
    out: list[JobScores] = []
    for j in jobs:
        res = j.results or {}
        if j.status != "FINISHED" or res.get("status", "FINISHED") != "FINISHED":
            continue
        config = res.get("config") or {}
        metrics = {k: float(v) for k, v in (j.metrics or res.get("metrics") or {}).items()}
        metric = _task_metric(config, metrics)
        if metric is None:
            continue
        per = [float(r["extra"]["ref_scores"][metric]) for r in res.get("requests") or []
               if metric in ((r.get("extra") or {}).get("ref_scores") or {})]
        task = str((config.get("workload") or {}).get("name", "?"))
        out.append(JobScores(task, preset_label(config, res.get("overrides") or []), metric,
                             metrics, per))
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def recommend(jobs: list[JobScores], slo_tpot_ms: float | None = None,
              n_boot: int = N_BOOT, seed: int = 0) -> list[Recommendation]:
    """Pool jobs by (task, preset), rank each task's presets by the task metric (highest
    first), and leave out the presets above ``slo_tpot_ms`` (mean TPOT)."""
    groups: dict[tuple[str, str, str], list[JobScores]] = {}
    for js in jobs:
        groups.setdefault((js.task, js.metric, js.preset), []).append(js)
    by_task: dict[tuple[str, str], list[Candidate]] = {}
    for (task, metric, preset), members in groups.items():
        pooled = [s for m in members for s in m.per_request]
        keys = sorted({k for m in members for k in m.metrics})
        means = {k: _mean([m.metrics[k] for m in members if k in m.metrics]) for k in keys}
        value = _mean(pooled) if pooled else means[metric]
        tpot = means.get("tpot_ms_mean")
        ok = slo_tpot_ms is None or (tpot is not None and tpot <= slo_tpot_ms)
        by_task.setdefault((task, metric), []).append(Candidate(
            task, preset, metric, value, bootstrap_ci(pooled, n_boot, seed), len(pooled),
            len(members), means, ok))
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
    ci = f" [{c.ci[0]:.3f}, {c.ci[1]:.3f}]" if c.ci else " (no CI)"
    return f"{c.value:.3f}{ci}"


def _note(r: Recommendation) -> str:
    if r.best is None:
        return "no preset meets the SLO"
    if r.runner_up is None:
        return "only one preset"
    wn = r.within_noise
    if wn is None:
        return "no CI (no per-request scores)"
    if r.best.value == r.runner_up.value:
        return "**within noise**: tie (equal scores; the faster preset is listed first)"
    return ("**within noise**: best and runner-up CIs overlap" if wn
            else "best is ahead beyond noise")


def render_markdown(recs: list[Recommendation], source: str = "",
                    slo_tpot_ms: float | None = None) -> str:
    """The recommendation as markdown: a summary table, then each task's full ranking."""
    lines = ["# Decoding recommendations per use case", ""]
    if source:
        lines += [f"Sweep: {source}", ""]
    lines += ["Task metric: the first reference metric of the task; 95% bootstrap CI over "
              "per-request scores (pooled over seeds/repeats)."
              + (f" SLO: mean TPOT <= {slo_tpot_ms:g} ms." if slo_tpot_ms else ""), "",
              "| use case | metric | best preset | score [95% CI] | runner-up | score [95% CI] "
              "| note | distinct-2 | self-BLEU | TPOT ms | out tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        b, ru = r.best, r.runner_up
        m = b.metrics if b else {}
        lines.append(
            f"| {r.task} | {r.metric} | {b.preset if b else '-'} | {_score(b)} | "
            f"{ru.preset if ru else '-'} | {_score(ru)} | {_note(r)} | "
            f"{_fmt(m.get('distinct_2'))} | {_fmt(m.get('self_bleu'))} | "
            f"{_fmt(m.get('tpot_ms_mean'), '.1f')} | {_fmt(m.get('output_tokens_per_s'), '.1f')} |")
    for r in recs:
        ref_keys = sorted({k for c in r.ranked + r.excluded for k in c.metrics
                           if k.startswith("ref_") and k != "ref_scored_requests"})
        own = TASK_PRESET.get(r.task)
        lines += ["", f"## {r.task} ({r.metric})", "",
                  "| rank | preset | score [95% CI] | n | jobs | " + " | ".join(ref_keys)
                  + " | distinct-2 | self-BLEU | TPOT ms | out tok/s |",
                  "|---" * (9 + len(ref_keys)) + "|"]
        for i, c in enumerate(r.ranked + r.excluded, start=1):
            rank = str(i) if c.meets_slo else "SLO x"
            name = c.preset + (" (use-case preset)" if own and c.preset == own else "")
            lines.append(
                f"| {rank} | {name} | {_score(c)} | {c.n_requests} | {c.n_jobs} | "
                + " | ".join(_fmt(c.metrics.get(k)) for k in ref_keys)
                + f" | {_fmt(c.metrics.get('distinct_2'))} | {_fmt(c.metrics.get('self_bleu'))}"
                f" | {_fmt(c.metrics.get('tpot_ms_mean'), '.1f')}"
                f" | {_fmt(c.metrics.get('output_tokens_per_s'), '.1f')} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.analysis.recommend", description=(
        "Best decoding preset per use case (task) of a sweep, read from MLflow."))
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep-dir", type=Path, help="a multirun folder")
    which.add_argument("--parent-run", help="the sweep's parent run id")
    ap.add_argument("--tracking-uri", help="MLflow store (default: the sweep folder's store, "
                    "else sqlite under outputs/mlflow)")
    ap.add_argument("--slo-tpot-ms", type=float, help="leave out presets above this mean TPOT")
    ap.add_argument("--output", type=Path, help="markdown file (default: "
                    "outputs/reports/<sweep>/recommendations.md)")
    ap.add_argument("--n-boot", type=int, default=N_BOOT, help="bootstrap resamples")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry: read the sweep from MLflow, rank, print and write the markdown."""
    args = _parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    from pipeline.report.collect import ReportError, collect_sweep

    try:
        _, data = collect_sweep(args.tracking_uri, sweep_dir=args.sweep_dir,
                                run_id=args.parent_run, output_dir=DEFAULT_OUTPUT_DIR)
        pid = data.parent_id
    except (ReportError, MlflowException) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    scores = job_scores(data.jobs)
    if not scores:
        print(f"error: no FINISHED job of sweep {pid} has a reference metric (ref_*); run "
              "task workloads, e.g. -m +experiment=use_cases", file=sys.stderr)
        return 1
    text = render_markdown(recommend(scores, args.slo_tpot_ms, args.n_boot),
                           f"{data.sweep_name} (parent run {pid})", args.slo_tpot_ms)
    out = args.output or DEFAULT_OUTPUT_DIR / "reports" / data.sweep_name / "recommendations.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
