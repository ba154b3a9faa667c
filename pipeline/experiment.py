"""The one place that wires a job: validate, load, warm up, measure, score, record."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.adapters import adapter_settings, check_adapter
from pipeline.backends import backend_class, make_backend
from pipeline.backends.base import Backend
from pipeline.config import Config, flatten, validate
from pipeline.errors import ConfigError, JobFailed
from pipeline.measure.memory import PeakRSSSampler, cuda_peaks, cuda_reset_peaks
from pipeline.measure.timing import PhaseTimer, clock
from pipeline.metrics import performance
from pipeline.placement import gpu_slot
from pipeline.records import JobResult, RequestRecord
from pipeline.workload import (
    annotate_records,
    arrival_offsets,
    batches,
    check_limits,
    load_prompts,
)
from pipeline.workload.prepare import PreparedRequests, prepare_requests
from pipeline.workload.profiles import check_profile

log = logging.getLogger(__name__)


def config_hash(resolved: dict[str, Any]) -> str:
    """Stable hash of the resolved job config (paths and tracking settings excluded)."""
    skip = ("paths", "tracking", "print_table", "dry_run", "resume")
    core = {k: v for k, v in resolved.items() if k not in skip}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def measure(backend: Backend, spec: Config, requests: list, timer: PhaseTimer,
            load_points: list | None = None) -> tuple[list[RequestRecord], dict[str, float]]:
    """Warm up, then run the measured phase ``repeats`` times; return the first repeat's
    records (the generations that get scored) and the performance metrics. A load
    profile (online only) runs its points instead and appends them to ``load_points``."""
    w = spec.workload
    if backend.online and w.profile != "fixed":
        from pipeline.serving.runner import run_profile

        return run_profile(backend, spec, requests, timer, load_points)
    groups = batches(requests, w.batch_size)
    gen = dict(max_new_tokens=w.max_new_tokens, fixed_length=w.fixed_length)
    send_at = arrival_offsets(len(requests), w.request_rate, w.arrival, w.burstiness, spec.seed)
    from pipeline.measure.memory import above_load, memory_now

    def run_once(k: int) -> list[RequestRecord]:
        if backend.online:
            return backend.serve(requests, spec.decoding, send_at=send_at,
                                 concurrency=w.concurrency, timeout_s=w.request_timeout_s,
                                 **gen)
        recs: list[RequestRecord] = []
        for group in _progress(groups, f"generate {k + 1}/{w.repeats}"):
            recs.extend(backend.generate(group, spec.decoding, **gen))
        return recs

    with timer.phase("warmup"):
        for i in range(w.warmup):
            if backend.online:
                backend.serve(requests[:1], spec.decoding, send_at=[0.0], concurrency=1,
                              timeout_s=w.request_timeout_s, **gen)
            else:
                backend.generate(groups[i % len(groups)], spec.decoding, **gen)
    # The baseline of *_above_load: the loaded model after the warm-up, so that one-time
    # lazy set-up (thread pools, kernel scratch) is not charged as working memory, and
    # after a heap trim, so that what earlier jobs freed is not in it either.
    at_load = memory_now(backend.child_pids)
    all_records: list[RequestRecord] = []
    first: list[RequestRecord] = []
    per_repeat: list[float] = []
    walls: list[float] = []
    cuda_reset_peaks()
    with PeakRSSSampler(spec.measure.rss_sample_interval_s,
                        extra_pids=backend.child_pids) as mem:
        for k in range(w.repeats):
            with timer.phase("generate"):
                t0 = clock(backend.sync)
                recs = run_once(k)
                wall = clock(backend.sync) - t0
            walls.append(wall)
            annotate_records(recs, requests)  # prefix group, request id... into extra
            per_repeat.append(sum(r.output_tokens for r in recs if r.ok) / wall)
            all_records.extend(recs)
            if k == 0:
                first = recs
    metrics: dict[str, float] = {}
    metrics.update(performance.latency_metrics(all_records))
    metrics.update(performance.throughput_metrics(all_records, sum(walls)))
    if backend.online:
        metrics["peak_concurrency"] = float(performance.peak_concurrency(all_records))
    else:
        metrics.update(performance.batch_phase_metrics(all_records))
    slo = {k: v for k, v in (("ttft_ms", w.slo_ttft_ms), ("tpot_ms", w.slo_tpot_ms),
                             ("e2el_ms", w.slo_e2el_ms)) if v is not None}
    metrics.update(performance.goodput(all_records, sum(walls), slo))
    if w.repeats > 1:
        mean, half = performance.mean_ci95(per_repeat)
        metrics["output_tokens_per_s_repeat_mean"] = mean
        metrics["output_tokens_per_s_ci95"] = half
    metrics["peak_rss_bytes"] = float(mem.peak_bytes)
    metrics["peak_rss_sampled"] = float(mem.method == "sampled")  # else high-water mark
    cuda = cuda_peaks()
    metrics.update({k: float(v) for k, v in cuda.items()})
    metrics.update(above_load(at_load, mem.peak_bytes, cuda))
    metrics["measured_wall_s"] = sum(walls)
    return first, metrics


def _progress(items: list, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", leave=False, disable=len(items) < 2)


def score(spec: Config, model_dir: str, backend: Backend, records: list[RequestRecord],
          requests: list) -> dict[str, float]:
    """Perplexity (continuations under the scorer), diversity of the generations and the
    reference metrics (``scoring.reference_metrics``) where requests carry references."""
    from pipeline.metrics import diversity, quality, reference

    out: dict[str, float] = {}
    ok = [r for r in records if r.ok]
    texts = [r.text for r in ok]
    if spec.scoring.diversity and texts:
        out.update(diversity.diversity_metrics(
            texts, max_self_bleu_samples=spec.scoring.self_bleu_max_samples, seed=spec.seed))
    ref_names = reference.resolve_metrics(spec.scoring, spec.workload.name)
    if ref_names and any(q.reference is not None for q in requests):
        out.update(reference.score_records(ref_names, ok, requests, spec.scoring))
    # servers without token ids (plain OpenAI endpoints) cannot be scored token-exactly
    ok = [r for r in ok if r.output_token_ids] if not spec.scoring.scorer_path else ok
    if spec.scoring.perplexity and any(r.output_tokens for r in ok):
        scorer, device, reuse = _scorer(spec, model_dir, backend)
        by_index = {q.index: q for q in requests}
        if spec.scoring.scorer_path:
            tok = scorer_tokenizer(spec.scoring.scorer_path, spec)
            prompts = [tok(by_index[r.index].prompt)["input_ids"] for r in ok]
            conts = [tok(r.text, add_special_tokens=False)["input_ids"] for r in ok]
        else:
            prompts = [list(by_index[r.index].prompt_token_ids) for r in ok]
            conts = [r.output_token_ids for r in ok]
        nlls, counts = quality.continuation_nll(scorer, prompts, conts, device=device,
                                                   batch_size=spec.scoring.batch_size)
        out.update(quality.perplexity_metrics(nlls, counts))
        if not reuse:
            del scorer
    return out


def scorer_tokenizer(path: str, spec: Config) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=spec.model.trust_remote_code)


def _scorer(spec: Config, model_dir: str, backend: Backend) -> tuple[Any, str, bool]:
    """The scorer model: the backend's own HF model when it already is the scorer (same
    weights, same dtype), else a fresh load. ``scoring.scorer_dtype=auto`` is the
    generating model's dtype on CUDA (so the loaded model is reused: one copy on the card)
    and float32 on the CPU (:func:`pipeline.gpu_memory.scorer_dtype_name`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.devices import resolve_device, resolve_dtype_name
    from pipeline.gpu_memory import scorer_dtype_name

    device = resolve_device(spec.model.device)
    # the dtype the backend generated in: its own dtype setting, else the model's
    generating = resolve_dtype_name(getattr(spec.backend, "dtype", None) or spec.model.dtype,
                                    device)
    name = scorer_dtype_name(spec.scoring.scorer_dtype, device, generating,
                             cuda_auto_dtype=resolve_dtype_name("auto", device))
    dtype = getattr(torch, name)
    model = None if spec.scoring.scorer_path else backend.scorer_model(dtype)
    log.info("perplexity scorer: %s on %s (%s)", name, device,
             "the generating model" if model is not None else "a fresh load")
    if model is not None:
        return model, device, True
    path = spec.scoring.scorer_path or model_dir
    m = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=spec.model.trust_remote_code
    ).to(device).eval()
    torch.manual_seed(spec.seed)
    return m, device, False


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


def check_inputs(cfg: DictConfig) -> tuple[Config, list[str]]:
    """Everything that can be checked without a model: types, ranges, choices, decoding
    support of the backend, the prompts themselves. Imports nothing heavy."""
    spec = validate(cfg)
    check_adapter(spec.model)  # a LoRA adapter needs its base on this machine
    backend_class(spec.backend.impl).check(spec)
    from pipeline.hardware import decide, for_spec

    # every auto on the hardware (a +target's card in a dry run): what it cannot run is
    # refused here, naming the key, the hardware and the fix
    decide(spec, for_spec(spec))
    check_profile(spec, backend_class(spec.backend.impl).online)  # offline: fixed only
    check_limits(spec)  # input + output within the context, per-request output lengths
    return spec, load_prompts(spec.workload)


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
        return _record_invalid(cfg, results, e, job_dir, sweep_dir)
    if spec.dry_run and isinstance(prepared, Exception):
        if sweep_dir is None:
            raise JobFailed(f"could not build the requests: {type(prepared).__name__}: "
                            f"{prepared}")
        return _record_invalid(cfg, results, prepared, job_dir, sweep_dir)
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
                return _record_invalid(cfg, results, e, job_dir, sweep_dir)
        results.status = "VALIDATED"
        _write_results(job_dir, results)
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
        done = _finished_before(spec, results.config_hash)
        if done is not None:
            results.status, results.resumed_from = "SKIPPED", done["run_id"]
            results.metrics = done["metrics"]
            if not _finished_here(job_dir, results.config_hash):
                # resumed in the killed sweep's own folder, a finished job keeps its file
                _write_results(job_dir, results)
            print(f"skipped: {' '.join(overrides) or '(defaults)'} already FINISHED "
                  f"as MLflow run {done['run_id']} (resume=true)")
            return results

    records: list[RequestRecord] = []
    metrics: dict[str, float] = {}
    interrupted = False
    try:
        if isinstance(prepared, Exception):
            raise prepared
        with gpu_slot(spec):  # one GPU job at a time per GPU, whatever the launcher
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
    # the job's end, not the logging's: results.json and MLflow carry the same duration
    results.ended_at = int(time.time() * 1000)
    metrics.update({f"time_{k}_s": v for k, v in timer.seconds.items()})
    results.metrics = {k: v for k, v in metrics.items() if not _bad(v)}
    results.requests = [r.to_dict() for r in records]
    # results.json is written before MLflow is touched: tracking must not cost results.
    _write_results(job_dir, results)
    if spec.tracking.enabled:
        t0 = clock()
        _track(spec, results, job_dir, sweep_dir)
        results.time_tracking_s = clock() - t0  # in memory only: the file came first
    if spec.print_table:
        _print_summary(results, spec)
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
        _measure_machine_early(spec)
    backend = make_backend(spec, model_dir)
    try:
        with timer.phase("load"):
            backend.load()
        timer.sync = backend.sync
        records, metrics = measure(backend, spec, requests, timer, results.load_points)
        if not any(r.ok for r in records):
            raise RuntimeError(f"every request failed; first error: {records[0].error}")
        with timer.phase("scoring"):
            metrics.update(score(spec, model_dir, backend, records, requests))
        metrics.update(backend.extra_metrics())
        results.applied = {**backend.applied_settings(), **adapter_settings(spec.model),
                           "prompt_rendering": prepared.prompt_rendering}
        metrics.update(_roofline(spec, backend.online, results.applied, metrics,
                                 len(requests), model_dir, results.provenance))
    finally:
        backend.close()
    return records, metrics


def _measure_machine_early(spec: Config) -> None:
    """Measure the machine's rates for the roofline (once per machine, cached only when
    the machine was idle while measuring) before the model loads: after a job, compile
    workers or engine processes may still be busy and the bandwidth would read low (seen:
    23.7 instead of 30.9 GB/s)."""
    from pipeline.devices import resolve_device, resolve_dtype_name
    from pipeline.measure.roofline import DTYPE_BYTES, cached_rates

    try:  # the same auto rules the backends apply when they load
        device = "cuda" if resolve_device(spec.model.device) == "cuda" else "cpu"
        # a backend without its own dtype setting runs the model's
        dtype = resolve_dtype_name(getattr(spec.backend, "dtype", None) or spec.model.dtype)
        if dtype in DTYPE_BYTES:
            cached_rates(Path(spec.paths.cache_dir).resolve(), device, dtype)
    except Exception as e:  # the roofline is measured after the job instead
        log.warning("machine rates not measured before loading: %s", e)


def _roofline(spec: Config, online: bool, applied: dict, metrics: dict, n_requests: int,
              model_dir: str, provenance: dict | None = None) -> dict[str, float]:
    from pipeline.devices import resolve_dtype_name
    from pipeline.measure.roofline import roofline_metrics

    w = spec.workload
    # sequences decoded together: the batch offline, the concurrency limit online
    in_flight = (w.concurrency or n_requests) if online else w.batch_size
    try:
        return roofline_metrics(applied, min(in_flight, n_requests),
                                metrics.get("output_tokens_per_s", 0.0),
                                Path(spec.paths.cache_dir).resolve(), model_dir,
                                resolve_dtype_name(spec.model.dtype, spec.model.device),
                                provenance=provenance)
    except Exception as e:  # a missing roofline must not fail a measured job
        log.warning("roofline not computed: %s", e)
        return {}


def _write_results(job_dir: Path, results: JobResult) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results.to_dict(), indent=1, default=str))
    tmp.replace(job_dir / "results.json")  # atomic: a killed job never leaves half a file


def _finished_here(job_dir: Path, chash: str) -> bool:
    """Whether ``job_dir`` already holds a FINISHED results.json of this config."""
    try:
        old = json.loads((job_dir / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return old.get("status") == "FINISHED" and old.get("config_hash") == chash


def _record_invalid(cfg: DictConfig, results: JobResult, e: Exception, job_dir: Path,
                    sweep_dir: Path) -> JobResult:
    """A sweep job with bad input: record it as FAILED (no model was loaded) and go on."""
    from pipeline import provenance, tracking

    results.status, results.error = "FAILED", f"invalid config: {e}"
    results.provenance = provenance.collect(results.overrides)
    _write_results(job_dir, results)
    print(f"error: job {results.job_num}: {e}", file=sys.stderr)
    if cfg.tracking.enabled:
        try:
            tracking.log_job(cfg, results, job_dir, tracking.read_parent_id(sweep_dir),
                             flatten(results.config))
        except Exception as te:
            log.error("MLflow logging failed (%s)", te)
    return results


def _finished_before(spec: Config, chash: str) -> dict | None:
    """The latest FINISHED run with this config hash in the experiment, if any."""
    from pipeline import tracking

    try:
        return tracking.find_finished(spec, chash)
    except Exception as e:
        log.warning("resume: could not query MLflow (%s); running the job", e)
        return None


def _bad(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _track(spec: Config, results: JobResult, job_dir: Path, sweep_dir: Path | None) -> None:
    """Log the job to MLflow (a child of its sweep's parent run); never raises."""
    from pipeline import tracking

    parent = tracking.read_parent_id(sweep_dir) if sweep_dir else None
    if sweep_dir and parent is None:
        print(f"warning: no {tracking.PARENT_ID_FILE} in {sweep_dir}: this job is logged "
              "without its sweep's parent run (is paths.output_dir absolute and shared?)",
              file=sys.stderr)
    try:
        run_id = tracking.log_job(spec, results, job_dir, parent, flatten(spec))
        results.mlflow_run_id = run_id
    except Exception as e:
        print(f"warning: MLflow logging failed ({str(e).splitlines()[0] if str(e) else e!r}); "
              f"results are safe in {job_dir / 'results.json'}. Log them later with:\n"
              f"  python -m pipeline.tracking.sync {job_dir}", file=sys.stderr)


def _print_summary(results: JobResult, spec: Config) -> None:
    """The job's table, what was applied and where to see its MLflow run: the UI command
    and the run's own page in that UI."""
    from pipeline import tracking

    row = {"status": results.status, "metrics": results.metrics}
    print()
    print(tracking.format_table([row], ["status"]), flush=True)
    applied = results.applied
    if applied:
        print("applied: " + ", ".join(f"{k}={v}" for k, v in applied.items()))
    if spec.tracking.enabled and results.mlflow_run_id:
        uri = tracking.tracking_uri(spec)
        try:  # the run's URL needs its experiment's id
            exp_id: str | None = tracking.client_for(spec)[1]
        except Exception:  # the store just took the run; if it fails now, the command
            exp_id = None  # alone is printed
        print(f"MLflow run {results.mlflow_run_id}; view with:\n  "
              f"{tracking.ui_hint(uri, exp_id, run_id=results.mlflow_run_id)}")
    sys.stdout.flush()
