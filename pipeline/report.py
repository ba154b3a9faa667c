"""Sweep report: from MLflow alone to ``report.md``, a self-contained ``report.html`` and PNGs.

    python -m pipeline.report                       # the latest sweep in outputs/mlflow
    python -m pipeline.report --sweep-dir outputs/multirun/2026-11-26_23-16-44
    python -m pipeline.report --run-id <parent run id> --baseline decoding=greedy

The flow is ``find_parent`` -> :func:`collect` (runs, params, metrics, tags, and each job's
``results.json`` downloaded from the artifact store) -> :func:`tables` (a pure function of
that data) -> :func:`build_sections` -> :func:`render_markdown` / :func:`render_html`.
Nothing is read from the job folders, so a report rebuilt after they are deleted has the
same tables. The report is logged back to the sweep's parent run, which is tagged with it.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import json
import re
import shlex
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

DEFAULT_OUTPUT_DIR = Path("outputs")
NOTE_MARKER = "<!-- infersweep-report -->"
UI_BASE = "http://127.0.0.1:5000"


class ReportError(RuntimeError):
    """The sweep cannot be found or reported (no store, no parent run, bad baseline)."""


@dataclass(frozen=True)
class MetricSpec:
    """A metric column: MLflow key, header, number format and which direction is better."""

    key: str
    header: str
    fmt: str  # a format spec, or "mib" for bytes shown in MiB
    higher_is_better: bool


# The jobs table's metric columns (a column appears when any job has the metric).
JOB_METRICS = (
    MetricSpec("output_tokens_per_s", "out tok/s", ".1f", True),
    MetricSpec("ttft_ms_mean", "TTFT mean ms", ".0f", False),
    MetricSpec("tpot_ms_mean", "TPOT mean ms", ".1f", False),
    MetricSpec("e2el_ms_mean", "E2EL mean ms", ".0f", False),
    MetricSpec("e2el_ms_p90", "E2EL p90 ms", ".0f", False),
    MetricSpec("peak_rss_bytes", "peak RSS MiB", "mib", False),
    MetricSpec("cuda_max_allocated_bytes", "CUDA max alloc MiB", "mib", False),
    MetricSpec("perplexity", "PPL", ".3f", False),
    MetricSpec("self_bleu", "self-BLEU", ".3f", False),
    MetricSpec("distinct_2", "distinct-2", ".3f", True),
    MetricSpec("rep_2", "rep-2", ".3f", False),
)
SPECS = {m.key: m for m in JOB_METRICS}
# Speed-up vs the baseline: (metric, column, header); throughput is job/base, latency base/job.
SPEEDUPS = (
    ("output_tokens_per_s", "throughput_x", "throughput ×"),
    ("ttft_ms_mean", "ttft_speedup_x", "TTFT speed-up ×"),
    ("tpot_ms_mean", "tpot_speedup_x", "TPOT speed-up ×"),
    ("e2el_ms_mean", "e2el_speedup_x", "E2EL speed-up ×"),
)
# Memory saving vs the baseline, in percent of the baseline's figure.
SAVINGS = (
    ("peak_rss_bytes", "peak_rss_saving_pct", "peak RSS saving %"),
    ("cuda_max_allocated_bytes", "cuda_alloc_saving_pct", "CUDA max alloc saving %"),
)
TRADEOFF_METRICS = ("perplexity", "self_bleu", "distinct_2", "rep_2", "output_tokens_per_s")
# Params that say where files go or how runs are logged, never what was measured.
BOOKKEEPING_PARAMS = ("paths.", "tracking.", "print_table", "dry_run", "resume")
PLOTS = {
    "quality_vs_diversity": "Quality vs diversity: perplexity against self-BLEU, one point a job.",
    "throughput_vs_latency": "Output tokens/s against mean E2EL and mean TTFT; the Pareto "
                             "front (no job is both faster and lower-latency) is ringed.",
    "latency_distributions": "Per-request latencies (the first measured repeat of each job, "
                             "from its results.json in MLflow).",
}


@dataclass
class JobRun:
    """One job of the sweep: a child run as stored in MLflow."""

    run_id: str
    name: str
    job: int
    status: str
    start_time: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    results: dict[str, Any] | None = None  # the run's results.json artifact


@dataclass
class SweepData:
    """Everything a report is built from, all read from MLflow."""

    tracking_uri: str
    experiment_id: str
    experiment_name: str
    parent_id: str
    parent_name: str
    parent_status: str
    parent_start_time: int
    parent_tags: dict[str, str]
    jobs: list[JobRun] = field(default_factory=list)
    parent_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def sweep_name(self) -> str:
        """The sweep folder's name (its timestamp), else the parent run's name."""
        d = self.parent_tags.get("sweep_dir")
        return Path(d).name if d else self.parent_name


# --------------------------------------------------------------------------- locating


def default_tracking_uri(output_dir: Path = DEFAULT_OUTPUT_DIR) -> str:
    """The pipeline's default store: ``<output_dir>/mlflow/mlflow.db`` (absolute)."""
    return f"sqlite:///{(output_dir / 'mlflow' / 'mlflow.db').resolve()}"


def store_for_sweep_dir(sweep_dir: Path) -> str | None:
    """The store a sweep folder logged to: its ``tracking.uri`` (from Hydra's
    ``multirun.yaml``) when set, else the default store of its output dir
    (``<output_dir>/multirun/<time>`` -> ``<output_dir>/mlflow/mlflow.db``)."""
    multirun = sweep_dir / "multirun.yaml"
    if multirun.is_file():
        from omegaconf import OmegaConf

        try:
            uri = OmegaConf.select(OmegaConf.load(multirun), "tracking.uri")
        except Exception:  # an unreadable file only loses the hint
            uri = None
        if uri:
            return str(uri)
    db = sweep_dir.resolve().parent.parent / "mlflow" / "mlflow.db"
    return f"sqlite:///{db}" if db.is_file() else None


def open_client(uri: str) -> Any:
    """An MlflowClient on ``uri``; a missing SQLite file is an error (not a new empty store)."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_absolute():
            path = Path("/") / path
        if not path.is_file():
            raise ReportError(f"no MLflow store at {path} (pass --tracking-uri)")
    return MlflowClient(tracking_uri=uri)


def find_parent(client: Any, *, run_id: str | None = None, sweep_dir: Path | None = None,
                experiment: str | None = None) -> str:
    """The sweep's parent run id: given, read from the sweep folder (its id file or the
    parent's ``sweep_dir`` tag), or the latest ``kind=sweep`` run (of ``experiment``)."""
    if run_id:
        return str(client.get_run(run_id).info.run_id)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ReportError(f"no MLflow experiment named {experiment!r}")
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    filt = "tags.kind = 'sweep'"
    if sweep_dir is not None:
        from pipeline.tracking import read_parent_id

        pid = read_parent_id(sweep_dir)
        if pid:
            return pid
        filt += f" and tags.sweep_dir = '{sweep_dir.resolve()}'"
    runs = client.search_runs(exp_ids, filter_string=filt,
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        where = f" for {sweep_dir}" if sweep_dir else ""
        raise ReportError(f"no sweep parent run (tag kind=sweep){where} in this store")
    return str(runs[0].info.run_id)


# --------------------------------------------------------------------------- collecting


def _all_runs(client: Any, exp_id: str, filt: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string=filt, max_results=1000,
                                  page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _download_json(client: Any, run_id: str, path: str, dst: str) -> dict[str, Any] | None:
    try:
        local = client.download_artifacts(run_id, path, dst)
        data = json.loads(Path(local).read_text())
    except Exception:  # a job that failed before writing it has none
        return None
    return data if isinstance(data, dict) else None


def _job_number(name: str, results: dict[str, Any] | None) -> int | None:
    if results and isinstance(results.get("job_num"), int):
        return int(results["job_num"])
    m = re.match(r"(\d+)-", name or "")
    return int(m.group(1)) if m else None


def collect(client: Any, parent_id: str, tracking_uri: str | None = None) -> SweepData:
    """Read a sweep from MLflow: the parent run, its child runs (one per job) and each
    child's ``results.json`` from the artifact store."""
    import os

    # one progress bar per downloaded file would drown the command's own output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parent = client.get_run(parent_id)
    exp = client.get_experiment(parent.info.experiment_id)
    children = _all_runs(client, exp.experiment_id, f"tags.mlflow.parentRunId = '{parent_id}'")
    jobs: list[JobRun] = []
    with tempfile.TemporaryDirectory(prefix="infersweep-report-") as tmp:
        for i, r in enumerate(sorted(children, key=lambda r: r.info.start_time)):
            dst = Path(tmp) / r.info.run_id
            dst.mkdir()
            results = _download_json(client, r.info.run_id, "results.json", str(dst))
            num = _job_number(r.info.run_name, results)
            jobs.append(JobRun(
                run_id=r.info.run_id, name=r.info.run_name or r.info.run_id,
                job=num if num is not None else i, status=r.info.status,
                start_time=int(r.info.start_time or 0), tags=dict(r.data.tags),
                params=dict(r.data.params), metrics=dict(r.data.metrics), results=results,
            ))
    jobs.sort(key=lambda j: (j.job, j.start_time))
    return SweepData(
        tracking_uri=tracking_uri or str(getattr(client, "tracking_uri", "") or
                                         client._tracking_client.tracking_uri),
        experiment_id=str(exp.experiment_id), experiment_name=exp.name,
        parent_id=parent_id, parent_name=parent.info.run_name or parent_id,
        parent_status=parent.info.status, parent_start_time=int(parent.info.start_time or 0),
        parent_tags=dict(parent.data.tags), jobs=jobs,
        parent_metrics=dict(parent.data.metrics),
    )


# --------------------------------------------------------------------------- pure helpers


def swept_params(jobs: list[JobRun]) -> list[str]:
    """The params whose values differ across jobs (bookkeeping params left out).

    A param only some jobs have (``backend.max_num_seqs`` when hf meets vllm) comes with a
    preset, so it is left out unless an override names it."""
    named = {t.split("=", 1)[0].lstrip("+~") for j in jobs
             for t in j.tags.get("hydra_overrides", "").split() if "=" in t}
    keys = sorted({k for j in jobs for k in j.params})
    out = []
    for k in keys:
        if k.startswith(BOOKKEEPING_PARAMS):
            continue
        if not all(k in j.params for j in jobs) and k not in named:
            continue
        if len({j.params.get(k) for j in jobs}) > 1:
            out.append(k)
    # the preset's name first: it is what the user swept, the rest follows from it
    return sorted(out, key=lambda k: (not k.endswith(".name"), k))


def varying_overrides(jobs: list[JobRun]) -> dict[str, str]:
    """Per run id, the job's Hydra overrides less those every job shares (what was swept)."""
    toks = {j.run_id: j.tags.get("hydra_overrides", "").split() for j in jobs}
    common = set.intersection(*(set(t) for t in toks.values())) if len(jobs) > 1 else set()
    out = {}
    for j in jobs:
        mine = [t for t in toks[j.run_id] if t not in common]
        out[j.run_id] = " ".join(mine) or j.tags.get("decoding") or j.name
    return out


def short_label(job: JobRun, overrides: str) -> str:
    """A plot label: the job number and the swept values (``0 greedy``)."""
    vals = [t.split("=", 1)[1] if "=" in t else t for t in overrides.split()]
    return f"{job.job} {' '.join(vals)}".strip()


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (latency, throughput) points: True where no other point has latency <= and
    throughput >= with at least one strict (lower latency and higher throughput win)."""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y)
            for k, (x2, y2) in enumerate(points) if k != i
        )
        out.append(not dominated)
    return out


def select_job(jobs: list[JobRun], selector: str | None) -> JobRun:
    """The job a selector names: ``key=value`` terms (all must match a tag, a param, a
    param's ``.name``, or the job's overrides; ``job=N`` is the job number) or a run
    name / run id. No selector: the first FINISHED job."""
    if not jobs:
        raise ValueError("the sweep has no job runs")
    if not selector:
        return next((j for j in jobs if j.status == "FINISHED"), jobs[0])
    terms = selector.split()

    def matches(j: JobRun, term: str) -> bool:
        if "=" not in term:
            return term in (j.run_id, j.name, str(j.job))
        k, v = term.split("=", 1)
        if k == "job":
            return str(j.job) == v
        return (j.tags.get(k) == v or j.params.get(k) == v or j.params.get(f"{k}.name") == v
                or term in j.tags.get("hydra_overrides", "").split())

    hits = [j for j in jobs if all(matches(j, t) for t in terms)]
    if len(hits) != 1:
        names = ", ".join(f"{j.job}:{j.name}" for j in (hits or jobs))
        what = "no job matches" if not hits else f"{len(hits)} jobs match"
        raise ValueError(f"baseline {selector!r}: {what} ({names}); refine it, e.g. "
                         f"'decoding=greedy backend=hf' or a run name")
    return hits[0]


def request_latencies(results: dict[str, Any] | None) -> tuple[list[float], list[float]]:
    """Per-request E2EL and TTFT in ms from a results.json's ``requests`` (errors left out)."""
    e2el: list[float] = []
    ttft: list[float] = []
    for r in (results or {}).get("requests") or []:
        if r.get("error") or r.get("t_start") is None or r.get("t_end") is None:
            continue
        e2el.append((float(r["t_end"]) - float(r["t_start"])) * 1000)
        if r.get("t_first_token") is not None:
            ttft.append((float(r["t_first_token"]) - float(r["t_start"])) * 1000)
    return e2el, ttft


def throughput(job: JobRun) -> float | None:
    """Output tokens/s: the pooled figure (total tokens / total measured wall time)."""
    return job.metrics.get("output_tokens_per_s")


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _quantile(v: list[float], q: float) -> float | None:
    if not v:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(v, dtype=float), q))


def _extremes(values: dict[str, float | None], higher_is_better: bool
              ) -> tuple[set[str], set[str]]:
    """The best and worst ids, empty when every value is the same (nothing to rank)."""
    known = {k: v for k, v in values.items() if v is not None}
    if len(known) < 2 or len(set(known.values())) == 1:
        return set(), set()
    hi, lo = max(known.values()), min(known.values())
    best, worst = (hi, lo) if higher_is_better else (lo, hi)
    return ({k for k, v in known.items() if v == best},
            {k for k, v in known.items() if v == worst})


# Words for the trade-off readings: metric -> (best, worst).
READING_WORDS = {
    "output_tokens_per_s": ("fastest", "slowest"),
    "perplexity": ("lowest perplexity", "highest perplexity"),
    "self_bleu": ("most diverse across prompts (lowest self-BLEU)",
                  "least diverse across prompts (highest self-BLEU)"),
    "distinct_2": ("most distinct bigrams", "fewest distinct bigrams"),
    "rep_2": ("least repetition", "most repetition"),
}


def readings(jobs: list[JobRun], baseline: JobRun) -> dict[str, str]:
    """Per run id, a neutral one-line reading derived from the numbers: where the job is
    the best or worst of the sweep on each trade-off metric, and its speed vs the baseline."""
    parts: dict[str, list[str]] = {j.run_id: [] for j in jobs}
    for key, (best_word, worst_word) in READING_WORDS.items():
        vals = {j.run_id: j.metrics.get(key) for j in jobs if j.status == "FINISHED"}
        best, worst = _extremes(vals, SPECS[key].higher_is_better)
        for rid in best:
            parts[rid].append(("tied " if len(best) > 1 else "") + best_word)
        for rid in worst:
            parts[rid].append(("tied " if len(worst) > 1 else "") + worst_word)
    out = {}
    base_tps = throughput(baseline)
    for j in jobs:
        if j.status != "FINISHED":
            out[j.run_id] = f"job {j.status.lower()}: no numbers to compare"
            continue
        words = parts[j.run_id] or ["neither best nor worst on any of these metrics"]
        r = _ratio(throughput(j), base_tps)
        speed = "baseline" if j.run_id == baseline.run_id else (
            f"{r:.2f}× the baseline's tok/s" if r is not None else "")
        out[j.run_id] = "; ".join([*words, speed] if speed else words)
    return out


# --------------------------------------------------------------------------- tables


def tables(data: SweepData, baseline: str | None = None) -> dict[str, pd.DataFrame]:
    """The report's tables, a pure function of the MLflow data (raw numbers, unformatted).

    Keys: ``jobs``, ``vs_baseline``, ``pareto``, ``latency``, ``tradeoffs``, ``applied``,
    ``provenance``. Metric columns carry their MLflow metric keys.
    """
    jobs = data.jobs
    base = select_job(jobs, baseline)
    axes = swept_params(jobs)
    over = varying_overrides(jobs)
    present = [m.key for m in JOB_METRICS if any(m.key in j.metrics for j in jobs)]
    with_ci = [k for k in present if any(f"{k}_ci95" in j.metrics for j in jobs)]

    rows = []
    for j in jobs:
        row: dict[str, Any] = {"job": j.job, "run": j.name, "run_id": j.run_id,
                               "status": j.status, "overrides": over[j.run_id]}
        row.update({a: j.params.get(a) for a in axes})
        for k in present:
            row[k] = j.metrics.get(k)
            if k in with_ci:
                # the CI is over per-repeat figures, so it goes with their mean
                row[f"{k}_repeat_mean"] = j.metrics.get(f"{k}_repeat_mean")
                row[f"{k}_ci95"] = j.metrics.get(f"{k}_ci95")
        rows.append(row)
    out: dict[str, pd.DataFrame] = {"jobs": pd.DataFrame(rows)}

    rows = []
    for j in jobs:
        row = {"job": j.job, "overrides": over[j.run_id],
               "is_baseline": j.run_id == base.run_id}
        for key, col, _ in SPEEDUPS:
            if key in present:
                a, b = j.metrics.get(key), base.metrics.get(key)
                row[col] = _ratio(a, b) if key == "output_tokens_per_s" else _ratio(b, a)
        for key, col, _ in SAVINGS:
            if key in present:
                r = _ratio(j.metrics.get(key), base.metrics.get(key))
                row[col] = None if r is None else (1 - r) * 100
        rows.append(row)
    out["vs_baseline"] = pd.DataFrame(rows)

    lat_keys = [k for k in ("e2el_ms_mean", "ttft_ms_mean") if k in present]
    ok = [j for j in jobs if throughput(j) is not None]
    rows = [{"job": j.job, "overrides": over[j.run_id], "output_tokens_per_s": throughput(j),
             **{k: j.metrics.get(k) for k in lat_keys}} for j in ok]
    for k in lat_keys:
        pts = [(r[k], r["output_tokens_per_s"]) for r in rows if r[k] is not None]
        front = iter(pareto_front(pts))
        for r in rows:
            r[f"front_{k}"] = next(front) if r[k] is not None else None
    out["pareto"] = pd.DataFrame(rows)

    rows = []
    for j in jobs:
        e2el, ttft = request_latencies(j.results)
        rows.append({"job": j.job, "overrides": over[j.run_id], "requests": len(e2el),
                     "e2el_ms_min": min(e2el) if e2el else None,
                     "e2el_ms_median": _quantile(e2el, 50), "e2el_ms_p90": _quantile(e2el, 90),
                     "e2el_ms_max": max(e2el) if e2el else None,
                     "ttft_ms_median": _quantile(ttft, 50)})
    out["latency"] = pd.DataFrame(rows)

    dec_axes = [a for a in axes if a.startswith("decoding.") and a != "decoding.name"]
    reads = readings(jobs, base)
    rows = []
    for j in jobs:
        settings = " ".join(f"{a.removeprefix('decoding.')}={j.params.get(a)}" for a in dec_axes)
        others = [t for t in over[j.run_id].split() if not t.startswith("decoding")]
        row = {"job": j.job, "decoding": j.tags.get("decoding", j.params.get("decoding.name")),
               "settings": settings, "other axes": " ".join(others)}
        row.update({k: j.metrics.get(k) for k in TRADEOFF_METRICS})
        row["reading"] = reads[j.run_id]
        rows.append(row)
    out["tradeoffs"] = pd.DataFrame(rows)

    applied = [(j, (j.results or {}).get("applied") or {}) for j in jobs]
    keys = sorted({k for _, a in applied for k in a})
    out["applied"] = pd.DataFrame(
        [{"job": j.job, **{k: a.get(k) for k in keys}} for j, a in applied if a])
    out["provenance"] = pd.DataFrame(provenance_rows(data), columns=["item", "value"])
    return out


def _joined(values: list[Any]) -> str:
    """One value, or the distinct values in first-seen order joined by ' / '."""
    seen: list[str] = []
    for v in values:
        s = "" if v is None else str(v)
        if s and s not in seen:
            seen.append(s)
    return " / ".join(seen) if seen else "-"


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


def provenance_rows(data: SweepData) -> list[tuple[str, str]]:
    """Where the numbers came from: sweep, dates, commit, command, hardware, versions."""
    t = data.parent_tags
    jobs = data.jobs
    provs = [(j.results or {}).get("provenance") or {} for j in jobs]
    dates = sorted(p["date"] for p in provs if p.get("date"))
    rows = [
        ("experiment", f"{data.experiment_name} (id {data.experiment_id})"),
        ("sweep parent run", f"{data.parent_id} ({data.parent_name}, {data.parent_status})"),
        ("sweep folder", t.get("sweep_dir", "-")),
        ("sweep started (UTC)", _iso(data.parent_start_time) if data.parent_start_time else "-"),
        ("jobs ran (UTC)", f"{dates[0]} … {dates[-1]}" if len(dates) > 1 else _joined(dates)),
        ("jobs", f"{len(jobs)} ({sum(j.status == 'FINISHED' for j in jobs)} finished)"),
        ("git commit", _joined([t.get("git_commit"), *(j.tags.get("git_commit") for j in jobs)])),
        ("command", t.get("command", "-")),
        ("hydra overrides", t.get("hydra_overrides", "-")),
    ]
    for axis in ("backend", "model", "workload"):
        rows.append((axis, _joined([j.tags.get(axis) for j in jobs])))
    hw_keys: list[str] = []
    for p in provs:
        hw_keys += [k for k in (p.get("hardware") or {}) if k not in hw_keys]
    if hw_keys:
        for k in hw_keys:
            rows.append((f"hardware.{k}", _joined([(p.get("hardware") or {}).get(k)
                                                   for p in provs])))
    else:  # no results.json: the tags still carry CPU and GPU
        for k in sorted({k for j in jobs for k in j.tags if k.startswith("hardware.")}):
            rows.append((k, _joined([j.tags.get(k) for j in jobs])))
    for k in sorted({k for j in jobs for k in j.tags if k.startswith("version.")}):
        rows.append((k, _joined([j.tags.get(k) for j in jobs])))
    return rows


# --------------------------------------------------------------------------- formatting


def fmt_value(key: str, v: Any) -> str:
    """A metric value as the report shows it (``-`` when missing)."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    spec = SPECS.get(key)
    if spec is None:
        return str(v)
    if spec.fmt == "mib":
        return f"{float(v) / 2**20:.0f}"
    return format(float(v), spec.fmt)


def _num(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return format(float(v), spec)


def display_tables(t: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The tables as the report prints them: formatted strings, human headers."""
    out: dict[str, pd.DataFrame] = {}
    jobs = t["jobs"]
    fixed = ("job", "run", "run_id", "status", "overrides")
    axes = axis_headers([c for c in jobs.columns if c not in fixed and c not in SPECS
                         and not c.endswith(("_ci95", "_repeat_mean"))])
    rows = []
    for _, r in jobs.iterrows():
        # the run names and ids are listed with the MLflow links, to keep this one narrow
        row: dict[str, str] = {"job": str(r["job"]), "status": r["status"],
                               "overrides": r["overrides"]}
        for c in axes:
            row[axes[c]] = _cell(r[c])
        for m in JOB_METRICS:
            if m.key not in jobs.columns:
                continue
            ci = r.get(f"{m.key}_ci95")
            if ci is not None and ci == ci:
                mean = fmt_value(m.key, r.get(f"{m.key}_repeat_mean"))
                row[m.header] = f"{mean} ± {fmt_value(m.key, ci)}"
            else:
                row[m.header] = fmt_value(m.key, r[m.key])
        rows.append(row)
    out["jobs"] = pd.DataFrame(rows)

    vb = t["vs_baseline"]
    rows = []
    for _, r in vb.iterrows():
        row = {"job": str(r["job"]) + (" (baseline)" if r["is_baseline"] else ""),
               "overrides": r["overrides"]}
        for _, col, head in SPEEDUPS:
            if col in vb.columns:
                row[head] = _num(r[col], ".2f")
        for _, col, head in SAVINGS:
            if col in vb.columns:
                row[head] = _num(r[col], "+.1f")
        rows.append(row)
    out["vs_baseline"] = pd.DataFrame(rows)

    p = t["pareto"]
    rows = []
    for _, r in p.iterrows():
        row = {"job": str(r["job"]), "overrides": r["overrides"],
               "out tok/s": fmt_value("output_tokens_per_s", r["output_tokens_per_s"])}
        for k, head in (("e2el_ms_mean", "E2EL mean ms"), ("ttft_ms_mean", "TTFT mean ms")):
            if k in p.columns:
                row[head] = fmt_value(k, r[k])
                row[f"front ({head.split()[0]})"] = "yes" if _flag(r[f"front_{k}"]) else "no"
        rows.append(row)
    out["pareto"] = pd.DataFrame(rows)

    lat = t["latency"]
    out["latency"] = pd.DataFrame([{
        "job": str(r["job"]), "overrides": r["overrides"], "requests": str(r["requests"]),
        "E2EL min ms": _num(r["e2el_ms_min"], ".0f"),
        "E2EL median ms": _num(r["e2el_ms_median"], ".0f"),
        "E2EL p90 ms": _num(r["e2el_ms_p90"], ".0f"), "E2EL max ms": _num(r["e2el_ms_max"], ".0f"),
        "TTFT median ms": _num(r["ttft_ms_median"], ".0f"),
    } for _, r in lat.iterrows()])

    tr = t["tradeoffs"]
    rows = []
    for _, r in tr.iterrows():
        row = {"job": str(r["job"]), "decoding": _cell(r["decoding"]),
               "settings": r["settings"] or "-"}
        if any(tr["other axes"]):
            row["other axes"] = r["other axes"] or "-"
        row.update({SPECS[k].header: fmt_value(k, r[k]) for k in TRADEOFF_METRICS})
        row["reading"] = r["reading"]
        rows.append(row)
    out["tradeoffs"] = pd.DataFrame(rows)
    out["applied"] = t["applied"].map(_cell) if not t["applied"].empty else t["applied"]
    out["provenance"] = t["provenance"]
    out["runs"] = jobs[["job", "run", "run_id", "status"]].astype(str)
    return out


def axis_headers(params: list[str]) -> dict[str, str]:
    """Short headers for swept params: the last part (``temperature``; the group for a
    preset's name: ``decoding.name`` -> ``decoding``) where no other swept param shares it,
    else the full dotted name."""
    last = [p.removesuffix(".name").rsplit(".", 1)[-1] for p in params]
    return {p: (s if last.count(s) == 1 else p) for p, s in zip(params, last, strict=True)}


def _flag(v: Any) -> bool:
    """A table flag (bool, numpy bool, or None/NaN for "not applicable") as a bool."""
    return v is not None and v == v and bool(v)


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return str(v)


# --------------------------------------------------------------------------- text bits


def reproduce_command(data: SweepData) -> str:
    """The command that reruns the sweep, from the parent's ``hydra_overrides`` tag."""
    over = data.parent_tags.get("hydra_overrides")
    if over is None:  # older parents: the recorded command line, minus the script name
        cmd = data.parent_tags.get("command", "run.py -m").split()
        over = " ".join(t for t in cmd[1:] if t not in ("-m", "--multirun"))
    toks = [shlex.quote(t) for t in over.split()]
    return " ".join(["python run.py -m", *toks])


def ui_links(data: SweepData) -> dict[str, str]:
    """The MLflow UI command for the store and this sweep's pages in it."""
    from pipeline.tracking import ui_command

    uri = data.tracking_uri
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_BASE
    ids = [j.run_id for j in data.jobs]  # the jobs: the parent holds only a summary
    filt = urllib.parse.quote(f"tags.mlflow.parentRunId = '{data.parent_id}'")
    compact = {"separators": (",", ":")}
    return {
        "command": ui_command(uri),
        # /runs: MLflow 3 opens an experiment on its GenAI overview, not the runs table
        "experiment runs": f"{base}/#/experiments/{data.experiment_id}/runs",
        "sweep runs": f"{base}/#/experiments/{data.experiment_id}/runs?searchFilter={filt}",
        "parent run": f"{base}/#/experiments/{data.experiment_id}/runs/{data.parent_id}",
        "compare runs": (f"{base}/#/compare-runs?runs={json.dumps(ids, **compact)}"
                         f"&experiments={json.dumps([data.experiment_id], **compact)}"),
    }


def summary_lines(t: dict[str, pd.DataFrame], data: SweepData) -> list[str]:
    """Headline facts derived from the tables (which job leads on what)."""
    jobs = t["jobs"]
    vb = t["vs_baseline"]
    base = vb.loc[vb["is_baseline"].astype(bool), "job"].iloc[0]
    lines = [f"{len(jobs)} job(s), {int((jobs['status'] == 'FINISHED').sum())} finished; "
             f"baseline: job {base}."]
    if data.parent_status == "RUNNING":
        lines.append("the sweep is still running: jobs not logged yet are missing; rebuild the "
                     "report when it ends.")
    total = data.parent_metrics.get("jobs_total")
    skipped = data.parent_metrics.get("jobs_skipped") or 0
    if skipped:
        lines.append(f"{skipped:.0f} job(s) were skipped by resume=true: their numbers live in "
                     "their earlier runs, not in this sweep, so they are not in this report.")
    elif total is not None and total != len(jobs):
        lines.append(f"the sweep counted {total:.0f} job(s) but {len(jobs)} are logged as its "
                     "child runs: the others are missing from this report.")
    picks = (("output_tokens_per_s", "highest output tok/s", " tok/s"),
             ("e2el_ms_mean", "lowest mean E2EL", " ms"),
             ("ttft_ms_mean", "lowest mean TTFT", " ms"),
             ("peak_rss_bytes", "lowest peak RSS", " MiB"),
             ("perplexity", "lowest perplexity", ""),
             ("self_bleu", "lowest self-BLEU (most diverse)", ""),
             ("rep_2", "lowest rep-2 (least repetition)", ""))
    for key, words, unit in picks:
        if key not in jobs.columns or jobs[key].isna().all():
            continue
        col = jobs[key].astype(float)
        if col.nunique() < 2:
            continue
        i = col.idxmax() if SPECS[key].higher_is_better else col.idxmin()
        lines.append(f"{words}: job {jobs.loc[i, 'job']} ({jobs.loc[i, 'overrides']}) "
                     f"at {fmt_value(key, col[i])}{unit}")
    return lines


# --------------------------------------------------------------------------- sections


@dataclass
class Block:
    """A piece of a section: ``text`` (a paragraph), ``list``, ``table``, ``code``, ``image``."""

    kind: str
    value: Any
    caption: str = ""


@dataclass
class Section:
    """A titled part of the report."""

    title: str
    blocks: list[Block]


def build_sections(data: SweepData, t: dict[str, pd.DataFrame]) -> list[Section]:
    """The report's structure; both renderers walk it, so markdown and HTML agree."""
    d = display_tables(t)
    repeats = any(c.endswith("_ci95") for c in t["jobs"].columns)
    links = ui_links(data)
    jobs_note = ("Swept axes are the params that differ across jobs, named by their last "
                 "part where that is unambiguous (`decoding` is the preset, `decoding.name`); "
                 "metrics are the runs' MLflow metrics.")
    if repeats:
        jobs_note += (" Where the workload repeated the measured phase, tok/s shows the mean "
                      "over repeats ± its 95% CI; the other tables use the pooled figure "
                      "(all tokens / all measured time).")
    sections = [
        Section("Summary", [Block("list", summary_lines(t, data))]),
        Section("Jobs", [Block("text", jobs_note), Block("table", d["jobs"])]),
        Section("Against the baseline", [
            Block("text", "Measured ratios against the baseline job: throughput × = job / "
                          "baseline tok/s; latency speed-up × = baseline / job latency (above 1 "
                          "is faster); memory saving % = 1 − job / baseline peak (positive "
                          "saves memory). Choose the baseline with `--baseline`."),
            Block("table", d["vs_baseline"])]),
        Section("Quality vs diversity", [Block("image", "quality_vs_diversity",
                                               PLOTS["quality_vs_diversity"])]),
        Section("Throughput vs latency", [
            Block("image", "throughput_vs_latency", PLOTS["throughput_vs_latency"]),
            Block("table", d["pareto"])]),
        Section("Per-request latency", [
            Block("image", "latency_distributions", PLOTS["latency_distributions"]),
            Block("table", d["latency"])]),
        Section("Decoding trade-offs", [
            Block("text", "Per job: quality (perplexity under the scorer, lower = more "
                          "likely), diversity (self-BLEU, lower = more diverse; distinct-2, "
                          "higher = more diverse), repetition (rep-2) and speed. The reading "
                          "only ranks these measured numbers within this sweep; with few "
                          "prompts and one repeat small gaps may be noise."),
            Block("table", d["tradeoffs"])]),
    ]
    if not d["applied"].empty:
        sections.append(Section("Applied settings", [
            Block("text", "Read back from the loaded model by each job (results.json)."),
            Block("table", d["applied"])]))
    commit = data.parent_tags.get("git_commit", "")
    repro = [Block("code", reproduce_command(data))]
    if commit and commit != "unknown":
        note = f"At git commit `{commit.removesuffix('-dirty')}`"
        if commit.endswith("-dirty"):
            note += " (the tree had uncommitted changes when the sweep ran)"
        repro.insert(0, Block("text", note + "; from the repository root:"))
    sections += [
        Section("Provenance", [Block("table", d["provenance"])]),
        Section("Reproduce", repro),
        Section("Open in the MLflow UI", [
            Block("code", links["command"]),
            Block("list", [f"{k}: {v}" for k, v in links.items() if k != "command"]),
            Block("table", d["runs"]),
        ]),
    ]
    return sections


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of the (string) frame."""
    if df.empty:
        return "_(none)_"
    head = "| " + " | ".join(_md_escape(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_md_escape(v) for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _title(data: SweepData) -> str:
    return f"Sweep report: {data.sweep_name}"


def render_markdown(data: SweepData, sections: list[Section], built: str = "") -> str:
    """report.md: the sections as markdown, images referenced as sibling PNG files."""
    out = [f"# {_title(data)}", ""]
    if built:
        out += [f"_Built {built} from MLflow ({data.tracking_uri}), parent run "
                f"`{data.parent_id}`._", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if b.kind == "text":
                out += [b.value, ""]
            elif b.kind == "list":
                out += [f"- {x}" for x in b.value] + [""]
            elif b.kind == "table":
                out += [markdown_table(b.value), ""]
            elif b.kind == "code":
                out += ["```bash", b.value, "```", ""]
            elif b.kind == "image":
                out += [f"![{b.caption}]({b.value}.png)", "", f"_{b.caption}_", ""]
    return "\n".join(out).rstrip() + "\n"


def _inline_md(s: str) -> str:
    """Escape, then render `code` spans (the only inline markdown the sections use)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s))


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>(none)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    # wide tables scroll inside their box instead of widening the page
    return (f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}"
            "</tbody></table></div>")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1150px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%;height:auto}
figcaption{color:#555;font-size:.9em}li{overflow-wrap:anywhere}
pre{background:#f6f6f6;padding:.7em;white-space:pre-wrap;overflow-wrap:anywhere}
.scroll{overflow-x:auto}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
"""


def render_html(data: SweepData, sections: list[Section], images: dict[str, bytes],
                built: str = "") -> str:
    """report.html: self-contained (inline CSS, plots as base64 PNG data URIs)."""
    title = html.escape(_title(data))
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>{title}</title><style>{CSS}</style></head><body>", f"<h1>{title}</h1>"]
    if built:
        out.append(f"<p><em>Built {html.escape(built)} from MLflow "
                   f"({html.escape(data.tracking_uri)}), parent run "
                   f"<code>{html.escape(data.parent_id)}</code>.</em></p>")
    for s in sections:
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        for b in s.blocks:
            if b.kind == "text":
                out.append(f"<p>{_inline_md(b.value)}</p>")
            elif b.kind == "list":
                items = "".join(f"<li>{_linkify(x)}</li>" for x in b.value)
                out.append(f"<ul>{items}</ul>")
            elif b.kind == "table":
                out.append(_html_table(b.value))
            elif b.kind == "code":
                out.append(f"<pre><code>{html.escape(b.value)}</code></pre>")
            elif b.kind == "image":
                b64 = base64.b64encode(images[b.value]).decode("ascii")
                out.append(f"<figure><img alt=\"{html.escape(b.caption)}\" "
                           f"src=\"data:image/png;base64,{b64}\">"
                           f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _linkify(s: str) -> str:
    """Escape a list item and turn its http(s) URLs into links."""
    parts = re.split(r"(https?://\S+)", s)
    return "".join(
        f"<a href=\"{html.escape(p)}\">{html.escape(p)}</a>" if p.startswith("http")
        else _inline_md(p) for p in parts)


# --------------------------------------------------------------------------- plots


def plot_images(data: SweepData, t: dict[str, pd.DataFrame]) -> dict[str, bytes]:
    """The report's PNGs (name -> bytes), drawn from the tables and the request timings."""
    from pipeline import report_plots

    over = varying_overrides(data.jobs)
    idx = {j.job: i for i, j in enumerate(data.jobs)}
    label = {j.job: short_label(j, over[j.run_id]) for j in data.jobs}
    jobs = t["jobs"]

    def val(v: Any) -> float | None:
        return None if v is None or v != v else float(v)

    qd = [{"label": label[r["job"]], "index": idx[r["job"]],
           "self_bleu": val(r.get("self_bleu")), "perplexity": val(r.get("perplexity"))}
          for _, r in jobs.iterrows()]
    par = t["pareto"]
    lat_axes = [(k, lab) for k, lab in (("e2el_ms_mean", "mean E2EL (ms, lower is better)"),
                                        ("ttft_ms_mean", "mean TTFT (ms, lower is better)"))
                if k in par.columns]
    tl = []
    for _, r in par.iterrows():
        p: dict[str, Any] = {"label": label[r["job"]], "index": idx[r["job"]],
                             "output_tokens_per_s": val(r["output_tokens_per_s"])}
        for k, _ in lat_axes:
            p[k] = val(r[k])
            p[f"front_{k}"] = _flag(r[f"front_{k}"])
        tl.append(p)
    series = []
    for j in data.jobs:
        e2el, ttft = request_latencies(j.results)
        series.append({"label": label[j.job], "index": idx[j.job], "e2el_ms": e2el,
                       "ttft_ms": ttft})
    return {
        "quality_vs_diversity": report_plots.quality_vs_diversity(qd),
        "throughput_vs_latency": report_plots.throughput_vs_latency(
            tl, lat_axes or [("e2el_ms_mean", "mean E2EL (ms)")]),
        "latency_distributions": report_plots.latency_distributions(series),
    }


# --------------------------------------------------------------------------- writing


@dataclass
class Report:
    """What :func:`write_report` produced."""

    output_dir: Path
    markdown: Path
    html: Path
    images: dict[str, Path]
    tables: dict[str, pd.DataFrame]
    markdown_text: str


def write_report(data: SweepData, output_dir: Path, baseline: str | None = None) -> Report:
    """Write report.md, report.html and the PNGs under ``output_dir``."""
    t = tables(data, baseline)
    sections = build_sections(data, t)
    images = plot_images(data, t)
    built = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, png in images.items():
        paths[name] = output_dir / f"{name}.png"
        paths[name].write_bytes(png)
    md = render_markdown(data, sections, built)
    (output_dir / "report.md").write_text(md)
    (output_dir / "report.html").write_text(render_html(data, sections, images, built))
    return Report(output_dir, output_dir / "report.md", output_dir / "report.html", paths, t, md)


def log_report(client: Any, data: SweepData, report: Report) -> str:
    """Log the report to the parent run (artifacts under ``report/``), tag the parent with
    its artifact URI and put a pointer in the run's description; returns that URI."""
    pid = data.parent_id
    for f in (report.markdown, report.html, *report.images.values()):
        client.log_artifact(pid, str(f), artifact_path="report")
    uri = f"{client.get_run(pid).info.artifact_uri.rstrip('/')}/report/report.html"
    client.set_tag(pid, "report", uri)
    client.set_tag(pid, "report.local_path", str(report.html.resolve()))
    note = client.get_run(pid).data.tags.get("mlflow.note.content", "")
    if not note or note.startswith(NOTE_MARKER):  # never overwrite a user's own description
        client.set_tag(pid, "mlflow.note.content", (
            f"{NOTE_MARKER}\n**Sweep report**: [report/report.html]"
            f"(#/experiments/{data.experiment_id}/runs/{pid}/artifacts/report/report.html) "
            f"in this run's Artifacts tab (plots and tables), or `{report.html.resolve()}` "
            f"on disk.\n\n"
            f"Rebuild: `python -m pipeline.report --run-id {pid} "
            f"--tracking-uri {data.tracking_uri}`"))
    return uri


def main(argv: list[str] | None = None) -> int:
    """CLI entry: locate the sweep, collect it from MLflow, write and log the report."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=(
        "Build a sweep report (markdown + self-contained HTML + PNG plots) from MLflow."))
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--sweep-dir", type=Path, help="a multirun folder (outputs/multirun/<time>)")
    which.add_argument("--run-id", help="the sweep's parent run id")
    which.add_argument("--experiment", help="the latest sweep of this MLflow experiment")
    ap.add_argument("--tracking-uri", help="MLflow store (default: the sweep folder's store, "
                                           "else outputs/mlflow/mlflow.db)")
    ap.add_argument("--output-dir", type=Path,
                    help="where to write (default: outputs/reports/<sweep name>/)")
    ap.add_argument("--baseline", help="baseline job: 'decoding=greedy', 'job=0', a run name "
                                       "or id (default: the first finished job)")
    ap.add_argument("--no-log", action="store_true",
                    help="do not log the report to the parent run")
    args = ap.parse_args(argv)

    from mlflow.exceptions import MlflowException

    uri = args.tracking_uri
    if uri is None and args.sweep_dir is not None:
        uri = store_for_sweep_dir(args.sweep_dir)
    uri = uri or default_tracking_uri()
    try:
        client = open_client(uri)
        pid = find_parent(client, run_id=args.run_id, sweep_dir=args.sweep_dir,
                          experiment=args.experiment)
        data = collect(client, pid, uri)
        if not data.jobs:
            raise ReportError(f"sweep parent run {pid} has no job runs")
    except (ReportError, MlflowException) as e:  # one line, not a traceback
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    out = args.output_dir or DEFAULT_OUTPUT_DIR / "reports" / data.sweep_name
    try:
        report = write_report(data, out, args.baseline)
    except ValueError as e:  # a baseline selector that names no job, or several
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report.markdown}\n        {report.html}")
    if not args.no_log:
        art = log_report(client, data, report)
        print(f"logged to MLflow parent run {pid}: {art}")
    links = ui_links(data)
    print(f"view in MLflow:\n  {links['command']}\n  then {links['compare runs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
