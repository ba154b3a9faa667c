"""The one place that wires a job: validate, load, warm up, measure, score, record.

The parts live beside it: :mod:`pipeline.job_checks` (refused before loading),
:mod:`pipeline.job_measure` (warm-up, measured repeats, roofline), :mod:`pipeline.job_scoring`
(perplexity, diversity, reference metrics), :mod:`pipeline.job_results` (results.json,
MLflow, the printed summary).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.adapters import adapter_settings
from pipeline.backends import make_backend
from pipeline.config import Config
from pipeline.errors import ConfigError, JobFailed
from pipeline.job_checks import check_inputs, check_memory_before_load
from pipeline.job_measure import job_roofline, measure, measure_machine_early, recorded_params
from pipeline.job_results import (
    finished_before,
    finished_here,
    not_finite,
    print_summary,
    record_invalid,
    track,
    write_results,
)
from pipeline.job_scoring import score
from pipeline.measure.timing import PhaseTimer, clock
from pipeline.placement import gpu_slot
from pipeline.records import JobResult, RequestRecord
from pipeline.workload.prepare import PreparedRequests, prepare_requests

log = logging.getLogger(__name__)


def config_hash(resolved: dict[str, Any]) -> str:
    """Stable hash of the resolved job config (paths and tracking settings excluded, and
    what a search optimizes: the job measured is the same)."""
    skip = ("paths", "tracking", "print_table", "dry_run", "resume", "search")
    core = {k: v for k, v in resolved.items() if k not in skip}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]



def hydra_context() -> tuple[Path, list[str], int | None, Path | None, dict[str, str]]:
    """Job folder, task overrides, job number, sweep folder (None outside multirun) and
    the preset chosen in each config group (``{"backend": "hf_fast", ...}``, Hydra's own
    ``hydra/*`` groups left out)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    choices = {str(k): str(v) for k, v in (hc.runtime.choices or {}).items()
               if v is not None and not str(k).startswith("hydra")}
    return (
        Path(hc.runtime.output_dir),
        list(hc.overrides.task),
        hc.job.num if multirun else None,
        Path(hc.sweep.dir) if multirun else None,
        choices,
    )



def run_job(cfg: DictConfig) -> JobResult:
    """Run one job from a composed config and record it; returns its result.

    A plain run raises :class:`ConfigError` / ``UnsupportedDecoding`` for bad input
    before any model loads, and :class:`JobFailed` when the job fails. Inside a sweep
    every failure is recorded (results.json, MLflow) and returned instead, so the sweep
    goes on; the sweep callback reports failures and sets the exit code.
    """
    job_dir, overrides, job_num, sweep_dir, choices = hydra_context()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    results = JobResult(job_num=job_num, config=resolved, config_hash=config_hash(resolved),
                        overrides=overrides, choices=choices,
                        started_at=int(time.time() * 1000))
    timer = PhaseTimer()
    prepared: PreparedRequests | Exception
    try:
        spec, prompts = check_inputs(cfg)
        # the requests are built before anything heavy loads, so that what a run would
        # refuse (chat template, lengths, context, references) is refused now, dry runs too
        with timer.phase("model_prepare"):
            try:
                prepared = prepare_requests(spec, prompts)
            except ConfigError:
                raise
            except Exception as e:  # a broken model folder: the job fails, recorded below
                prepared = e
    except ConfigError as e:  # UnsupportedDecoding included
        if sweep_dir is None:
            raise
        return record_invalid(cfg, results, e, job_dir, sweep_dir)
    if spec.dry_run and isinstance(prepared, Exception):
        if sweep_dir is None:
            raise JobFailed(f"could not build the requests: {type(prepared).__name__}: "
                            f"{prepared}")
        return record_invalid(cfg, results, prepared, job_dir, sweep_dir)
    if spec.dry_run:
        from pipeline.hardware import decide, for_spec
        from pipeline.memory_plan import check_plan, plan, read_architecture

        # the decisions on the hardware (+target: the card planned for) and the memory
        # estimate against it (pipeline/memory_plan.py); what would not fit is refused
        decisions = decide(spec, for_spec(spec))
        arch = read_architecture(prepared.model_dir)
        mem = plan(spec, decisions, arch, prepared.requests) if arch else None
        results.applied = decisions.applied()
        if mem is not None:
            results.applied.update(memory_estimate_bytes=mem.total, memory_fits=mem.fits)
            try:
                check_plan(mem, decisions.hardware, spec)
            except ConfigError as e:
                if sweep_dir is None:
                    raise
                return record_invalid(cfg, results, e, job_dir, sweep_dir)
        results.status = "VALIDATED"
        write_results(job_dir, results)
        print(f"valid: {' '.join(overrides) or '(defaults)'} ({len(prompts)} prompts, "
              f"{prepared.prompt_rendering} prompts of "
              f"{min(len(q.prompt_token_ids) for q in prepared.requests)}-"
              f"{max(len(q.prompt_token_ids) for q in prepared.requests)} tokens)")
        shown = {k: ("on" if v else "off") if k == "cuda_graphs" else v
                 for k, v in decisions.settings.items() if k != "device" and v is not None}
        print(f"  on {decisions.hardware.describe()}: "
              + ", ".join(f"{k}={v}" for k, v in shown.items()))
        print("  " + (mem.line() if mem else "memory: not estimated (no config.json of a "
                      "known decoder shape in the model folder)"))
        for note in decisions.notes:
            print(f"  note: {note}")
        return results

    from pipeline import provenance

    results.provenance = provenance.collect(overrides)
    if spec.resume and spec.tracking.enabled:
        done = finished_before(spec, results.config_hash)
        if done is not None:
            results.status, results.resumed_from = "SKIPPED", done["run_id"]
            results.metrics = done["metrics"]
            if not finished_here(job_dir, results.config_hash):
                # resumed in the killed sweep's own folder, a finished job keeps its file
                write_results(job_dir, results)
            print(f"skipped: {' '.join(overrides) or '(defaults)'} already FINISHED "
                  f"as MLflow run {done['run_id']} (resume=true)")
            return results

    records: list[RequestRecord] = []
    metrics: dict[str, float] = {}
    interrupted = False
    refused: ConfigError | None = None
    try:
        if isinstance(prepared, Exception):
            raise prepared
        with gpu_slot(spec):  # one GPU job at a time per GPU, whatever the launcher
            try:  # inside the slot, or another job's memory would count against this one
                check_memory_before_load(spec, prepared.model_dir, prepared.requests)
            except ConfigError as e:  # the card cannot take this job: invalid, exit 2
                refused = e
            else:
                records, metrics = _execute(spec, prepared, timer, results)
                results.status = "FINISHED"
    except KeyboardInterrupt:
        interrupted = True
        results.status = "FAILED"
        results.error = "KeyboardInterrupt: interrupted by the user (Ctrl-C)"
    except Exception as e:
        records = list(getattr(e, "records", None) or [])  # e.g. every request's error
        results.status = "FAILED"
        results.error = f"{type(e).__name__}: {e}"
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "error.txt").write_text(traceback.format_exc())
        log.error("job failed: %s (traceback in %s)", results.error, job_dir / "error.txt")
    if refused is not None:
        if sweep_dir is None:
            raise refused
        return record_invalid(cfg, results, refused, job_dir, sweep_dir)
    # the job's end, not the logging's: results.json and MLflow carry the same duration
    results.ended_at = int(time.time() * 1000)
    metrics.update({f"time_{k}_s": v for k, v in timer.seconds.items()})
    results.metrics = {k: v for k, v in metrics.items() if not not_finite(v)}
    results.requests = [r.to_dict() for r in records]
    # results.json is written before MLflow is touched: tracking must not cost results.
    write_results(job_dir, results)
    if spec.tracking.enabled:
        t0 = clock()
        track(spec, results, job_dir, sweep_dir)
        results.time_tracking_s = clock() - t0  # in memory only: the file came first
    if spec.print_table:
        print_summary(results, spec)
    if interrupted:
        raise KeyboardInterrupt
    if results.status != "FINISHED" and sweep_dir is None:
        raise JobFailed(str(results.error))
    return results


def _execute(spec: Config, prepared: PreparedRequests, timer: PhaseTimer, results: JobResult
             ) -> tuple[list[RequestRecord], dict[str, float]]:
    """Load the backend, measure, score; the heavy part of a job."""
    model_dir, requests = prepared.model_dir, prepared.requests
    with timer.phase("model_prepare"):
        measure_machine_early(spec)
    backend = make_backend(spec, model_dir)
    try:
        with timer.phase("load"):
            backend.load()
        timer.sync = backend.sync
        records, metrics = measure(backend, spec, requests, timer, results.load_points,
                                   prepared.conversations)
        if not any(r.ok for r in records):
            raise RuntimeError(f"every request failed; first error: {records[0].error}")
        with timer.phase("scoring"):
            metrics.update(score(spec, model_dir, backend, records, requests))
        metrics.update(backend.extra_metrics())
        results.applied = {**backend.applied_settings(), **adapter_settings(spec.model),
                           "prompt_rendering": prepared.prompt_rendering,
                           # the price the cost figures used and the energy counter read
                           **recorded_params(spec, metrics)}
        metrics.update(job_roofline(spec, backend.online, results.applied, metrics,
                                 len(requests), model_dir, results.provenance))
    finally:
        backend.close()
    return records, metrics

