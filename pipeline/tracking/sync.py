"""Log job folders to MLflow after the fact (e.g. when the tracking server was down).

    python -m pipeline.tracking.sync outputs/multirun/2026-11-26_10-00-00 [--tracking-uri URI]

Every ``results.json`` below the folder that has not been logged yet (no ``mlflow_run_id``
file beside it) becomes a run; a sweep folder also gets a parent run. Each job's own
tracking settings are used unless ``--tracking-uri`` / ``--experiment`` override them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.config import flatten
from pipeline.records import JobResult
from pipeline.tracking.job_runs import RUN_ID_FILE, log_job
from pipeline.tracking.parent_run import open_parent
from pipeline.tracking.store import TrackingUnavailable, client_for

# statuses with nothing measured to log
UNLOGGED = ("VALIDATED", "SKIPPED", "RUNNING")


def job_folders(path: Path) -> list[Path]:
    """Job folders (those holding results.json) at or directly below ``path``."""
    if (path / "results.json").is_file():
        return [path]
    return sorted((f.parent for f in path.glob("*/results.json")),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0))


def read_result(job_dir: Path) -> JobResult:
    """The job's ``results.json`` as a :class:`JobResult`."""
    return JobResult.from_dict(json.loads((job_dir / "results.json").read_text()))


def job_config(result: JobResult, tracking_uri: str | None, experiment: str | None
               ) -> DictConfig:
    """The job's own config, with the tracking overrides of the command line applied."""
    cfg = OmegaConf.create(result.config)
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    if experiment:
        cfg.tracking.experiment = experiment
    return cfg


def sync(path: Path, tracking_uri: str | None = None, experiment: str | None = None,
         force: bool = False) -> list[str]:
    """Log the unlogged jobs under ``path``; returns the new run ids."""
    jobs = [j for j in job_folders(path) if force or not (j / RUN_ID_FILE).is_file()]
    run_ids: list[str] = []
    parent: str | None = None
    is_sweep = not (path / "results.json").is_file()
    for job in jobs:
        result = read_result(job)
        if result.status in UNLOGGED:
            continue
        cfg = job_config(result, tracking_uri, experiment)
        if is_sweep and parent is None:
            client, exp_id = client_for(cfg)
            parent = open_parent(client, exp_id, path, {"synced": "true"})
        run_ids.append(log_job(cfg, result, job, parent, flatten(result.config)))
        print(f"logged {job} -> run {run_ids[-1]}")
    if parent is not None:
        client, _ = client_for(cfg)
        client.set_terminated(parent, "FINISHED")
    return run_ids


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.tracking.sync", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="a job folder or a sweep folder")
    ap.add_argument("--tracking-uri", help="log here instead of each job's tracking.uri")
    ap.add_argument("--experiment", help="MLflow experiment name override")
    ap.add_argument("--force", action="store_true", help="log jobs already logged too")
    args = ap.parse_args(argv)
    if not job_folders(args.path):
        print(f"error: no results.json at or below {args.path}", file=sys.stderr)
        return 2
    try:
        ids = sync(args.path, args.tracking_uri, args.experiment, args.force)
    except TrackingUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(ids)} run(s) logged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
