"""Recording a job's result: results.json in its folder, its MLflow run, a sweep job's
refusal, resume look-ups, and the summary printed at the end of a plain run."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.config import Config, flatten
from pipeline.records import JobResult

log = logging.getLogger(__name__)


def write_results(job_dir: Path, results: JobResult) -> None:
    """Write ``<job_dir>/results.json`` atomically."""
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results.to_dict(), indent=1, default=str))
    tmp.replace(job_dir / "results.json")  # atomic: a killed job never leaves half a file


def finished_here(job_dir: Path, chash: str) -> bool:
    """Whether ``job_dir`` already holds a FINISHED results.json of this config."""
    try:
        old = json.loads((job_dir / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return old.get("status") == "FINISHED" and old.get("config_hash") == chash


def record_invalid(cfg: DictConfig, results: JobResult, e: Exception, job_dir: Path,
                    sweep_dir: Path) -> JobResult:
    """A sweep job with bad input: record it as FAILED (no model was loaded) and go on."""
    from pipeline import provenance
    from pipeline.tracking.job_runs import log_job
    from pipeline.tracking.parent_run import read_parent_id

    results.status, results.error = "FAILED", f"invalid config: {e}"
    results.provenance = provenance.collect(results.overrides)
    write_results(job_dir, results)
    print(f"error: job {results.job_num}: {e}", file=sys.stderr)
    if cfg.tracking.enabled:
        try:
            log_job(cfg, results, job_dir, read_parent_id(sweep_dir),
                    flatten(results.config))
        except Exception as te:
            log.error("MLflow logging failed (%s)", te)
    return results


def finished_before(spec: Config, chash: str) -> dict | None:
    """The latest FINISHED run with this config hash in the experiment, if any."""
    from pipeline.tracking.job_runs import find_finished

    try:
        return find_finished(spec, chash)
    except Exception as e:
        log.warning("resume: could not query MLflow (%s); running the job", e)
        return None


def not_finite(v: Any) -> bool:
    """Whether ``v`` is a float that MLflow and JSON cannot hold (NaN, infinity)."""
    return isinstance(v, float) and not math.isfinite(v)


def track(spec: Config, results: JobResult, job_dir: Path, sweep_dir: Path | None) -> None:
    """Log the job to MLflow (a child of its sweep's parent run); never raises."""
    from pipeline.tracking.job_runs import log_job
    from pipeline.tracking.parent_run import PARENT_ID_FILE, read_parent_id

    parent = read_parent_id(sweep_dir) if sweep_dir else None
    if sweep_dir and parent is None:
        print(f"warning: no {PARENT_ID_FILE} in {sweep_dir}: this job is logged "
              "without its sweep's parent run (is paths.output_dir absolute and shared?)",
              file=sys.stderr)
    try:
        run_id = log_job(spec, results, job_dir, parent, flatten(spec))
        results.mlflow_run_id = run_id
    except Exception as e:
        print(f"warning: MLflow logging failed ({str(e).splitlines()[0] if str(e) else e!r}); "
              f"results are safe in {job_dir / 'results.json'}. Log them later with:\n"
              f"  python -m pipeline.tracking.sync {job_dir}", file=sys.stderr)


def print_summary(results: JobResult, spec: Config) -> None:
    """The job's table, what was applied and where to see its MLflow run: the UI command
    and the run's own page in that UI."""
    from pipeline.tracking.links import ui_hint
    from pipeline.tracking.store import client_for, tracking_uri
    from pipeline.tracking.table import format_table

    row = {"status": results.status, "metrics": results.metrics}
    print()
    print(format_table([row], ["status"]), flush=True)
    applied = results.applied
    if applied:
        print("applied: " + ", ".join(f"{k}={v}" for k, v in applied.items()))
    if spec.tracking.enabled and results.mlflow_run_id:
        uri = tracking_uri(spec)
        try:  # the run's URL needs its experiment's id
            exp_id: str | None = client_for(spec)[1]
        except Exception:  # the store just took the run; if it fails now, the command
            exp_id = None  # alone is printed
        print(f"MLflow run {results.mlflow_run_id}; view with:\n  "
              f"{ui_hint(uri, exp_id, run_id=results.mlflow_run_id)}")
    sys.stdout.flush()
