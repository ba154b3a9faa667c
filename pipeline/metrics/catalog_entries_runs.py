"""The metric catalog's rows of load profiles and serving points, conversation turns, the
gate, the machine and its roofline, cost and energy, and a sweep's parent run (the rows of
what one job measures on its own are in :mod:`pipeline.metrics.catalog_entries`, with the
row type and its placeholders)."""

from __future__ import annotations

from pipeline.metrics.catalog_entries import (
    COST,
    ENGINE_SCRAPE,
    GATE,
    GATE_SRC,
    HIGHER,
    JOB,
    LOWER,
    MACHINE,
    NEUTRAL,
    PARENT,
    PERF,
    POINTS,
    PROFILE,
    ROOF,
    SEARCH,
    SERVING,
    SWEEP,
    E,
    Entry,
)

TURNS = "pipeline/metrics/turns.py: turn_table, logged by pipeline/tracking/job_runs.py"

RUN_ENTRIES: tuple[Entry, ...] = (
    # ------------------------------------------------------------------ serving points
    E("points_run", "points", "Load profile: points run.", NEUTRAL, PROFILE, SERVING),
    E("<ttft|e2el>_sched_ms_<stat>", "ms", "Trace replay (`workload.source=trace`): TTFT and "
      "E2EL from each request's scheduled send, the trace's time / `trace_speedup` "
      "(MLPerf's convention).", LOWER, f"{PERF}: schedule_metrics; "
      "pipeline/serving/runner.py, trace replay", SERVING),
    E("dispatch_lag_ms_<p50|p99|max>", "ms", "Trace replay: how late requests were sent "
      "against the trace's schedule.", LOWER, f"{PERF}: schedule_metrics; "
      "pipeline/serving/runner.py, trace replay", SERVING),
    E("points_invalid", "points", "Load profile: points flagged invalid (the client did not "
      "keep up, errors, token-count mismatches).", LOWER, PROFILE, SERVING),
    E("points_saturated", "points", "Load profile: points where the server did not keep up.",
      NEUTRAL, PROFILE, SERVING),
    E("max_rate_under_slo", "req/s", "Load profile with SLOs: the highest achieved rate "
      "among open-loop points that pass the SLOs at `workload.slo_percentile`, are valid "
      "and not saturated (slo_search: its answer); 0 when none passes.", HIGHER, PROFILE,
      SERVING),
    E("saturation_rate", "req/s", "Load profile: the lowest offered rate at which a point "
      "saturated (a load level, not a capacity).", HIGHER, PROFILE, SERVING),
    E("sync_requests_per_s", "req/s", "Load profile: the synchronous point's achieved rate "
      "(one request at a time).", HIGHER, PROFILE, SERVING),
    E("max_throughput_requests_per_s", "req/s", "Load profile: the max-throughput point's "
      "achieved rate.", HIGHER, PROFILE, SERVING),
    E("load.offered_rate", "req/s", "Per point (step = point index): the nominal request "
      "rate asked for (open-loop points only).", NEUTRAL, POINTS, SERVING),
    E("load.offered_rate_realized", "req/s", "Per point: `(n - 1)` / the span of the "
      "scheduled sends: the rate the schedule really offered.", NEUTRAL, POINTS, SERVING),
    E("load.sent_rate", "req/s", "Per point: `(n - 1)` / the span of the actual sends.",
      NEUTRAL, POINTS, SERVING),
    E("load.completion_rate", "req/s", "Per point: `(k - 1)` / the span of the k "
      "completions.", HIGHER, POINTS, SERVING),
    E("load.achieved_rate", "req/s", "Per point: the point's capacity: open loop, the "
      "smaller of completion rate and realized offered rate; closed loop, completed / "
      "wall.", HIGHER, POINTS, SERVING),
    E("load.output_tokens_per_s", "tok/s", "Per point: output tokens of the successful "
      "requests / the point's wall time.", HIGHER, POINTS, SERVING),
    E("load.requests_<sent|completed>", "requests", "Per point: requests sent, and those "
      "that succeeded.", NEUTRAL, POINTS, SERVING),
    E("load.<ttft|itl|e2el>_ms_<p50|p99>", "ms", "Per point: TTFT, ITL, E2EL percentiles, "
      "TTFT and E2EL from the actual send (vLLM's convention).", LOWER, POINTS, SERVING),
    E("load.tpot_ms_mean", "ms", "Per point: mean TPOT, every request weighing the same.",
      LOWER, POINTS, SERVING),
    E("load.tpot_ms_token_weighted_mean", "ms", "Per point: `sum(E2EL - TTFT) / sum(N_out - "
      "1)`: every token weighing the same.", LOWER, f"{PERF}: weighted_means", SERVING),
    E("load.<ttft|e2el>_sched_ms_<p50|p99>", "ms", "Per point: TTFT and E2EL from the "
      "scheduled send (MLPerf's convention: a client that falls behind cannot hide it).",
      LOWER, f"{PERF}: schedule_metrics", SERVING),
    E("load.dispatch_lag_ms_<p50|p99>", "ms", "Per point: how late requests were sent "
      "against their schedule.", LOWER, f"{PERF}: schedule_metrics", SERVING),
    E("load.goodput_requests_per_s", "req/s", "Per point: requests meeting every SLO / the "
      "point's wall time (judged in the point's SLO dialect).", HIGHER, f"{PERF}: goodput",
      SERVING),
    E("load.goodput_fraction", "0-1", "Per point: requests meeting every SLO / requests "
      "sent.", HIGHER, f"{PERF}: goodput", SERVING),
    E("load.slo_met", "0/1", "Per point: 1 when every SLO holds at "
      "`workload.slo_percentile` (failed requests count as infinitely late).", HIGHER,
      f"{PERF}: slo_percentiles", SERVING),
    E("load.saturated", "0/1", "Per point: 1 when completions fell short of "
      "`saturation_rate_ratio` x the offered rate (or the live rule stopped the point).",
      LOWER, POINTS, SERVING),
    E("load.valid", "0/1", "Per point: 1 when the client kept up (CPU, dispatch lag, its "
      "own sends), no request failed and token counts agree.", HIGHER, POINTS, SERVING),
    E("load.client_cpu_percent", "%", "Per point: this process's CPU use during the point, "
      "in percent of one core.", LOWER, POINTS, SERVING),
    E("load.errors", "requests", "Per point: failed requests (HTTP errors, timeouts, cut "
      "streams).", LOWER, POINTS, SERVING),
    E("load.aborted", "requests", "Per point: requests aborted because the point was "
      "stopped early (not errors).", NEUTRAL, POINTS, SERVING),
    E("load.token_count_mismatches", "requests", "Per point: successful requests whose "
      "server `usage` token count disagrees with the client's own count.", LOWER, POINTS,
      SERVING),
    E("load.engine_kv_cache_usage_max", "0-1", "Per point, vLLM: the highest KV-cache usage "
      "seen on its /metrics during the point.", NEUTRAL, ENGINE_SCRAPE, SERVING),
    E("load.engine_requests_<waiting|running>_max", "requests", "Per point, vLLM: the most "
      "requests waiting / running in the engine during the point.", NEUTRAL, ENGINE_SCRAPE,
      SERVING),
    E("load.engine_preemptions", "preemptions", "Per point, vLLM: requests preempted during "
      "the point.", LOWER, ENGINE_SCRAPE, SERVING),
    E("load.engine_prefix_cache_hit_rate", "0-1", "Per point, vLLM: prefix-cache hits / "
      "queries during the point.", HIGHER, ENGINE_SCRAPE, SERVING),
    # ------------------------------------------------------------------ conversation turns
    E("turn.requests", "requests", "Per turn (step = turn number) of a multi-turn "
      "conversation workload: the turn's successful requests.", NEUTRAL, TURNS, SERVING),
    E("turn.errors", "requests", "Per turn (step = turn number): the turn's failed "
      "requests.", LOWER, TURNS, SERVING),
    E("turn.ttft_ms_<p50|p99|mean>", "ms", "Per turn (step = turn number): TTFT over the "
      "turn's successful requests, whose prompt is the whole conversation so far.", LOWER,
      TURNS, SERVING),
    E("turn.e2el_ms_p50", "ms", "Per turn (step = turn number): median end-to-end latency "
      "of the turn's successful requests.", LOWER, TURNS, SERVING),
    E("turn.prompt_tokens_mean", "tokens", "Per turn (step = turn number): mean prompt "
      "tokens, the prefill (the history grows with the turn).", NEUTRAL, TURNS, SERVING),
    E("turn.<cached|uncached>_prompt_tokens_mean", "tokens", "Per turn (step = turn "
      "number), when the server reported it for every successful request of the turn: mean "
      "prompt tokens its prefix cache served, and the rest (prompt - cached: what was "
      "prefilled).", NEUTRAL, TURNS, SERVING),
    E("ttft_ms_last_turn_over_first", "x", "Multi-turn conversations: `turn.ttft_ms_p50` of "
      "the last turn / that of turn 1, what the grown history costs the first token (above "
      "1: slower).", LOWER, TURNS, SERVING),
    # ------------------------------------------------------------------ gate
    E("gate.exact_match_rate", "0-1", "On an optimized job: share of prompts whose greedy "
      "tokens are identical to its baseline job's.", HIGHER, GATE_SRC, GATE),
    E("gate.first_divergence_min", "tokens", "The earliest output position at which a "
      "prompt's tokens differ from the baseline's.", HIGHER, GATE_SRC, GATE),
    E("gate.mean_kl", "nats/token", "Mean KL(baseline || optimized) of the next-token "
      "distributions, teacher-forced on the baseline's prompt + output tokens.", LOWER,
      GATE_SRC, GATE),
    E("gate.max_kl", "nats/token", "The largest per-position KL of `gate.mean_kl`.", LOWER,
      GATE_SRC, GATE),
    E("gate.ppl_delta", "relative", "`(optimized - baseline) / baseline` perplexity of the "
      "baseline's tokens (or of each job's own outputs where no KL was measured); near 0 "
      "is what the gate wants.", NEUTRAL, GATE_SRC, GATE),
    E("gate.speedup", "x", "Optimized `output_tokens_per_s` / the baseline's.", HIGHER,
      GATE_SRC, GATE),
    E("gate.verdict_code", "code", "The verdict as a number: 0 equivalent, 1 numerics, "
      "2 degraded, 3 unverified (also the tag `gate_verdict`).", NEUTRAL, GATE_SRC, GATE),
    E("gate.ref_<name>", "the metric's", "Optimized minus baseline of each `ref_*` task "
      "metric both jobs have.", HIGHER, GATE_SRC, GATE),
    # ------------------------------------------------------------------ machine and roofline
    E("roofline_tokens_per_s", "tok/s", "The machine's limit for this model and batch: the "
      "smaller of `batch x bandwidth / (parameters x bytes per parameter)` and `matmul "
      "FLOP/s / (2 x parameters)`.", NEUTRAL, ROOF, MACHINE),
    E("roofline_share", "0-1", "`output_tokens_per_s / roofline_tokens_per_s`.", HIGHER,
      ROOF, MACHINE),
    E("roofline_bytes_per_parameter", "bytes", "Bytes per parameter the roofline used (the "
      "loaded model's, for quantized weights, else the dtype's width).", NEUTRAL, ROOF,
      MACHINE),
    E("machine_bandwidth_gb_per_s", "GB/s", "The machine's memory read bandwidth: a large "
      "tensor summed, best of the runs.", NEUTRAL, f"{ROOF}, pipeline/measure/machine_rates.py",
      MACHINE),
    E("machine_bandwidth_gb_per_s_median", "GB/s", "The median of the bandwidth runs.",
      NEUTRAL, f"{ROOF}, pipeline/measure/machine_rates.py", MACHINE),
    E("machine_bandwidth_runs", "runs", "Bandwidth runs taken (up to 100 in 1 s).", NEUTRAL,
      f"{ROOF}, pipeline/measure/machine_rates.py", MACHINE),
    E("machine_matmul_gflops", "GFLOP/s", "The machine's matmul rate: the better of the "
      "job's dtype and float32.", NEUTRAL, f"{ROOF}, pipeline/measure/machine_rates.py",
      MACHINE),
    E("machine_rates_busy", "0/1", "1 when a rate was read on a busy machine (the share is "
      "then too high; the reading is not cached).", LOWER,
      f"{ROOF}, pipeline/measure/machine_rates.py", MACHINE),
    E("machine_rates_measured_at", "epoch s", "When the bandwidth was measured.", NEUTRAL,
      f"{ROOF}, pipeline/measure/machine_rates.py", MACHINE),
    E("machine_rates_load_avg_1m", "load", "The 1-minute load average when the bandwidth "
      "was measured.", LOWER, f"{ROOF}, pipeline/measure/machine_rates.py", MACHINE),
    E("machine_rates_others_cpu_share", "0-1", "Other processes' share of the machine's "
      "CPU time while measuring (the larger of bandwidth's and matmul's).", LOWER,
      f"{ROOF}, pipeline/measure/machine_rates.py", MACHINE),
    E("machine_rates_own_cpu_share", "0-1", "The measuring process's share of its threads' "
      "wall time (the smaller of bandwidth's and matmul's).", HIGHER,
      f"{ROOF}, pipeline/measure/machine_rates.py", MACHINE),
    # ------------------------------------------------------------------ cost and energy
    E("usd_per_million_output_tokens", "USD/Mtok", "`cost.usd_per_hour` (else the `+target`'s "
      "list price) / (3600 x `output_tokens_per_s`) x 1e6.", LOWER, "pipeline/metrics/cost.py",
      COST),
    E("usd_per_million_output_tokens_at_slo", "USD/Mtok", "Load profile: the same at the "
      "output tok/s of the point behind `max_rate_under_slo`.", LOWER, f"{JOB}, cost", COST),
    E("energy_j", "J", "The device's energy over the measured phase: NVML on CUDA, RAPL "
      "packages on a CPU (param `energy_source`); absent where unreadable.", LOWER, JOB, COST),
    E("joules_per_output_token", "J/tok", "`energy_j` / output tokens.", LOWER, JOB, COST),
    E("avg_power_w", "W", "`energy_j` / the wall time it was read over.", NEUTRAL, JOB, COST),
    # ------------------------------------------------------------------ sweep parent run
    E("jobs_total", "jobs", "Jobs of the sweep.", NEUTRAL, SWEEP, PARENT),
    E("jobs_failed", "jobs", "Jobs that failed (the parent is then FAILED).", LOWER, SWEEP,
      PARENT),
    E("jobs_skipped", "jobs", "Jobs `resume=true` skipped (already FINISHED).", NEUTRAL,
      SWEEP, PARENT),
    E("sweep_wall_s", "s", "Wall time of the sweep.", LOWER, SWEEP, PARENT),
    E("sweep_generate_share", "0-1", "Measured generation (`time_generate_s` of the "
      "finished jobs) / the sweep's wall time.", HIGHER, SWEEP, PARENT),
    E("sweep_engine_starts", "engines", "vLLM jobs: engines or servers started (the others "
      "reused one).", LOWER, SWEEP, PARENT),
    E("job<N>.<headline>", "the metric's", "Job N's headline metrics, copied from its run.",
      NEUTRAL, SWEEP, PARENT),
    E("parity_exact_match_rate", "0-1", "Jobs differing only in backend: share of prompts "
      "token-identical, pooled over the deterministic pairs.", HIGHER,
      "pipeline/analysis/parity.py, sweep end", PARENT),
    E("parity.pair<N>.exact_match_rate", "0-1", "The same, for pair N of parity.json.",
      HIGHER, "pipeline/analysis/parity.py, sweep end", PARENT),
    E("gate.job<N>.<figure>", "the figure's", "Job N's `gate.*` figures (the gate group "
      "above), its `gate.ref_<name>` deltas included.", NEUTRAL, GATE_SRC, PARENT),
    E("search.trials_<complete|failed|infeasible>", "trials", "A search "
      "(`hydra/sweeper=optuna`): its trials that completed, failed (the job failed or "
      "lacked a searched metric), or completed but broke a `search.constraints` bound.",
      NEUTRAL, SEARCH, PARENT),
    E("search.best.<name>", "the metric's", "A single-objective search: the best feasible "
      "trial's value of the objective metric `<name>` (its params: `search.best.<key>`).",
      NEUTRAL, SEARCH, PARENT),
)
