"""One vLLM OpenAI-compatible server process and the guarantees around it: starting it in
its own session, waiting for ``/health``, reading its log, stopping its whole process group
(:class:`VLLMServer`); the servers of this process (:data:`SERVERS`) and the signal
handlers that stop them.

``python -m vllm.entrypoints.openai.api_server`` runs as a child process in its own
session (process group), so that stopping it reaches its engine core and workers too, and
so that a Ctrl-C in the terminal reaches the pipeline first, which then stops the server
in order. A server never outlives the pipeline:
- every server in :data:`SERVERS` is stopped at the end of a sweep (the backend's
  ``shutdown_cached``), at interpreter exit (``atexit``, which also covers Ctrl-C), and on
  SIGTERM/SIGHUP;
- a server that is still starting is tracked before it is waited for, so an interrupt
  during start-up stops it as well;
- on Linux the server gets ``PR_SET_PDEATHSIG``: if the pipeline is killed outright
  (SIGKILL), the kernel sends the server SIGTERM and vLLM shuts its engine down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.backends.vllm.engine_cache import EngineCache, Shared, reap
from pipeline.serving.http_json import http_get_json

log = logging.getLogger(__name__)

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
    """One OpenAI-compatible API server process (vLLM's, or another engine's started the
    same way): start, health-wait, log access and stop."""

    cmd: list[str]
    log_path: Path
    port: int
    host: str = "127.0.0.1"
    #: how messages name it: the backend and the engine
    backend: str = "vllm_server"
    engine: str = "vLLM"
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
        log.info("started %s server pid %d on %s; log %s", self.engine, self.proc.pid,
                 self.base_url, self.log_path)
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        log.info("%s server healthy after %.1f s", self.engine, self.start_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.host}:{self.port}/health"
        while True:
            rc = self.proc.poll() if self.proc is not None else -1
            if rc is not None:
                tail = self.log_tail()
                raise RuntimeError(
                    f"backend {self.backend}: the {self.engine} server exited with code {rc} "
                    f"before it "
                    f"became healthy ({last_error_line(tail)}); last lines of "
                    f"{self.log_path}:\n{tail}"
                )
            with contextlib.suppress(OSError):
                status, _ = http_get_json(url, timeout_s=2.0)
                if status == 200:
                    return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"backend {self.backend}: the {self.engine} server did not become "
                    f"healthy within "
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
