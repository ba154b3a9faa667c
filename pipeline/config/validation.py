"""Validation of a composed config: unknown keys, types, ranges and choices.

:func:`validate` runs before anything heavy is imported or loaded; every error names the
key, the bad value and what is allowed. Nothing here touches the disk except checking that
a named file exists and reading a trace file (``workload.source=trace``: each line checked).
"""

from __future__ import annotations

import math
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config.schemas import (
    CHAT_TEMPLATE_CHOICES,
    DEVICES,
    DTYPES,
    MODEL_SOURCES,
    TARGET_DEVICES,
    WEIGHTS,
    Config,
    DecodingConfig,
    ModelConfig,
    SearchConfig,
)
from pipeline.config.workload_schema import ARRIVALS, WorkloadConfig
from pipeline.errors import ConfigError


def fail(key: str, value: Any, allowed: str) -> None:
    """Raise the one-line error every bad value gets: key, value, what is allowed."""
    raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        fail(key, value, f"allowed values are {', '.join(choices)}")


def check_range(
    key: str,
    value: float | int | None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    optional: bool = False,
) -> None:
    """``value`` must be a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``);
    ``None`` passes only when ``optional``."""
    if value is None:
        if not optional:
            fail(key, value, "a value is required")
        return
    if isinstance(value, float) and not math.isfinite(value):
        fail(key, value, "must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        fail(key, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        fail(key, value, f"must be <= {hi}")


def validate_decoding(d: DecodingConfig, prefix: str = "decoding") -> None:
    """Range checks for a decoding spec (shared by every backend)."""
    check_range(f"{prefix}.temperature", d.temperature, 0.0)
    if d.do_sample and d.temperature == 0:
        fail(f"{prefix}.temperature", d.temperature,
              "must be > 0 when do_sample=true (use decoding=greedy for temperature 0)")
    check_range(f"{prefix}.top_k", d.top_k, 0)
    check_range(f"{prefix}.top_p", d.top_p, 0.0, 1.0, lo_open=True)
    check_range(f"{prefix}.num_beams", d.num_beams, 1)
    check_range(f"{prefix}.repetition_penalty", d.repetition_penalty, 0.0, lo_open=True)
    check_range(f"{prefix}.no_repeat_ngram_size", d.no_repeat_ngram_size, 0)
    check_range(f"{prefix}.length_penalty", d.length_penalty)
    if not d.do_sample:
        # Greedy and plain beam search ignore the sampling filters: accepting them would
        # drop them silently on every engine.
        for key, value, neutral in (("temperature", d.temperature, 1.0),
                                    ("top_k", d.top_k, 0), ("top_p", d.top_p, 1.0)):
            if value != neutral:
                fail(f"{prefix}.{key}", value,
                     f"only applies when sampling; set {prefix}.do_sample=true (e.g. "
                     f"decoding=temperature/topk/topp) or leave it at {neutral}")


PROFILES = ("fixed", "sweep", "slo_search", "ramp", "trace")


def _validate_profile(w: WorkloadConfig) -> None:
    """The load-profile keys (pipeline/workload/profiles.py plans the points)."""
    check_choice("workload.profile", w.profile, PROFILES)
    if w.profile == "trace" and w.source != "trace":
        fail("workload.profile", w.profile, "needs workload.source=trace (its send times "
             "come from workload.trace_file)")
    from pipeline.metrics.performance import SLO_DIALECTS

    check_choice("workload.slo_dialect", w.slo_dialect, SLO_DIALECTS)
    check_range("workload.sweep_points", w.sweep_points, 1, 100)
    check_range("workload.point_requests", w.point_requests, 1, optional=True)
    check_range("workload.point_duration_s", w.point_duration_s, 0.0, lo_open=True,
                optional=True)
    check_range("workload.slo_percentile", w.slo_percentile, 0.0, 100.0, lo_open=True)
    check_range("workload.search_tolerance", w.search_tolerance, 0.0, 1.0, lo_open=True)
    check_range("workload.max_points", w.max_points, 3, 100)
    for key in ("ramp_start_rate", "ramp_end_rate"):
        check_range(f"workload.{key}", getattr(w, key), 0.0, lo_open=True, optional=True)
    check_range("workload.saturation_rate_ratio", w.saturation_rate_ratio, 0.0, 1.0,
                lo_open=True)
    check_range("workload.saturation_ttft_growth", w.saturation_ttft_growth, 1.0,
                lo_open=True)
    check_range("workload.point_grace_s", w.point_grace_s, 0.0)
    check_range("workload.max_dispatch_lag_ms", w.max_dispatch_lag_ms, 0.0, lo_open=True)
    check_range("workload.max_client_cpu_percent", w.max_client_cpu_percent, 0.0,
                lo_open=True)
    if w.profile == "slo_search" and all(
            getattr(w, k) is None for k in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2el_ms")):
        fail("workload.profile", w.profile, "slo_search needs at least one of "
             "workload.slo_ttft_ms, slo_tpot_ms, slo_e2el_ms")
    if w.profile == "ramp":
        if w.ramp_end_rate is None:
            fail("workload.ramp_end_rate", None, "profile=ramp needs the last point's rate "
                 "(requests/s)")
        if w.ramp_start_rate is not None and w.ramp_start_rate > w.ramp_end_rate:
            fail("workload.ramp_start_rate", w.ramp_start_rate,
                 f"must be <= workload.ramp_end_rate={w.ramp_end_rate}")


def validate_workload(w: WorkloadConfig) -> None:
    """Range checks and prompt-source checks (existence only; contents are read later)."""
    check_range("workload.batch_size", w.batch_size, 1)
    check_range("workload.max_new_tokens", w.max_new_tokens, 1, 1_000_000)
    check_range("workload.num_prompts", w.num_prompts, 1, optional=True)
    check_range("workload.warmup", w.warmup, 0)
    check_range("workload.repeats", w.repeats, 1, 1000)
    check_range("workload.max_prompt_chars", w.max_prompt_chars, 1)
    check_range("workload.max_file_bytes", w.max_file_bytes, 1)
    check_range("workload.concurrency", w.concurrency, 1, optional=True)
    check_range("workload.request_rate", w.request_rate, 0.0, lo_open=True, optional=True)
    check_choice("workload.arrival", w.arrival, ARRIVALS)
    check_range("workload.burstiness", w.burstiness, 0.0, lo_open=True)
    check_range("workload.request_timeout_s", w.request_timeout_s, 0.0, lo_open=True)
    for slo in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2el_ms"):
        check_range(f"workload.{slo}", getattr(w, slo), 0.0, lo_open=True, optional=True)
    _validate_profile(w)
    # local: the workload package imports this module, and these names are its own
    from pipeline.workload.files import path_problem
    from pipeline.workload.lengths import LENGTH_DISTS, length_bounds

    check_choice("workload.source", w.source,
                 ("prompts", "synthetic", "trace", "conversations"))
    check_choice("workload.on_too_long", w.on_too_long, ("truncate", "refuse"))
    check_range("workload.max_input_tokens", w.max_input_tokens, 1, optional=True)
    for side, mean_key in (("input", "input_tokens"), ("output", "max_new_tokens")):
        dist = getattr(w, f"{side}_dist")
        check_choice(f"workload.{side}_dist", dist, LENGTH_DISTS)
        check_range(f"workload.{mean_key}", getattr(w, mean_key), 1, 1_000_000)
        if dist == "fixed":
            continue
        lo, hi = getattr(w, f"{side}_min"), getattr(w, f"{side}_max")
        check_range(f"workload.{side}_min", lo, 1)  # required: the bounds clip every draw
        check_range(f"workload.{side}_max", hi, lo)
        if dist != "uniform":
            check_range(f"workload.{side}_std", getattr(w, f"{side}_std"), 0.0, lo_open=True)
    p_tokens = w.shared_prefix_tokens
    check_range("workload.shared_prefix_tokens", p_tokens, 0)
    check_range("workload.prefix_groups", w.prefix_groups, 1)
    if w.source == "synthetic":
        if w.num_prompts is None:
            fail("workload.num_prompts", None, "source=synthetic needs the number of prompts")
        shortest, longest = length_bounds(w.input_dist, w.input_tokens, w.input_min,
                                          w.input_max)
        in_key = "workload.input_tokens" if w.input_dist == "fixed" else "workload.input_min"
        if p_tokens and shortest <= p_tokens:
            fail("workload.shared_prefix_tokens", p_tokens,
                 f"must be below the shortest input ({in_key}={shortest}): each request "
                 f"needs tokens of its own after the prefix")
        if w.prefix_groups > w.num_prompts:
            fail("workload.prefix_groups", w.prefix_groups,
                 f"must be <= workload.num_prompts={w.num_prompts}")
        if w.max_input_tokens is not None and longest > w.max_input_tokens:
            fail("workload.max_input_tokens", w.max_input_tokens,
                 f"is below the longest synthetic input ({longest} tokens)")
        return
    if w.source == "conversations":
        from pipeline.workload.conversations import validate_conversations

        validate_conversations(w)  # reads the file: refusals name the line and field
        return
    if p_tokens or w.prefix_groups > 1:
        key = "shared_prefix_tokens" if p_tokens else "prefix_groups"
        fail(f"workload.{key}", getattr(w, key), "shared prefixes need workload.source=synthetic")
    if w.source == "trace":
        from pipeline.workload.trace import validate_trace

        validate_trace(w)  # reads the file: every refusal names its line
        return
    if w.prompts_file:
        problem = path_problem(w.prompts_file)
        if problem:
            fail("workload.prompts_file", w.prompts_file, problem)
    elif not w.prompts:
        fail("workload.prompts", [], "give inline prompts or workload.prompts_file")


def validate_search(s: SearchConfig, reference_run: Any = "") -> None:
    """The search section (``hydra/sweeper=optuna``): metric names a job logs (rows of the
    metric catalog, pattern rows included), directions, bounds, verdicts, ``rerun_best``.
    ``reference_run`` (the sweeper passes ``scoring.reference_run``; left out, not checked):
    a verdict constraint needs that fixed baseline."""
    from pipeline.analysis.gate_rules import VERDICTS
    from pipeline.config.schemas import SEARCH_DIRECTIONS
    from pipeline.metrics.catalog import entry_for

    def known(key: str, name: Any) -> None:
        if not isinstance(name, str) or entry_for(name) is None:
            fail(key, name, "not a metric name of the catalog (docs/metrics.md), e.g. "
                 "output_tokens_per_s, ttft_ms_p90, e2el_ms_mean, peak_rss_bytes")

    if not s.objectives:
        fail("search.objectives", [], "name at least one {metric: NAME, direction: "
             "maximize|minimize}")
    for i, o in enumerate(s.objectives):
        known(f"search.objectives[{i}].metric", o.metric)
        check_choice(f"search.objectives[{i}].direction", o.direction, SEARCH_DIRECTIONS)
    for i, c in enumerate(s.constraints):
        key = f"search.constraints[{i}]"
        if c.gate_verdict_not is not None:
            check_choice(f"{key}.gate_verdict_not", c.gate_verdict_not, VERDICTS)
            if c.metric is not None or c.max is not None or c.min is not None:
                fail(f"{key}.metric", c.metric, "a constraint is either a metric bound or "
                     "{gate_verdict_not: VERDICT}: give them as two constraints")
            if reference_run is None:
                fail("scoring.reference_run", None, f"{key}.gate_verdict_not needs a fixed "
                     "baseline: a job number of the sweep or an MLflow run id")
            continue
        known(f"{key}.metric", c.metric)
        if c.max is None and c.min is None:
            fail(f"{key}.max", None, f"give max and/or min for metric {c.metric}")
        check_range(f"{key}.max", c.max, optional=True)
        check_range(f"{key}.min", c.min, optional=True)
        if c.max is not None and c.min is not None and c.min > c.max:
            fail(f"{key}.min", c.min, f"must be <= {key}.max={c.max}")
    if s.rerun_best != 0 and (isinstance(s.rerun_best, bool) or not isinstance(
            s.rerun_best, int) or s.rerun_best < 2):
        fail("search.rerun_best", s.rerun_best, "use 0 (off) or a repeat count >= 2 (a "
             "confidence interval needs two repeats)")
    if s.rerun_best and len(s.objectives) > 1:
        fail("search.rerun_best", s.rerun_best, f"{len(s.objectives)} objectives have a "
             "Pareto front, not one best trial to rerun: use 0 with several objectives")


def validate_model(m: ModelConfig, stand_in: bool = False) -> None:
    """Choice checks; a local model path must exist (hub ids have no '/' prefix or './').
    ``stand_in``: a CUDA ``+target`` stands in for the device (a dry run), so no local GPU
    is needed."""
    check_choice("model.source", m.source, MODEL_SOURCES)
    check_choice("model.dtype", m.dtype, DTYPES)
    check_choice("model.device", m.device, DEVICES)
    check_choice("model.weights", m.weights, WEIGHTS)
    # yaml's true/false arrive as "True"/"False" in the str field
    m.use_chat_template = str(m.use_chat_template).lower()
    check_choice("model.use_chat_template", m.use_chat_template, CHAT_TEMPLATE_CHOICES)
    if m.device == "cuda" and not stand_in:
        from pipeline.devices import cuda_present

        if not cuda_present():
            fail("model.device", m.device, "no CUDA device is visible on this machine; use "
                 "model.device=cpu or auto")
    if m.source == "packaged":
        if not (m.gguf_package and m.gguf_file):
            fail("model.gguf_file", m.gguf_file,
                 "source=packaged needs model.gguf_package and model.gguf_file")
        if m.path:
            # The packaged model would run instead of the user's own: refuse, with the fix.
            fail("model.path", m.path, f"model={m.name} is the packaged model and takes no "
                 f"path; to run your own weights use model=hf model.path={m.path}")
    else:
        if not m.path:
            fail("model.path", m.path, "source=hf needs a local folder or a hub id")
        if looks_local(m.path) and not Path(m.path).expanduser().exists():
            fail("model.path", m.path, "no such folder")


def looks_local(path: str) -> bool:
    """A hub id is ``org/name``; anything else (absolute, ./, ~, existing) is a folder."""
    p = Path(path).expanduser()
    return path.startswith((".", "/", "~")) or p.exists() or path.count("/") != 1


def _refuse_unknown_keys(node: Any, schema: type, prefix: str) -> None:
    """Keys a schema does not have are refused, naming the allowed ones: a typo such as
    ``+decoding.temprature=0.3`` would otherwise run with the default silently."""
    if not isinstance(node, dict):
        return
    hints = typing.get_type_hints(schema)
    allowed = [f.name for f in fields(schema)]
    for key, value in node.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in allowed:
            fail(full, value, f"unknown key; allowed keys are {', '.join(sorted(allowed))}")
        sub = hints.get(key)
        if isinstance(sub, type) and hasattr(sub, "__dataclass_fields__"):
            _refuse_unknown_keys(value, sub, full)


def _typed(schema: type, node: dict[str, Any], prefix: str) -> Any:
    """``node`` as an instance of the dataclass ``schema``; wrong types are ConfigErrors."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except Exception as e:  # omegaconf raises several error types; all mean bad config
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        full = ".".join(k for k in (prefix, str(key)) if k)
        raise ConfigError(f"{full or 'config'} is invalid: {msg}") from e


def validate(cfg: DictConfig) -> Config:
    """Turn the composed config into typed objects and check every key, range and choice.

    ``backend.impl`` names the backend class; its ``config_class`` types ``backend.*`` and
    its ``validate_settings`` checks them. Raises :class:`ConfigError` with a one-line
    message; imports no engine, no torch.
    """
    from pipeline.backends import backend_class

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # a broken interpolation
        raise ConfigError(f"invalid config: {e}".splitlines()[0]) from e
    assert isinstance(resolved, dict)
    _refuse_unknown_keys({k: v for k, v in resolved.items() if k != "backend"}, Config, "")
    backend_node = resolved.get("backend")
    if not isinstance(backend_node, dict):
        fail("backend", backend_node, "choose one of the yamls in conf/backend/")
    cls = backend_class(backend_node.get("impl"))
    _refuse_unknown_keys(backend_node, cls.config_class, "backend")
    backend = _typed(cls.config_class, backend_node, "backend")
    typed: Config = _typed(Config, {**resolved, "backend": None}, "")
    typed.backend = backend
    t = typed.target
    if t is not None:
        check_choice("target.device", t.device, TARGET_DEVICES)
        check_range("target.memory_gib", t.memory_gib, 0.0, lo_open=True, optional=True)
        check_range("target.usd_per_hour_list", t.usd_per_hour_list, 0.0, lo_open=True,
                    optional=True)
        from pipeline.hardware import parse_capability

        parse_capability(t.compute_capability, t.device)  # "7.5"; refused in one line
    validate_model(typed.model, stand_in=bool(t and t.device == "cuda" and typed.dry_run))
    cls.validate_settings(typed.backend)
    validate_decoding(typed.decoding)
    validate_workload(typed.workload)
    if typed.workload.source == "trace":
        from pipeline.workload.trace import check_trace_job

        check_trace_job(typed, bool(cls.online))
    if typed.workload.source == "conversations":
        from pipeline.workload.conversations import check_conversation_job

        check_conversation_job(typed, bool(cls.online))
    check_range("seed", typed.seed, 0)
    check_choice("scoring.scorer_dtype", typed.scoring.scorer_dtype, DTYPES)
    check_range("scoring.self_bleu_max_samples", typed.scoring.self_bleu_max_samples, 2,
                optional=True)
    check_range("scoring.batch_size", typed.scoring.batch_size, 1)
    from pipeline.metrics.reference import check_names, resolve_metrics

    check_names(resolve_metrics(typed.scoring, typed.workload.name))
    check_range("measure.rss_sample_interval_s", typed.measure.rss_sample_interval_s, 0.0,
                lo_open=True)
    check_range("cost.usd_per_hour", typed.cost.usd_per_hour, 0.0, lo_open=True,
                optional=True)
    if typed.cost.price_source is not None and typed.cost.usd_per_hour is None:
        fail("cost.price_source", typed.cost.price_source, "describes cost.usd_per_hour, "
             "which is null: set cost.usd_per_hour too (or leave price_source null)")
    validate_search(typed.search)
    return typed
