"""The rows of the metric catalog: every metric the pipeline logs, as data.

Each :class:`Entry` names a metric as it is logged (in a job's MLflow run and its
results.json ``metrics``, or on a sweep's parent run), or a family of them as a pattern:
``<stat>``, ``<phase>``, ``<name>``, ``<N>``, ``<headline>`` and ``<figure>`` are the
placeholders of :data:`pipeline.metrics.catalog.PLACEHOLDERS`, and ``<a|b>`` is one of the
words listed. :mod:`pipeline.metrics.catalog` matches keys against these rows and writes
docs/metrics.md from them. The rows of load points, the gate, the machine, cost and the
sweep's parent run are in :mod:`pipeline.metrics.catalog_entries_runs` (one file would be
over the length the architecture test allows).
"""

from __future__ import annotations

from dataclasses import dataclass

LOWER, HIGHER, NEUTRAL = "lower", "higher", "neutral"

# the groups, in the order docs/metrics.md lists them
LATENCY = "latency"
THROUGHPUT = "throughput"
MEMORY = "memory"
QUALITY = "quality"
SPECULATIVE = "speculative decoding"
PHASES = "phases and start-up"
SERVING = "serving points"
GATE = "gate"
MACHINE = "machine and roofline"
COST = "cost and energy"
PARENT = "sweep parent run"
GROUPS = (LATENCY, THROUGHPUT, MEMORY, QUALITY, SPECULATIVE, PHASES, SERVING, GATE, MACHINE,
          COST, PARENT)

JOB = "pipeline/job_measure.py, measured phase"
PERF = "pipeline/metrics/performance.py"
POINTS = "pipeline/serving/points.py"
PROFILE = "pipeline/serving/points.py, summary of a load profile"
ENGINE_SCRAPE = "pipeline/serving/engine_metrics.py, the engine's Prometheus /metrics"
ROOF = "pipeline/measure/roofline.py"
GATE_SRC = "pipeline/analysis/gate.py, sweep end"
SWEEP = "pipeline/tracking/sweep.py, sweep end"
SEARCH = "pipeline/analysis/search.py, search end"


@dataclass(frozen=True)
class Entry:
    """One catalog row: ``name`` as logged (or a pattern), the unit of the logged value,
    what it measures, which direction is better (``lower``, ``higher`` or ``neutral``),
    where it comes from (module, phase) and its group in docs/metrics.md."""

    name: str
    unit: str
    definition: str
    direction: str
    source: str
    group: str


E = Entry

#: the rows of what one job measures on its own (the load, sweep and search rows are in
#: :mod:`pipeline.metrics.catalog_entries_runs`; :data:`pipeline.metrics.catalog.ENTRIES`
#: is both)
JOB_ENTRIES: tuple[Entry, ...] = (
    # ------------------------------------------------------------------ latency
    E("ttft_ms_<stat>", "ms", "Time to first token, `t_first_token - t_start`, over the "
      "successful requests of every repeat.", LOWER, f"{PERF}: latency_metrics", LATENCY),
    E("tpot_ms_<stat>", "ms", "Time per output token after the first, `(E2EL - TTFT) / "
      "(N_out - 1)`, per request with `N_out > 1` (every request weighs the same).", LOWER,
      f"{PERF}: latency_metrics", LATENCY),
    E("itl_ms_<stat>", "ms", "Inter-token latency: the gaps between consecutive output "
      "tokens (or stream chunks) of a request, pooled over requests (every gap weighs the "
      "same). Absent when the backend gives no per-token times.", LOWER,
      f"{PERF}: latency_metrics", LATENCY),
    E("e2el_ms_<stat>", "ms", "End-to-end latency, `t_end - t_start` (offline: when "
      "`generate` returns the batch).", LOWER, f"{PERF}: latency_metrics", LATENCY),
    E("prefill_s_mean", "s", "Offline batches: mean over batches of the delay from the "
      "batch's start to its first token.", LOWER, f"{PERF}: batch_phase_metrics", LATENCY),
    # ------------------------------------------------------------------ throughput
    E("output_tokens_per_s", "tok/s", "Output tokens of the successful requests / wall "
      "time of the measured phase (all repeats). With a load profile: the highest of its "
      "valid points (the throughput ceiling).", HIGHER,
      f"{PERF}: throughput_metrics; {PROFILE}", THROUGHPUT),
    E("output_tokens_per_s_repeat_mean", "tok/s", "With `workload.repeats` > 1: the mean "
      "over repeats of each repeat's output tokens/s.", HIGHER, JOB, THROUGHPUT),
    E("output_tokens_per_s_ci95", "tok/s", "With `workload.repeats` > 1: half-width of "
      "the 95% Student-t interval of `output_tokens_per_s_repeat_mean`. The only `*_ci95` "
      "metric.", LOWER, f"{JOB} ({PERF}: mean_ci95)", THROUGHPUT),
    E("requests_per_s", "req/s", "Successful requests / wall time of the measured phase. "
      "With a load profile: the highest achieved rate of its valid points.", HIGHER,
      f"{PERF}: throughput_metrics; {PROFILE}", THROUGHPUT),
    E("decode_tokens_per_s", "tok/s", "Offline batches: tokens after each request's first "
      "/ time from each batch's first token to its last end, summed over batches.", HIGHER,
      f"{PERF}: batch_phase_metrics", THROUGHPUT),
    E("goodput_requests_per_s", "req/s", "Requests that succeeded and met every configured "
      "SLO (`workload.slo_ttft_ms`, `slo_tpot_ms`, `slo_e2el_ms`) / wall time. Only with "
      "an SLO set.", HIGHER, f"{PERF}: goodput", THROUGHPUT),
    E("goodput_fraction", "0-1", "Requests that met every configured SLO / all requests. "
      "Only with an SLO set.", HIGHER, f"{PERF}: goodput", THROUGHPUT),
    E("total_output_tokens", "tokens", "Output tokens of the successful requests, all "
      "repeats.", NEUTRAL, f"{PERF}: throughput_metrics", THROUGHPUT),
    E("total_prompt_tokens", "tokens", "Prompt tokens of the successful requests, all "
      "repeats.", NEUTRAL, f"{PERF}: throughput_metrics", THROUGHPUT),
    E("num_requests", "requests", "Requests sent, all repeats (with a load profile: over "
      "all its points).", NEUTRAL, f"{PERF}: throughput_metrics; {PROFILE}", THROUGHPUT),
    E("num_failed", "requests", "Requests that failed (with a load profile: errors over "
      "all its points).", LOWER, f"{PERF}: throughput_metrics; {PROFILE}", THROUGHPUT),
    E("error_rate", "0-1", "`num_failed / num_requests`.", LOWER,
      f"{PERF}: throughput_metrics", THROUGHPUT),
    E("peak_concurrency", "requests", "Online backends: the most requests in flight at once "
      "(failed ones included; with a load profile: the most of any point).", NEUTRAL,
      f"{PERF}: peak_concurrency", THROUGHPUT),
    E("measured_wall_s", "s", "Wall time of the measured phase: every repeat's generation "
      "(with a load profile: all its points).", NEUTRAL, f"{JOB}; pipeline/serving/runner.py",
      THROUGHPUT),
    E("conversations", "conversations", "`workload.source=conversations`: conversations "
      "run.", NEUTRAL, f"{JOB}, measure_conversations", THROUGHPUT),
    E("conversation_turns_completed", "turns", "`workload.source=conversations`: turns "
      "answered without error, all conversations (a failed turn ends its conversation).",
      HIGHER, f"{JOB}, measure_conversations", THROUGHPUT),
    E("engine_kv_cache_usage_max", "0-1", "`workload.source=conversations`, vLLM: the "
      "highest KV-cache usage seen on its /metrics during the conversations.", NEUTRAL,
      ENGINE_SCRAPE, THROUGHPUT),
    E("engine_requests_<waiting|running>_max", "requests", "`workload.source=conversations`, "
      "vLLM: the most requests waiting / running in the engine during the conversations.",
      NEUTRAL, ENGINE_SCRAPE, THROUGHPUT),
    E("engine_preemptions", "preemptions", "`workload.source=conversations`, vLLM: requests "
      "preempted during the conversations.", LOWER, ENGINE_SCRAPE, THROUGHPUT),
    E("engine_prefix_cache_hit_rate", "0-1", "`workload.source=conversations`, vLLM: "
      "prefix-cache hits / queries during the conversations (each turn's history is the "
      "previous turn's prompt and answer).", HIGHER, ENGINE_SCRAPE, THROUGHPUT),
    # ------------------------------------------------------------------ memory
    E("peak_rss_bytes", "bytes", "Peak resident memory during the measured phase, this "
      "process and its children (vLLM's engine): the kernel's per-process high-water mark, "
      "reset when the phase starts and summed over processes when it ends.", LOWER,
      "pipeline/measure/memory.py: PeakRSSSampler", MEMORY),
    E("peak_rss_sampled", "0/1", "1 when the kernel refused the high-water-mark reset and "
      "`peak_rss_bytes` was sampled instead (every `measure.rss_sample_interval_s`).",
      NEUTRAL, "pipeline/measure/memory.py: PeakRSSSampler", MEMORY),
    E("peak_rss_above_load_bytes", "bytes", "`peak_rss_bytes` minus the resident memory "
      "with the model loaded, after the warm-up and a heap trim: what generation (KV cache, "
      "activations) needed beyond the weights.", LOWER, "pipeline/measure/memory.py: above_load",
      MEMORY),
    E("cuda_max_allocated_bytes", "bytes", "On CUDA: torch's peak allocated bytes over the "
      "measured phase (peaks reset when it starts).", LOWER,
      "pipeline/measure/memory.py: cuda_peaks", MEMORY),
    E("cuda_max_reserved_bytes", "bytes", "On CUDA: torch's peak reserved (cached by its "
      "allocator) bytes over the measured phase.", LOWER,
      "pipeline/measure/memory.py: cuda_peaks", MEMORY),
    E("cuda_max_allocated_above_load_bytes", "bytes", "On CUDA: `cuda_max_allocated_bytes` "
      "minus the bytes allocated with the model loaded, after the warm-up.", LOWER,
      "pipeline/measure/memory.py: above_load", MEMORY),
    E("nvml_used_bytes", "bytes", "On CUDA with pynvml: device memory in use (all "
      "processes) at the end of the measured phase, as NVML reports it.", LOWER,
      "pipeline/measure/memory.py: cuda_peaks", MEMORY),
    E("kv_cache_blocks", "blocks", "vLLM: KV-cache blocks the engine allocated.", NEUTRAL,
      "pipeline/backends/vllm/ (the engine's config, or the server's /metrics)", MEMORY),
    E("kv_cache_tokens", "tokens", "vLLM: KV-cache capacity in tokens (blocks x block "
      "size); llamacpp: the server's context (``backend.n_ctx``, one pool for all slots).",
      NEUTRAL, "pipeline/backends/vllm/ (the engine's config, or the server's /metrics); "
      "pipeline/backends/llamacpp/ (the server's /v1/models)", MEMORY),
    # ------------------------------------------------------------------ quality
    E("perplexity", "", "`exp(sum nll / sum tokens)` over the continuation tokens only "
      "(prompt labels masked) under the scorer model (default: the generating weights).",
      LOWER, "pipeline/metrics/quality.py, scoring phase", QUALITY),
    E("perplexity_seq_mean", "", "Mean over generations of each one's own perplexity (shows "
      "the spread that the pooled `perplexity` hides).", LOWER,
      "pipeline/metrics/quality.py, scoring phase", QUALITY),
    E("perplexity_tokens", "tokens", "Continuation tokens scored for `perplexity`.",
      NEUTRAL, "pipeline/metrics/quality.py, scoring phase", QUALITY),
    E("self_bleu", "0-1", "Mean over generations of sacrebleu sentence BLEU against all the "
      "others (self excluded; 13a tokenizer, exp smoothing, orders 1-4), scaled to 0-1: "
      "how alike the generations are.", LOWER, "pipeline/metrics/diversity.py, scoring phase",
      QUALITY),
    E("self_bleu_n", "generations", "Generations `self_bleu` was computed over (a sample "
      "of at most `scoring.self_bleu_max_samples`).", NEUTRAL,
      "pipeline/metrics/diversity.py, scoring phase", QUALITY),
    E("distinct_<1|2>", "0-1", "Unique n-grams / all n-grams (n = 1, 2), pooled over the "
      "generations (lower-cased 13a words).", HIGHER,
      "pipeline/metrics/diversity.py, scoring phase", QUALITY),
    E("rep_<2|4>", "0-1", "Per generation `1 - unique/total` n-grams (n = 2, 4), averaged: "
      "repetition within a generation.", LOWER, "pipeline/metrics/diversity.py, scoring phase",
      QUALITY),
    E("ref_exact_match", "0-1", "Against each request's reference "
      "(`scoring.reference_metrics`): SQuAD-normalized exact match, mean over requests.",
      HIGHER, "pipeline/metrics/reference.py, scoring phase", QUALITY),
    E("ref_f1", "0-1", "SQuAD-normalized token F1 against the reference, mean over "
      "requests.", HIGHER, "pipeline/metrics/reference.py, scoring phase", QUALITY),
    E("ref_bleu", "0-100", "sacrebleu corpus BLEU (13a) against the references.", HIGHER,
      "pipeline/metrics/reference.py, scoring phase", QUALITY),
    E("ref_chrf", "0-100", "sacrebleu chrF (character 6-grams, beta 2) against the "
      "references.", HIGHER, "pipeline/metrics/reference.py, scoring phase", QUALITY),
    E("ref_rougeL", "0-1", "ROUGE-L F-measure (LCS over lower-cased alphanumeric tokens, no "
      "stemming), mean over requests.", HIGHER, "pipeline/metrics/reference.py, scoring phase",
      QUALITY),
    E("ref_pass_at_1", "0-1", "Share of generations whose extracted code passes the task's "
      "unit tests in the sandbox (separate `python -I` process, time and memory limits).",
      HIGHER, "pipeline/metrics/reference.py, pipeline/metrics/code_exec.py, scoring phase",
      QUALITY),
    E("ref_scored_requests", "requests", "Requests scored against a reference (those whose "
      "request has one and that succeeded).", NEUTRAL,
      "pipeline/metrics/reference.py, scoring phase", QUALITY),
    E("ref_<name>", "the module's", "Any other `evaluate` module named in "
      "`scoring.reference_metrics`: its corpus score, logged as `ref_` + its name.", HIGHER,
      "pipeline/metrics/reference.py, scoring phase", QUALITY),
    # ------------------------------------------------------------------ speculative decoding
    E("spec_tokens_per_target_step", "tokens", "Generated tokens per target-model forward "
      "pass (1 = no gain, at most K + 1).", HIGHER,
      "pipeline/backends/hf/speculative.py, pipeline/backends/vllm/", SPECULATIVE),
    E("spec_acceptance_rate", "0-1", "Accepted draft tokens / proposed draft tokens.",
      HIGHER, "pipeline/backends/hf/speculative.py, pipeline/backends/vllm/", SPECULATIVE),
    E("spec_mean_accepted_tokens", "tokens", "Accepted draft tokens per verification pass.",
      HIGHER, "pipeline/backends/hf/speculative.py, pipeline/backends/vllm/", SPECULATIVE),
    E("spec_acceptance_rate_of_k", "0-1", "hf prompt lookup (fixed K = "
      "`backend.prompt_lookup_num_tokens`): `(spec_tokens_per_target_step - 1) / K`.",
      HIGHER, "pipeline/backends/hf/speculative.py", SPECULATIVE),
    E("spec_target_forward_passes", "passes", "hf: target-model forward passes of the "
      "measured phase.", NEUTRAL, "pipeline/backends/hf/speculative.py", SPECULATIVE),
    E("spec_proposed_tokens", "tokens", "Draft tokens proposed for verification.", NEUTRAL,
      "pipeline/backends/hf/speculative.py, pipeline/backends/vllm/", SPECULATIVE),
    E("spec_accepted_tokens", "tokens", "Draft tokens the target model accepted.", NEUTRAL,
      "pipeline/backends/hf/speculative.py, pipeline/backends/vllm/", SPECULATIVE),
    E("spec_drafts", "steps", "vLLM: verification steps that had draft candidates (from "
      "vLLM's counters, this job's difference).", NEUTRAL, "pipeline/backends/vllm/",
      SPECULATIVE),
    # ------------------------------------------------------------------ phases and start-up
    E("time_<phase>_s", "s", "Wall time of each phase of the job: model_prepare (requests, "
      "model folder, machine rates), load, warmup, generate (every repeat), scoring.",
      NEUTRAL, "pipeline/measure/timing.py: PhaseTimer, pipeline/job.py", PHASES),
    E("compile_s", "s", "hf with `compile=true`: wall time of this job's calls that "
      "compiled (each includes one generation; normally only the untimed warm-up).", LOWER,
      "pipeline/backends/hf/backend.py", PHASES),
    E("compiled_graphs", "graphs", "hf with `compile=true`: graphs torch.compile built for "
      "this job (0 when a cached model already had this shape).", NEUTRAL,
      "pipeline/backends/hf/backend.py", PHASES),
    E("compiled_graphs_after_warmup", "graphs", "hf with `compile=true`: graphs built "
      "inside the measured phase (should be 0; a warning is printed otherwise).", LOWER,
      "pipeline/backends/hf/backend.py", PHASES),
    E("compiled_graphs_from_disk", "graphs", "hf with `compile=true`: graphs inductor "
      "loaded from its on-disk cache (`backend.compile_cache_dir`).", NEUTRAL,
      "pipeline/backends/hf/backend.py", PHASES),
    E("engine_start_s", "s", "vllm: engine start-up time, when this job started the engine.",
      LOWER, "pipeline/backends/vllm/, backend=vllm", PHASES),
    E("engine_reused", "0/1", "vllm: 1 when the job reused an engine an earlier job of the "
      "process started.", NEUTRAL, "pipeline/backends/vllm/, backend=vllm", PHASES),
    E("server_start_s", "s", "vllm_server, llamacpp: server start-up time, when this job "
      "started it.", LOWER, "pipeline/backends/vllm/, backend=vllm_server or llamacpp",
      PHASES),
    E("server_reused", "0/1", "vllm_server, llamacpp: 1 when the job reused a running server "
      "of the sweep.", NEUTRAL, "pipeline/backends/vllm/, backend=vllm_server or llamacpp",
      PHASES),
)
