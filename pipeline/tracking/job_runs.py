"""A job's MLflow run: logging it (metrics, params, tags, artifacts, the generations
table), its name and tags, hiding the earlier attempts a resumed sweep replaced, and
finding a finished run by config hash."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.measure import energy
from pipeline.metrics import cost
from pipeline.metrics.turns import RATIO_KEY, last_turn_over_first, turn_metrics, turn_table
from pipeline.records import JobResult
from pipeline.tracking.store import client_for

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
#: on a job run a resumed sweep re-ran: the id of the run that replaced it (it is then
#: soft-deleted, restorable with ``MlflowClient.restore_run``)
SUPERSEDED_TAG = "infersweep.superseded_by"
#: on a job run: the job's number in its sweep (Hydra's ``job.num``)
JOB_NUM_TAG = "job_num"
#: the config groups whose chosen preset names a run (``<job>-<backend>-<decoding>-<workload>``)
NAME_GROUPS = ("backend", "decoding", "workload")


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


def _log_turns(client: Any, run_id: str, result: JobResult) -> None:
    """A multi-turn workload's per-turn figures as curves (``turn.*``, turn t at step t),
    and the last turn's TTFT p50 over the first's; nothing for other workloads."""
    table = turn_table(result.requests)
    if not table:
        return
    for row in table:
        log_metrics(client, run_id, metrics=turn_metrics(row), step=int(row["turn"]))
    if RATIO_KEY not in result.metrics:  # already among the job's metrics: logged above
        log_metrics(client, run_id, metrics={RATIO_KEY: last_turn_over_first(table)})


#: applied settings that are also the run's params
RECORDED_PARAMS = (cost.PRICE_PARAM, cost.SOURCE_PARAM, energy.SOURCE_PARAM)


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
    # what the job used beside its config (the price of its cost figures and where it came
    # from, the energy counter read): applied settings, params too, also when synced later
    for key in RECORDED_PARAMS:
        if result.applied.get(key) is not None:
            params.setdefault(key, result.applied[key])
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
        _log_turns(client, run_id, result)
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
    :func:`.parent_run.sweep_key`), the job number within it (same overrides, same
    expansion order) and the ``config_hash``. Each earlier run is tagged
    ``infersweep.superseded_by=<run id>`` and deleted with MLflow's own ``delete_run``
    (restorable: ``mlflow runs restore``); one left RUNNING by a kill is marked KILLED
    first. Never raises (the new run is already logged); returns the ids superseded."""
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
