"""MLflow: a parent run per sweep, a child run per job, the store under ``outputs/``.

The client API (not the fluent one) is used throughout: runs are addressed by id, so a
job in another process (joblib, ray, slurm) attaches to its sweep's parent by reading the
parent id from a file in the sweep folder, with no in-process state.

This module holds the one rule for where the default store is (:func:`default_store_uri`);
the jobs, the sweep callback, ``sync`` and the report all ask it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.records import JobResult

log = logging.getLogger(__name__)

PARENT_ID_FILE = "mlflow_parent_run_id"
RUN_ID_FILE = "mlflow_run_id"

#: MLflow 3 picks an experiment's landing page from this tag: without it the UI opens on
#: the GenAI "Overview" (traces) page; with ``custom_model_development`` on the runs table
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: the address ``mlflow ui`` serves on by default (see :func:`ui_command`)
LOCAL_UI = "http://127.0.0.1:5000"
#: on a sweep's parent run: the host and pid of the sweep process that owns it (written at
#: sweep start and on take-over), so ``resume=true`` can tell a killed sweep from a live one
OWNER_HOST_TAG = "infersweep.owner_host"
OWNER_PID_TAG = "infersweep.owner_pid"
#: on a job run a resumed sweep re-ran: the id of the run that replaced it (it is then
#: soft-deleted, restorable with ``MlflowClient.restore_run``)
SUPERSEDED_TAG = "infersweep.superseded_by"
#: on a job run: the job's number in its sweep (Hydra's ``job.num``)
JOB_NUM_TAG = "job_num"
#: the config groups whose chosen preset names a run (``<job>-<backend>-<decoding>-<workload>``)
NAME_GROUPS = ("backend", "decoding", "workload")


# --------------------------------------------------------------------------- the store


def store_dir(output_dir: str | Path) -> Path:
    """The default store's folder, ``<output_dir>/mlflow`` (absolute)."""
    return Path(output_dir).expanduser().resolve() / "mlflow"


def default_store_uri(output_dir: str | Path) -> str:
    """The default store: SQLite at ``<output_dir>/mlflow/mlflow.db``, absolute, so jobs
    started from other working directories find the same file."""
    return f"sqlite:///{store_dir(output_dir) / 'mlflow.db'}"


def store_paths(output_dir: str | Path) -> tuple[str, str]:
    """Default store URI and artifact root under ``output_dir`` (the folder is created)."""
    base = store_dir(output_dir)
    base.mkdir(parents=True, exist_ok=True)
    return default_store_uri(output_dir), (base / "artifacts").as_uri()


def sqlite_artifact_root(uri: str) -> str | None:
    """For a SQLite store, ``<db folder>/artifacts`` as a file URI (the folder is not
    created: MLflow makes it on the first artifact); None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):]
    if not db or db == ":memory:":
        return None
    return (Path(db).expanduser().resolve().parent / "artifacts").as_uri()


def tracking_uri(cfg: Any) -> str:
    """``tracking.uri`` if set, else the default SQLite store (its folder is created:
    SQLite makes the file, not the folder)."""
    return cfg.tracking.uri or store_paths(cfg.paths.output_dir)[0]


def store_for_sweep_dir(sweep_dir: Path) -> str | None:
    """The store a sweep folder logged to: its ``tracking.uri`` (from Hydra's
    ``multirun.yaml``) when set, else the default store of its output dir
    (``<output_dir>/multirun/<time>``) when that file exists."""
    multirun = sweep_dir / "multirun.yaml"
    if multirun.is_file():
        from omegaconf import OmegaConf

        try:
            uri = OmegaConf.select(OmegaConf.load(multirun), "tracking.uri")
        except Exception:  # an unreadable file only loses the hint
            uri = None
        if uri:
            return str(uri)
    output_dir = sweep_dir.expanduser().resolve().parent.parent
    return default_store_uri(output_dir) if (store_dir(output_dir) / "mlflow.db").is_file() \
        else None


def ui_command(uri: str) -> str:
    """A light, local MLflow UI command for this store (one worker, loopback only)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --workers 1"


def ui_base(uri: str) -> str:
    """The UI's address: the tracking server itself, or the local ``mlflow ui``'s."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


#: runs ordered by name: with MLflow's default order (start time) its UI nests the children
#: under their collapsed parent row, so a page filtered to them shows one row
FLAT_ORDER = "&orderByKey=" + urllib.parse.quote("tags.`mlflow.runName`") + "&orderByAsc=true"


def runs_url(uri: str, exp_id: str, parent_run_id: str | None = None, flat: bool = True
             ) -> str:
    """The experiment's runs table (MLflow 3's hash route ``#/experiments/<id>/runs``),
    filtered to a sweep's child runs when ``parent_run_id`` is given (listed flat, by name,
    unless ``flat=False``)."""
    url = f"{ui_base(uri)}/#/experiments/{exp_id}/runs"
    if parent_run_id:
        flt = f"tags.mlflow.parentRunId = '{parent_run_id}'"
        url += "?searchFilter=" + urllib.parse.quote(flt, safe="") + (FLAT_ORDER if flat
                                                                        else "")
    return url


def run_url(uri: str, exp_id: str, run_id: str) -> str:
    """One run's page (MLflow 3's hash route ``#/experiments/<id>/runs/<run id>``, its
    ``Routes.runPage``)."""
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs/{run_id}"


def compare_url(uri: str, exp_id: str, run_ids: list[str]) -> str:
    """MLflow's compare page for these runs (``#/compare-runs?runs=[..]&experiments=[..]``,
    the format of MLflow 3's ``Routes.getCompareRunPageRoute``)."""
    runs = urllib.parse.quote(json.dumps(sorted(set(run_ids)), separators=(",", ":")), safe="")
    exps = urllib.parse.quote(json.dumps([exp_id], separators=(",", ":")), safe="")
    return f"{ui_base(uri)}/#/compare-runs?runs={runs}&experiments={exps}"


def ui_hint(uri: str, exp_id: str | None = None, parent_run_id: str | None = None,
            run_ids: list[str] | None = None, run_id: str | None = None) -> str:
    """What to print after a run or sweep: the UI command, then (when the experiment is
    known) the run's own page (``run_id``, a plain run), the runs page (the sweep's, with
    ``parent_run_id``) and the compare page of the sweep's runs."""
    lines = [ui_command(uri)]
    if exp_id is not None:
        if run_id:
            lines.append(f"run:     {run_url(uri, exp_id, run_id)}")
        lines.append(f"runs:    {runs_url(uri, exp_id, parent_run_id)}")
        if run_ids and len(run_ids) > 1:
            lines.append(f"compare: {compare_url(uri, exp_id, run_ids)}")
    return "\n  ".join(lines)


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer."""


def probe(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when a remote tracking server is down: MLflow's own client retries with
    back-off for minutes before giving up."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError) as e:
        raise TrackingUnavailable(f"MLflow server {uri} is unreachable ({e})") from e


def client_for(cfg: Any) -> tuple[Any, str]:
    """An MlflowClient on the configured store and the experiment id.

    A missing experiment is created with its artifacts beside the SQLite store
    (``<db folder>/artifacts``, never ``./mlruns`` of the working directory) and the tag
    ``mlflow.experimentKind=custom_model_development``, so MLflow 3's UI opens on its runs
    table; an existing experiment without that tag gets it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    probe(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        artifacts = sqlite_artifact_root(uri)
        try:
            return client, client.create_experiment(
                cfg.tracking.experiment, artifact_location=artifacts,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another job created it first
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return client, exp.experiment_id


# --------------------------------------------------------------------------- logging


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, Any] | None = None,
                params: Mapping[str, Any] | None = None,
                tags: Mapping[str, Any] | None = None, step: int = 0) -> None:
    """Log metrics (finite numbers only; others are skipped), params and tags to a run, in
    chunks under MLflow's per-request limits (1000 metrics, 100 params or tags). ``step``
    places the metrics on a curve (a load profile logs point k at step k)."""
    from mlflow.entities import Metric, Param, RunTag

    ts = int(time.time() * 1000)
    m = [Metric(k, float(v), ts, step) for k, v in (metrics or {}).items()
         if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    p = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    t = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
    for i in range(0, len(m), 1000):
        client.log_batch(run_id, metrics=m[i : i + 1000])
    for i in range(0, len(p), 100):
        client.log_batch(run_id, params=p[i : i + 100])
    for i in range(0, len(t), 100):
        client.log_batch(run_id, tags=t[i : i + 100])


def as_job_result(result: JobResult | Mapping[str, Any]) -> JobResult:
    """A :class:`JobResult`; a results.json dict is converted (callers still passing
    dicts keep working while they move to the typed record)."""
    return result if isinstance(result, JobResult) else JobResult.from_dict(dict(result))


def run_tags(result: JobResult) -> dict[str, str]:
    """Tags for a job run: the axes, the overrides, versions, hardware, commit."""
    cfg, prov = result.config, result.provenance
    tags = {
        "backend": cfg["backend"]["name"],
        "model": cfg["model"]["name"],
        "decoding": cfg["decoding"]["name"],
        "workload": cfg["workload"]["name"],
        "hydra_overrides": " ".join(prov["overrides"]),
        "command": prov["command"],
        "git_commit": prov["git_commit"],
        "hardware.cpu": prov["hardware"].get("cpu", ""),
        "hardware.gpu": prov["hardware"].get("gpu", "none"),
        "config_hash": result.config_hash,
        "status": result.status,
    }
    tags.update({f"version.{k}": v for k, v in prov["versions"].items()})
    tags.update({f"preset.{k}": v for k, v in result.choices.items()})
    if result.applied.get("dtype") is not None:
        tags["applied.dtype"] = str(result.applied["dtype"])
    if result.job_num is not None:
        tags[JOB_NUM_TAG] = str(result.job_num)
    return tags


def run_name(result: JobResult) -> str:
    """``<job>-<backend>-<decoding>-<workload>``, each the preset the user chose
    (``backend=hf_fast``), falling back to the config's ``name`` (results without
    ``choices``)."""
    parts = [str(result.choices.get(g) or result.config.get(g, {}).get("name", "?"))
             for g in NAME_GROUPS]
    if result.job_num is not None:
        parts.insert(0, str(result.job_num))
    return "-".join(p.replace("/", "_") for p in parts)


def _log_generations(client: Any, run_id: str, requests: list[dict[str, Any]]) -> None:
    client.log_table(run_id, data={
        "index": [r["index"] for r in requests],
        "prompt": [r["prompt"] for r in requests],
        "generation": [r["text"] for r in requests],
        "output_tokens": [r["output_tokens"] for r in requests],
        "error": [r.get("error") or "" for r in requests],
    }, artifact_file="generations.json")


def log_job(cfg: Any, result: JobResult | Mapping[str, Any], job_dir: Path,
            parent_run_id: str | None, params: Mapping[str, Any]) -> str:
    """Log one job as an MLflow run (a child when ``parent_run_id`` is given); returns the
    run id and writes it to ``<job_dir>/mlflow_run_id``. ``result`` may still be a
    results.json dict."""
    result = as_job_result(result)
    client, exp_id = client_for(cfg)
    tags = run_tags(result)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if result.resumed_from:
        tags["resumed_from"] = result.resumed_from
    params = dict(params)
    if "applied.dtype" in tags:
        params.setdefault("applied.dtype", tags["applied.dtype"])
    # the job's own start and end, so the UI's duration is the job's, not the logging's
    run_id = client.create_run(exp_id, start_time=result.started_at, tags=tags,
                               run_name=run_name(result)).info.run_id
    end = result.ended_at
    try:
        log_metrics(client, run_id, metrics=result.metrics, params=params)
        if result.load_points:  # one job, one curve: point k at step k
            from pipeline.serving.points import curve_metrics

            for point in result.load_points:
                log_metrics(client, run_id, metrics=curve_metrics(point), step=point["index"])
        for f in ("results.json", "config.yaml", "error.txt", "server.log"):
            if (job_dir / f).is_file():
                client.log_artifact(run_id, str(job_dir / f))
        hydra_dir = job_dir / ".hydra"
        if hydra_dir.is_dir():
            client.log_artifacts(run_id, str(hydra_dir), artifact_path="hydra")
        if cfg.tracking.log_generations and result.requests:
            _log_generations(client, run_id, result.requests)
        if result.error:
            client.set_tag(run_id, "error", str(result.error)[:5000])
        # MLflow has no SKIPPED status: a resumed job's link run is FINISHED, tagged
        # status=SKIPPED and resumed_from=<its original run>
        ok = result.finished or result.status == "SKIPPED"
        client.set_terminated(run_id, "FINISHED" if ok else "FAILED", end_time=end)
    except BaseException:
        client.set_terminated(run_id, "FAILED", end_time=end)
        raise
    # marks the job as logged, so `python -m pipeline.tracking.sync` does not log it twice
    (job_dir / RUN_ID_FILE).write_text(run_id)
    if parent_run_id and result.job_num is not None:
        # only now: the earlier attempt is hidden once its replacement is complete
        supersede_earlier(client, exp_id, parent_run_id, run_id, result)
    return run_id


def job_number(run: Any) -> int | None:
    """A job run's number in its sweep: its ``job_num`` tag, or for runs logged before
    that tag existed the leading number of its name (``<job>-<backend>-...``)."""
    tag = run.data.tags.get(JOB_NUM_TAG) or (run.info.run_name or "").partition("-")[0]
    return int(tag) if tag.isdigit() else None


def supersede_earlier(client: Any, exp_id: str, parent_run_id: str, run_id: str,
                      result: JobResult) -> list[str]:
    """Soft-delete the earlier attempts of this job under the same parent, so a taken-over
    parent (``resume=true``) lists one child per job: the newest.

    "The same job" is what resume already goes by: the parent (the same sweep, by
    :func:`sweep_key`), the job number within it (same overrides, same expansion order)
    and the ``config_hash``. Each earlier run is tagged ``infersweep.superseded_by=<run
    id>`` and deleted with MLflow's own ``delete_run`` (restorable: ``mlflow runs
    restore``); one left RUNNING by a kill is marked KILLED first. Never raises (the new
    run is already logged); returns the ids superseded."""
    from mlflow.entities import ViewType

    done: list[str] = []
    try:
        runs = client.search_runs(
            [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                    f"tags.config_hash = '{result.config_hash}'",
            run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        for old in runs:
            if old.info.run_id == run_id or job_number(old) != result.job_num:
                continue
            client.set_tag(old.info.run_id, SUPERSEDED_TAG, run_id)
            if old.info.status == "RUNNING":
                client.set_terminated(old.info.run_id, "KILLED")
            client.delete_run(old.info.run_id)
            done.append(old.info.run_id)
    except Exception as e:  # a leftover duplicate is untidy, not lost data
        log.warning("could not supersede the earlier runs of job %s: %s", result.job_num, e)
    return done


def find_finished(cfg: Any, chash: str) -> dict[str, Any] | None:
    """The most recent FINISHED run whose ``config_hash`` tag is ``chash``: its
    ``run_id`` and ``metrics``."""
    client, exp_id = client_for(cfg)
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.config_hash = '{chash}' and attributes.status = 'FINISHED'"
                                " and tags.status != 'SKIPPED'",  # links, not measurements
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        return None
    return {"run_id": runs[0].info.run_id, "metrics": dict(runs[0].data.metrics)}


#: the parent runs :func:`open_parent` created in this process: a live sweep's (this one's),
#: never a killed one's, so :func:`take_over_parent` leaves them alone. By run id, not by
#: owner pid: a killed sweep's pid may be this process's again (pid 1 in a container)
_OPENED_HERE: set[str] = set()


def open_parent(client: Any, exp_id: str, sweep_dir: Path, tags: Mapping[str, str]) -> str:
    """Create a sweep's parent run (tag ``kind=sweep``, its folder in ``sweep_dir``) and
    write its id to ``<sweep_dir>/mlflow_parent_run_id`` for the jobs to find."""
    run = client.create_run(exp_id, run_name=f"sweep-{sweep_dir.name}", tags={
        "sweep_dir": str(sweep_dir.resolve()), "kind": "sweep", **tags})
    _OPENED_HERE.add(str(run.info.run_id))
    (sweep_dir / PARENT_ID_FILE).write_text(run.info.run_id)
    return str(run.info.run_id)


class SweepStillOwned(ConfigError):
    """``resume=true`` found the sweep's parent run owned by a sweep that may still run;
    ``run.py`` exits 2 on it, like on any input it refuses."""


def owner_tags() -> dict[str, str]:
    """The parent-run tags naming this process as the sweep's owner."""
    return {OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(os.getpid())}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks, sends
    nothing). A heuristic: the kernel reuses pids, so a long-dead sweep's pid may now be
    another process's, and an unreaped zombie still counts as alive."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    except OSError:
        return False
    return True


def check_owner(run: Any, force: bool = False) -> None:
    """Refuse to take over a parent run whose owning sweep may still be running: its owner
    pid is alive on this host, or it ran on another host (whose processes cannot be
    checked from here). ``force`` (``tracking.force_takeover=true``) skips the check. A
    parent without owner tags (a sweep from before they existed) is taken over as before.
    Raises :class:`SweepStillOwned`."""
    tags = run.data.tags
    host, pid = tags.get(OWNER_HOST_TAG), tags.get(OWNER_PID_TAG)
    if force or not host or not pid or not pid.isdigit():
        return
    rid = run.info.run_id
    if host == socket.gethostname():
        # our own pid can only be a reused one: this process did not start that sweep
        if int(pid) != os.getpid() and pid_alive(int(pid)):
            raise SweepStillOwned(
                f"resume=true: the sweep's MLflow parent run {rid} belongs to process {pid} "
                f"on this host, which is still alive; let that sweep finish or stop it "
                f"(kill {pid}) and rerun; if pid {pid} is not that sweep (pids are reused), "
                f"rerun with tracking.force_takeover=true")
        return
    raise SweepStillOwned(
        f"resume=true: the sweep's MLflow parent run {rid} belongs to process {pid} on host "
        f"{host}, which cannot be checked from {socket.gethostname()}; if that sweep is no "
        f"longer running, rerun with tracking.force_takeover=true")


#: overrides that say how to resume, not what the sweep runs (left out of :func:`sweep_key`)
RESUME_KEYS = ("resume=", "tracking.force_takeover=")


def sweep_key(overrides: list[str]) -> str:
    """What makes two sweeps the same sweep: their overrides, in a fixed order and without
    :data:`RESUME_KEYS` (a resumed sweep adds ``resume=true``, perhaps
    ``tracking.force_takeover=true``, to the killed one's command)."""
    return " ".join(sorted(o for o in overrides
                           if not o.lstrip("+~").startswith(RESUME_KEYS)))


def take_over_parent(client: Any, exp_id: str, sweep_dir: Path, key: str,
                     force: bool = False) -> str | None:
    """With ``resume=true``: a parent run left RUNNING by a killed sweep with the same
    :func:`sweep_key` becomes this sweep's parent (its id written to
    ``<sweep_dir>/mlflow_parent_run_id``, its owner tags now naming this process), whatever
    folder this sweep uses: a new one or the killed sweep's own (``hydra.sweep.dir``).
    The one that folder's id file names is taken when it is a candidate (its job folders'
    runs are its children), else the newest; the other ones left RUNNING are marked KILLED.
    Parents this process opened itself are never candidates. None when there is none.
    Raises :class:`SweepStillOwned`, before changing anything, when one of them may still
    belong to a live sweep (:func:`check_owner`; ``force`` skips that check)."""
    runs = client.search_runs(
        [exp_id], filter_string="tags.kind = 'sweep' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"], max_results=100)
    same = [r for r in runs if r.data.tags.get("sweep_key") == key
            and r.info.run_id not in _OPENED_HERE]
    if not same:
        return None
    for candidate in same:  # all of them: the others would be marked KILLED
        check_owner(candidate, force)
    in_folder = read_parent_id(sweep_dir)
    run = next((r for r in same if r.info.run_id == in_folder), same[0])
    for old in same:
        if old is not run:
            client.set_terminated(old.info.run_id, "KILLED")
    # one entry per resume, the killed sweep's own folder included when resumed into it
    log_metrics(client, run.info.run_id, tags={**owner_tags(), "resumed_sweep_dirs": " ".join(
        filter(None, [run.data.tags.get("resumed_sweep_dirs"), str(sweep_dir.resolve())]))})
    (sweep_dir / PARENT_ID_FILE).write_text(run.info.run_id)
    return str(run.info.run_id)


def read_parent_id(sweep_dir: Path) -> str | None:
    """The sweep's parent run id, written by :func:`open_parent` at sweep start."""
    f = sweep_dir / PARENT_ID_FILE
    return f.read_text().strip() if f.is_file() else None
