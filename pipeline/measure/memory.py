"""Memory: peak resident set size sampled in the background, children included, and
CUDA allocator peaks where torch has CUDA."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import psutil

# Providers of PIDs that belong to no job at the moment, e.g. a vLLM engine kept alive
# between jobs for reuse: while idle it is still this process's child, and counting it
# would charge its memory to whichever job (even an hf one) happens to run next.
_IDLE_PID_PROVIDERS: list[Callable[[], list[int]]] = []


def register_idle_pids(provider: Callable[[], list[int]]) -> None:
    """Register ``provider``: the PIDs it returns (and their descendants) are left out of
    :func:`tree_rss` unless a caller names them in ``extra_pids``."""
    if provider not in _IDLE_PID_PROVIDERS:
        _IDLE_PID_PROVIDERS.append(provider)


def _idle_subtrees(keep: set[int]) -> set[int]:
    out: set[int] = set()
    for provider in _IDLE_PID_PROVIDERS:
        try:
            pids = provider()
        except Exception:  # a broken provider must not cost the measurement
            continue
        for pid in pids:
            if pid in keep:
                continue
            out.add(pid)
            try:
                out.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                continue
    return out


def tree_rss(root_pid: int, extra_pids: list[int] | None = None) -> int:
    """Resident bytes of a process, all its descendants and any extra PIDs (each once),
    less the subtrees of registered idle PIDs (see :func:`register_idle_pids`)."""
    seen: set[int] = _idle_subtrees(set(extra_pids or []))
    total = 0
    procs: list[psutil.Process] = []
    for pid in [root_pid, *(extra_pids or [])]:
        try:
            p = psutil.Process(pid)
            procs.append(p)
            procs.extend(p.children(recursive=True))
        except psutil.Error:
            continue
    for p in procs:
        if p.pid in seen:
            continue
        seen.add(p.pid)
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue  # exited between listing and reading
    return total


class PeakRSSSampler:
    """Samples the RSS of this process tree every ``interval`` seconds while active.

    A sampler (not ``ru_maxrss``) because the peak must be per job and must include engine
    child processes that outlive a single job. The interval is a trade: each sample costs
    ~2 ms of CPU, and on a 2-core machine a third busy thread stalls torch's OpenMP workers
    (at 50 ms the hf job measured ~20% below a bare generate loop).
    """

    def __init__(
        self, interval: float = 0.25, extra_pids: Callable[[], list[int]] | None = None
    ) -> None:
        self.interval = interval
        self.extra_pids = extra_pids or (lambda: [])
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, tree_rss(os.getpid(), self.extra_pids()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSSSampler:
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


def cuda_reset_peaks() -> None:
    """Reset torch's CUDA peak counters (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def cuda_peaks() -> dict[str, Any]:
    """torch's CUDA max allocated / reserved bytes since the last reset, and NVML's view of
    device memory in use when pynvml is installed. Empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    out: dict[str, Any] = {
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(),
        "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(),
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        out["nvml_used_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(h).used
    except Exception:  # NVML is optional; absence is not an error
        pass
    return out
