"""Locate a sweep in MLflow and read everything the report is built from.

A plain ``python run.py`` job (no ``-m``) is a sweep of one: its run stands for the parent
run and is the one job. Nothing is read from the job folders, so a report rebuilt after
they are deleted has the same tables.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.tracking.parent_run import read_parent_id

#: a plain run.py job's run: no parent run, no job number (those are a sweep's jobs, an
#: orphan's included), not a sweep's parent
PLAIN_JOB_FILTER = ("tags.mlflow.parentRunId IS NULL and tags.job_num IS NULL "
                    "and tags.kind IS NULL")


class ReportError(RuntimeError):
    """The sweep cannot be found or reported (no store, no parent run, bad baseline)."""


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
    #: a plain run.py job, reported as a sweep of one: its run is the parent and the job
    plain_job: bool = False

    @property
    def sweep_name(self) -> str:
        """The sweep folder's name (its timestamp), else the parent run's name (a plain
        job's followed by the start of its run id: plain jobs of the same presets share a
        name)."""
        d = self.parent_tags.get("sweep_dir")
        if d:
            return Path(d).name
        return f"{self.parent_name}-{self.parent_id[:8]}" if self.plain_job else self.parent_name


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
    parent's ``sweep_dir`` tag), or the latest of the ``kind=sweep`` runs and plain run.py
    jobs (of ``experiment``): a plain job is a sweep of one, its own run the parent."""
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
        pid = read_parent_id(sweep_dir)
        if pid:
            return pid
        filt += f" and tags.sweep_dir = '{sweep_dir.resolve()}'"
    runs = client.search_runs(exp_ids, filter_string=filt,
                              order_by=["attributes.start_time DESC"], max_results=1)
    if sweep_dir is None:  # the latest sweep, or a plain job after it
        runs += client.search_runs(exp_ids, filter_string=PLAIN_JOB_FILTER,
                                   order_by=["attributes.start_time DESC"], max_results=1)
        runs.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    if not runs:
        if sweep_dir:
            raise ReportError(f"no sweep parent run (tag kind=sweep) for {sweep_dir} in this "
                              "store")
        raise ReportError("no sweep parent run (tag kind=sweep) and no plain run.py job in "
                          "this store")
    return str(runs[0].info.run_id)


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
    child's ``results.json`` from the artifact store. A plain run.py job's run (no
    children, not a sweep's parent) is a sweep of one: the parent and its only job."""
    # one progress bar per downloaded file would drown the command's own output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parent = client.get_run(parent_id)
    exp = client.get_experiment(parent.info.experiment_id)
    children = _all_runs(client, exp.experiment_id, f"tags.mlflow.parentRunId = '{parent_id}'")
    plain_job = (not children and parent.data.tags.get("kind") != "sweep"
                 and "mlflow.parentRunId" not in parent.data.tags)
    if plain_job:
        children = [parent]
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
        # a plain job's own metrics are its row, not a sweep's summary
        parent_metrics={} if plain_job else dict(parent.data.metrics), plain_job=plain_job,
    )


def collect_sweep(tracking_uri: str | None = None, *, sweep_dir: Path | None = None,
                  run_id: str | None = None, experiment: str | None = None,
                  output_dir: Path = Path("outputs")) -> tuple[Any, SweepData]:
    """Locate a sweep (its folder, its parent run id, or the latest of an experiment) and
    collect it from MLflow; the store is ``tracking_uri``, else the one the sweep folder
    names, else the default store under ``output_dir``. Returns the client and the data;
    raises :class:`ReportError` (or MLflow's own errors) with a one-line message."""
    from pipeline.tracking.store import default_store_uri, store_for_sweep_dir

    uri = tracking_uri
    if uri is None and sweep_dir is not None:
        uri = store_for_sweep_dir(sweep_dir)
    uri = uri or default_store_uri(output_dir)
    client = open_client(uri)
    pid = find_parent(client, run_id=run_id, sweep_dir=sweep_dir, experiment=experiment)
    data = collect(client, pid, uri)
    if not data.jobs:
        raise ReportError(f"sweep parent run {pid} has no job runs")
    return client, data
