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


def _tree_pids(root_pid: int, extra_pids: list[int] | None = None) -> list[int]:
    """A process, all its descendants and any extra PIDs (each once), less the subtrees of
    registered idle PIDs (see :func:`register_idle_pids`)."""
    skip: set[int] = _idle_subtrees(set(extra_pids or []))
    out: list[int] = []
    for pid in [root_pid, *(extra_pids or [])]:
        try:
            p = psutil.Process(pid)
            found = [pid, *(c.pid for c in p.children(recursive=True))]
        except psutil.Error:
            continue
        for q in found:
            if q not in skip:
                skip.add(q)
                out.append(q)
    return out


def tree_rss(root_pid: int, extra_pids: list[int] | None = None) -> int:
    """Resident bytes of a process, all its descendants and any extra PIDs (each once),
    less the subtrees of registered idle PIDs (see :func:`register_idle_pids`)."""
    total = 0
    for pid in _tree_pids(root_pid, extra_pids):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue  # exited between listing and reading
    return total


def _reset_high_water_mark(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of ``pid``; False where refused or
    unsupported (not Linux, Linux < 4.0, another user's process)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark(pid: int) -> int | None:
    """Peak resident bytes of ``pid`` since its last reset, as the kernel counts them."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakRSSSampler:
    """Peak resident memory of this process tree (children and ``extra_pids`` included)
    over a ``with`` block.

    Per job, not ``ru_maxrss``: the peak must be the job's own and must include engine
    child processes that outlive a single job. On Linux the kernel keeps each process's
    high-water mark; it is reset on entry and read on exit, so nothing runs during the
    measurement and no short spike is missed. The figure is then the sum of the
    per-process peaks (exact for one process; an upper bound when several peak at
    different times). Where a reset is refused a thread samples every ``interval``
    seconds instead — each sample costs ~2 ms of CPU, and on a 2-core machine that thread
    stalls torch's OpenMP workers (at 50 ms the hf job ran ~20% below a bare loop).
    """

    def __init__(
        self, interval: float = 0.25, extra_pids: Callable[[], list[int]] | None = None
    ) -> None:
        self.interval = interval
        self.extra_pids = extra_pids or (lambda: [])
        self.peak_bytes = 0
        self.method = "high_water_mark"
        self._entry_pids: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, tree_rss(os.getpid(), self.extra_pids()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSSSampler:
        self._sample()
        self._entry_pids = _tree_pids(os.getpid(), self.extra_pids())
        if all(_reset_high_water_mark(pid) for pid in self._entry_pids):
            return self
        self.method = "sampled"
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            return
        now = _tree_pids(os.getpid(), self.extra_pids())
        # processes born during the block count from their start; those gone are lost
        pids = dict.fromkeys([*now, *(p for p in self._entry_pids if psutil.pid_exists(p))])
        peaks = [_high_water_mark(pid) for pid in pids]
        self.peak_bytes = max(self.peak_bytes, sum(p for p in peaks if p))


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


def trim_heap() -> bool:
    """``malloc_trim(0)`` where glibc has it: return freed heap pages to the OS."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc: the baseline keeps what was freed
        return False


def memory_now(extra_pids: Callable[[], list[int]] | None = None) -> dict[str, int]:
    """What is held right now: resident bytes of this process tree (as
    :class:`PeakRSSSampler` counts it) and, on CUDA, torch's allocated bytes. Taken right
    with the model loaded and warmed up, it is the baseline of :func:`above_load`.

    Freed heap memory is first handed back to the OS (``malloc_trim``): the C allocator
    keeps what an earlier job of the process freed, which would otherwise sit in this
    baseline and hide the working memory of a job that reuses a cached model."""
    trim_heap()
    out = {"rss_bytes": tree_rss(os.getpid(), extra_pids() if extra_pids else None)}
    import sys

    torch = sys.modules.get("torch")  # never import torch just to learn it is unused
    if torch is not None and torch.cuda.is_available():
        out["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated())
    return out


def above_load(at_load: dict[str, int], peak_rss_bytes: int,
               cuda: dict[str, Any]) -> dict[str, float]:
    """Memory the measured phase needed beyond the loaded model (KV cache, activations,
    allocator growth): its peak RSS minus the RSS after load, and on CUDA the peak
    allocated minus the allocated after load."""
    out = {"peak_rss_above_load_bytes": float(peak_rss_bytes - at_load["rss_bytes"])}
    if "cuda_max_allocated_bytes" in cuda and "cuda_allocated_bytes" in at_load:
        out["cuda_max_allocated_above_load_bytes"] = float(
            cuda["cuda_max_allocated_bytes"] - at_load["cuda_allocated_bytes"])
    return out
