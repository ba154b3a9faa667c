"""The Hydra callback of a ``-m`` sweep: opens its MLflow parent run before the first job;
at the end prints the sweep table, runs the sweep's analysis (parity, the gate: see
:func:`pipeline.analysis.sweep_end.analyse_sweep`), puts summary metrics on the parent,
closes it and stops the engines the sweep kept warm."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline import backends, provenance
from pipeline.analysis.sweep_end import analyse_sweep
from pipeline.config import flatten
from pipeline.metrics.catalog import HEADLINE
from pipeline.records import JobResult
from pipeline.tracking.job_runs import RUN_ID_FILE, log_job, log_metrics
from pipeline.tracking.links import ui_hint
from pipeline.tracking.parent_run import (
    SweepStillOwned,
    open_parent,
    owner_tags,
    read_parent_id,
    sweep_key,
    take_over_parent,
)
from pipeline.tracking.store import client_for, tracking_uri
from pipeline.tracking.table import format_table

log = logging.getLogger(__name__)


class SweepCallback(Callback):
    """Hydra callback: the sweep's parent run and end-of-sweep summary."""

    def __init__(self) -> None:
        self.t_start = time.perf_counter()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the parent run (tagged with this process as its owner), so that every job
        (in any process) can attach to it. With ``resume=true`` a killed sweep's parent is
        taken over instead; one a live sweep may still own ends the sweep here (exit 2)."""
        self.t_start = time.perf_counter()
        if not config.tracking.enabled or config.dry_run:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        try:
            client, exp_id = client_for(config)
            if config.resume:  # continue the killed sweep's parent run, if any
                force = bool(config.tracking.get("force_takeover", False))
                parent = take_over_parent(client, exp_id, sweep_dir, sweep_key(overrides),
                                          force=force)
                if parent is not None:
                    log.info("resume: continuing the sweep's MLflow parent run %s", parent)
                    return
            open_parent(client, exp_id, sweep_dir, {
                **owner_tags(),
                "hydra_overrides": " ".join(overrides),
                "sweep_key": sweep_key(overrides),
                "command": provenance.command_line(),
                "git_commit": provenance.git_commit(),
            })
        except SweepStillOwned as e:
            # before any job: two sweeps writing one parent would interleave their children.
            # Hydra lets BaseException through its callback wrapper (on_multirun_end
            # leaves the same way); exit 2 as run.py does for input it refuses
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from e
        except Exception as e:  # tracking must never cost the measurements
            log.warning("could not open the sweep's MLflow parent run: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarise the sweep, close its parent run, free the engines; exit 1 when a job
        failed."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows, common = read_job_rows(sweep_dir)
        efficiency = sweep_efficiency(rows, time.perf_counter() - self.t_start)
        print_sweep_summary(sweep_dir, rows, common, efficiency)
        analyse_sweep(config, sweep_dir)  # parity, then the gate
        link_skipped(config, sweep_dir)
        finish_parent(config, sweep_dir, rows, efficiency)
        stop_engines()
        if any(r["status"] == "FAILED" for r in rows):
            # Hydra has no exit-code hook; leaving from the last callback is the clean way
            raise SystemExit(1)


def _job_sort_key(p: Path) -> tuple[int, str]:
    name = p.parent.name
    return (int(name) if name.isdigit() else 1 << 30, name)


def read_job_rows(sweep_dir: Path) -> tuple[list[dict[str, Any]], set[str]]:
    """One row per job folder's results.json (job, status, overrides, metrics, error) in
    job order, and the overrides every job shares (left out of the rows' ``overrides``:
    the table shows what varies)."""
    results = [(f, JobResult.from_dict(json.loads(f.read_text())))
               for f in sorted(sweep_dir.glob("*/results.json"), key=_job_sort_key)]
    rows = [{"job": r.job_num if r.job_num is not None else f.parent.name, "status": r.status,
             "overrides": r.overrides, "metrics": r.metrics, "error": r.error}
            for f, r in results]
    common = set.intersection(*(set(r["overrides"]) for r in rows)) if rows else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["overrides"] if o not in common) or "(defaults)"
    return rows, common


def sweep_efficiency(rows: list[dict[str, Any]], wall_s: float) -> dict[str, float]:
    """How much of the sweep's wall time was measured generation, and (vLLM jobs: an
    engine start costs tens of seconds) how many engines were started."""
    gen = sum(r["metrics"].get("time_generate_s", 0.0) for r in rows
              if r["status"] == "FINISHED")
    out = {"sweep_wall_s": wall_s, "sweep_generate_s": gen,
           "sweep_generate_share": gen / wall_s if wall_s > 0 else 0.0}
    reuse = [r["metrics"]["engine_reused"] for r in rows if "engine_reused" in r["metrics"]]
    if reuse:
        out["sweep_engine_starts"] = sum(1 for v in reuse if not v)
        out["sweep_engine_jobs"] = len(reuse)
    return out


def print_sweep_summary(sweep_dir: Path, rows: list[dict[str, Any]], common: set[str],
                        efficiency: dict[str, float]) -> None:
    """The sweep table, the failed jobs' errors and where the time went."""
    failed = [r for r in rows if r["status"] == "FAILED"]
    print(f"\nSweep {sweep_dir} — {len(rows)} job(s), {len(failed)} failed"
          + (f"; common overrides: {' '.join(sorted(common))}" if common else ""))
    print(format_table(rows, ["job", "status", "overrides"]))
    for r in failed:
        print(f"FAILED job {r['job']} ({r['overrides']}): {r['error']}")
    print(f"Sweep wall time {efficiency['sweep_wall_s']:.1f} s; measured generation "
          f"{efficiency['sweep_generate_s']:.1f} s "
          f"({100 * efficiency['sweep_generate_share']:.0f}% of the sweep)")
    if "sweep_engine_starts" in efficiency:
        print(f"vLLM engine starts: {efficiency['sweep_engine_starts']:.0f} for "
              f"{efficiency['sweep_engine_jobs']:.0f} vLLM job(s)")


def parent_summary(rows: list[dict[str, Any]], efficiency: dict[str, float]
                   ) -> dict[str, float]:
    """The parent run's metrics: job counts, the efficiency figures and each job's headline
    metrics as ``job<N>.<metric>``."""
    summary: dict[str, float] = {
        "jobs_total": len(rows),
        "jobs_failed": sum(r["status"] == "FAILED" for r in rows),
        "jobs_skipped": sum(r["status"] == "SKIPPED" for r in rows),
        **{k: v for k, v in efficiency.items() if k not in ("sweep_generate_s",
                                                           "sweep_engine_jobs")},
    }
    for r in rows:
        summary.update({f"job{r['job']}.{k}": r["metrics"][k] for k in HEADLINE
                        if k in r["metrics"]})
    return summary


def link_skipped(config: DictConfig, sweep_dir: Path) -> list[str]:
    """Log each job that ``resume=true`` skipped as a child of this sweep's parent
    (tag ``status=SKIPPED``, ``resumed_from`` its original run, the original's metrics), so
    the parent lists every job of the sweep. A job whose original run is already a child
    of this parent (a taken-over parent) is not linked twice. Never raises; returns the
    new run ids."""
    parent = read_parent_id(sweep_dir)
    if not (parent and config.tracking.enabled and not config.dry_run):
        return []
    ids: list[str] = []
    try:
        client, _ = client_for(config)
        for f in sorted(sweep_dir.glob("*/results.json"), key=_job_sort_key):
            job_dir = f.parent
            result = JobResult.from_dict(json.loads(f.read_text()))
            if result.status != "SKIPPED" or (job_dir / RUN_ID_FILE).is_file():
                continue
            if result.resumed_from:
                orig = client.get_run(result.resumed_from)
                if orig.data.tags.get("mlflow.parentRunId") == parent:
                    (job_dir / RUN_ID_FILE).write_text(result.resumed_from)
                    continue
            ids.append(log_job(config, result, job_dir, parent, flatten(result.config)))
    except Exception as e:
        log.warning("could not link the skipped jobs to the sweep's parent run: %s", e)
    return ids


def finish_parent(config: DictConfig, sweep_dir: Path, rows: list[dict[str, Any]],
                  efficiency: dict[str, float]) -> None:
    """Put the summary on the parent run and close it (FAILED when a job failed). Never
    raises: the jobs' results are already safe."""
    parent = read_parent_id(sweep_dir)
    if not (parent and config.tracking.enabled and not config.dry_run):
        return
    try:
        client, exp_id = client_for(config)
        summary = parent_summary(rows, efficiency)
        log_metrics(client, parent, metrics=summary)
        status = "FINISHED" if summary["jobs_failed"] == 0 else "FAILED"
        client.set_terminated(parent, status)
        children = child_run_ids(client, exp_id, parent)
        print(f"MLflow parent run {parent} ({status}); view with:\n  "
              f"{ui_hint(tracking_uri(config), exp_id, parent, children)}")
    except Exception as e:
        log.warning("could not finish the sweep's MLflow parent run: %s", e)


def child_run_ids(client: Any, exp_id: str, parent: str) -> list[str]:
    """The ids of the parent run's children (the sweep's job runs)."""
    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                              max_results=1000)
    return [r.info.run_id for r in runs]


def stop_engines() -> None:
    """Stop the engines and servers the sweep's jobs kept for reuse (only backends this
    process loaded are asked, so no engine is imported just to stop nothing)."""
    stopped = backends.shutdown_all()
    if stopped:
        log.info("stopped %d cached engine(s) / server(s)", stopped)
