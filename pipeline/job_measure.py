"""Measuring a loaded backend: the warm-up, the measured repeats and their performance
metrics, energy and cost, the machine's rates before loading, and the job's roofline
figures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.backends.base import Backend
from pipeline.config import Config
from pipeline.measure.energy import SOURCE_PARAM, EnergyMeter, source_for_device
from pipeline.measure.memory import PeakRSSSampler, cuda_peaks, cuda_reset_peaks
from pipeline.measure.timing import PhaseTimer, clock
from pipeline.metrics import cost, performance
from pipeline.records import RequestRecord
from pipeline.workload import annotate_records, arrival_offsets, batches

log = logging.getLogger(__name__)


def measure(backend: Backend, spec: Config, requests: list, timer: PhaseTimer,
            load_points: list | None = None, conversations: list | None = None
            ) -> tuple[list[RequestRecord], dict[str, float]]:
    """Warm up, then run the measured phase ``repeats`` times; return the first repeat's
    records (the generations that get scored) and the performance metrics. A load
    profile (online only) runs its points instead and appends them to ``load_points``;
    ``workload.source=conversations`` runs the prepared ``conversations``."""
    w = spec.workload
    if w.source == "conversations":  # validation: online backends, profile=fixed
        if conversations is None:
            raise ValueError("workload.source=conversations: pass the prepared "
                             "conversations (PreparedRequests.conversations)")
        return measure_conversations(backend, spec, requests, timer, conversations)
    if backend.online and w.profile != "fixed":
        from pipeline.serving.runner import run_profile

        # the meter spans the profile's warm-up request(s) too: they run inside run_profile
        with EnergyMeter(job_device(spec)) as energy:
            records, metrics = run_profile(backend, spec, requests, timer, load_points)
        metrics.update(energy.metrics(_output_tokens(records)))
        metrics.update(job_cost(spec, metrics, load_points))
        return records, metrics
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
                        extra_pids=backend.child_pids) as mem, \
            EnergyMeter(job_device(spec)) as energy:
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
    slo = performance.slo_bounds(w)
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
    metrics.update(energy.metrics(_output_tokens(all_records)))
    metrics.update(job_cost(spec, metrics))
    return first, metrics


def measure_conversations(backend: Any, spec: Config, requests: list, timer: PhaseTimer,
                          convs: list) -> tuple[list[RequestRecord], dict[str, float]]:
    """Warm up (the first turn of the first conversation), then run the conversations once
    (the online backend's ``serve_conversations``) under the engine's own metrics; return
    every turn's record and the job's metrics: latencies, output rate, ``conversations``,
    ``conversation_turns_completed`` and ``ttft_ms_last_turn_over_first``. ``requests`` (the
    first turns) is extended in place to every turn sent, so that scoring finds each
    record's request (its whole history)."""
    from pipeline.metrics.turns import RATIO_KEY, last_turn_over_first, turn_table
    from pipeline.serving.engine_metrics import EngineSampler

    w = spec.workload
    gen = dict(max_new_tokens=w.max_new_tokens, fixed_length=w.fixed_length)
    with timer.phase("warmup"):
        for _ in range(w.warmup):
            backend.serve(requests[:1], spec.decoding, send_at=[0.0], concurrency=1,
                          timeout_s=w.request_timeout_s, **gen)
    sent: list = []
    cuda_reset_peaks()
    with PeakRSSSampler(spec.measure.rss_sample_interval_s,
                        extra_pids=backend.child_pids) as mem, \
            EnergyMeter(job_device(spec)) as energy, \
            EngineSampler(backend.metrics_url()) as engine, timer.phase("generate"):
        t0 = clock(backend.sync)
        records = backend.serve_conversations(spec, convs, backend.tokenizer, sent)
        wall = clock(backend.sync) - t0
    requests[:] = sent
    engine_metrics = engine.metrics()
    engine_metrics.pop("engine_metrics_samples", None)  # the sampler's bookkeeping
    metrics = {**performance.latency_metrics(records),
               **performance.throughput_metrics(records, wall), **engine_metrics,
               "peak_concurrency": float(performance.peak_concurrency(records)),
               "conversations": float(len(convs)),
               "conversation_turns_completed": float(sum(r.ok for r in records)),
               "measured_wall_s": wall, "peak_rss_bytes": float(mem.peak_bytes),
               "peak_rss_sampled": float(mem.method == "sampled")}
    slo = performance.slo_bounds(w)
    metrics.update(performance.goodput(records, wall, slo))
    ratio = last_turn_over_first(turn_table(records))
    if ratio is not None:  # what the grown history costs the first token
        metrics[RATIO_KEY] = ratio
    metrics.update({k: float(v) for k, v in cuda_peaks().items()})
    metrics.update(energy.metrics(_output_tokens(records)))
    metrics.update(job_cost(spec, metrics))
    return records, metrics


def _output_tokens(records: list[RequestRecord]) -> int:
    return sum(r.output_tokens for r in records if r.ok)


def job_device(spec: Config) -> str:
    """``cuda`` or ``cpu``: where the job runs (``model.device``, ``auto`` resolved), which
    decides the energy counter (:func:`pipeline.measure.energy.source_for_device`)."""
    from pipeline.devices import resolve_device

    return "cuda" if resolve_device(spec.model.device) == "cuda" else "cpu"


def job_cost(spec: Config, metrics: dict[str, float],
             load_points: list | None = None) -> dict[str, float]:
    """The job's cost per million output tokens (:mod:`pipeline.metrics.cost`) at its
    price; for a load profile also at the highest point that met the SLOs."""
    from pipeline.serving.points import slo_point

    best = slo_point(load_points) if load_points else None
    return cost.cost_metrics(cost.resolve_price(spec.cost, spec.target), metrics,
                             best["output_tokens_per_s"] if best is not None else None)


def recorded_params(spec: Config, metrics: dict[str, float]) -> dict[str, str]:
    """Params the run records beside its config: the price its cost figures used and
    where it came from, and which counter measured its energy."""
    out = cost.price_params(cost.resolve_price(spec.cost, spec.target))
    if "energy_j" in metrics:
        out[SOURCE_PARAM] = source_for_device(job_device(spec))
    return out


def _progress(items: list, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", leave=False, disable=len(items) < 2)



def measure_machine_early(spec: Config) -> None:
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


def sequences_in_flight(spec: Config, online: bool, applied: dict, n_requests: int) -> int:
    """Sequences decoded together, what the roofline divides the weights' bytes among: the
    batch offline; online the concurrency limit, never more than the server's slots
    (llama.cpp's ``n_parallel``, as its ``/props`` reports them) nor the requests."""
    w = spec.workload
    in_flight = (w.concurrency or n_requests) if online else w.batch_size
    slots = applied.get("server_slots")
    if online and isinstance(slots, int) and slots > 0:
        in_flight = min(in_flight, slots)
    return max(1, min(in_flight, n_requests))


def job_roofline(spec: Config, online: bool, applied: dict, metrics: dict, n_requests: int,
                 model_dir: str, provenance: dict | None = None) -> dict[str, float]:
    """The job's roofline figures (:func:`pipeline.measure.roofline.roofline_metrics`) for
    the sequences it decoded together; empty when they cannot be computed."""
    from pipeline.devices import resolve_dtype_name
    from pipeline.measure.roofline import roofline_metrics

    try:
        return roofline_metrics(applied, sequences_in_flight(spec, online, applied, n_requests),
                                metrics.get("output_tokens_per_s", 0.0),
                                Path(spec.paths.cache_dir).resolve(), model_dir,
                                resolve_dtype_name(spec.model.dtype, spec.model.device),
                                provenance=provenance)
    except Exception as e:  # a missing roofline must not fail a measured job
        log.warning("roofline not computed: %s", e)
        return {}

