"""GPU placement: at most one job per GPU on a machine, whatever the launcher.

The launchers place jobs on CPUs only: joblib runs ``n_jobs`` of them at once, a Ray task
without ``num_gpus`` sees every GPU of its node (Ray 2.60 no longer hides them), and two
sweeps started from two terminals know nothing of each other. Two jobs measuring on one GPU
at once spoil each other's numbers and may run out of memory, so every job that will use
CUDA takes a per-GPU file lock on its machine for the heavy part of the job
(:func:`gpu_slot`). Jobs on CPU take no lock and never import torch to find that out.

Locks live in ``<paths.cache_dir>/locks/<hostname>/gpu-<id>.lock``: the host name keeps
nodes apart when the cache dir is on a shared filesystem, and ``<id>`` is the *physical*
GPU (the entry of ``CUDA_VISIBLE_DEVICES``, which Ray and SLURM set per job), so two Ray
workers that were given different GPUs never wait for each other. The locks are
``flock`` locks: the kernel drops them when the process dies, so a killed job never
leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.backends import cached_engines, shutdown_all

log = logging.getLogger(__name__)

def visible_gpu_ids(count: int) -> list[str]:
    """Physical ids of the first ``count`` GPUs this process sees (logical 0..count-1):
    entries of CUDA_VISIBLE_DEVICES (indices or UUIDs) when set, else the indices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return ids[:count]


def job_gpus(spec: Any) -> list[str]:
    """The physical GPUs the job will use; ``[]`` for a CPU job.

    ``model.device=cpu`` answers without importing torch; ``auto`` uses CUDA when it is
    there (as the backends and the scorer do). How many GPUs is the backend's answer
    (:meth:`~pipeline.backends.base.Backend.gpus_needed`).
    """
    from pipeline.backends import backend_class
    from pipeline.devices import cuda_present

    device = str(spec.model.device)
    if device == "cpu":
        return []
    count = backend_class(spec.backend.impl).gpus_needed(spec)
    if count == 0 or (device != "cuda" and not cuda_present()):
        return []
    return visible_gpu_ids(count)


def lock_dir_for(spec: Any) -> Path:
    """``<paths.cache_dir>/locks/<hostname>``."""
    host = _safe(socket.gethostname() or "localhost")
    return Path(str(spec.paths.cache_dir)).expanduser().resolve() / "locks" / host


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclass
class _Held:
    """One GPU lock this process holds: the open file (the flock lives on it) and how
    many slots are inside it now."""

    fd: int
    depth: int = 0


# path -> held lock. flock locks belong to an open file, not a process: a second open()
# of the same file in this process would wait for the first forever, so re-entry goes
# through this table.
_HELD: dict[str, _Held] = {}
_TABLE_LOCK = threading.Lock()


def _acquire(path: Path, poll_s: float, timeout_s: float | None, who: str) -> None:
    key = str(path)
    with _TABLE_LOCK:
        held = _HELD.get(key)
        if held is not None:
            held.depth += 1
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    t0 = time.monotonic()
    told = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # polling, not a blocking flock: Ctrl-C stays prompt and a timeout possible
                if not told:
                    holder = _read_holder(path)
                    log.info("waiting for %s (held by %s)", path.name, holder or "?")
                    print(f"waiting for GPU lock {path} (held by {holder or '?'})",
                          file=sys.stderr, flush=True)
                    told = True
                if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                    holder = _read_holder(path) or "?"
                    raise TimeoutError(f"GPU lock {path} still held by {holder} "
                                       f"after {timeout_s:.0f} s") from None
                time.sleep(poll_s)
    except BaseException:
        os.close(fd)
        raise
    # who holds it, for the message of whoever waits next
    os.ftruncate(fd, 0)
    os.pwrite(fd, who.encode(), 0)
    if told:
        log.info("got %s after %.1f s", path.name, time.monotonic() - t0)
    with _TABLE_LOCK:
        _HELD[key] = _Held(fd=fd, depth=1)


def _read_holder(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _exit(path: Path, keep: bool) -> None:
    """Leave one slot; the lock is released when no slot is inside it, unless ``keep``."""
    key = str(path)
    with _TABLE_LOCK:
        held = _HELD.get(key)
        if held is None:
            return
        held.depth -= 1
        if held.depth > 0 or keep:
            return
        del _HELD[key]
    os.close(held.fd)  # closing the last descriptor drops the flock


def held_locks() -> list[str]:
    """Paths of the GPU locks this process holds (for tests and diagnostics)."""
    with _TABLE_LOCK:
        return sorted(_HELD)


def jobs_share_this_process() -> bool:
    """True when the sweep's next jobs run in this very process, one after another (a
    plain run, or Hydra's basic launcher); False under joblib, Ray or SLURM, where the
    other jobs are other processes."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:  # outside Hydra (tests, scripts)
        return True
    if hc.mode != RunMode.MULTIRUN:
        return True
    target = str(hc.launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher"):  # n_jobs=1: joblib runs the jobs in-process
        return hc.launcher.get("n_jobs") == 1
    return target.endswith("BasicLauncher")


@contextlib.contextmanager
def gpu_slot(spec: Any, *, lock_dir: str | Path | None = None,
             gpus: Sequence[str] | None = None, poll_s: float = 0.5,
             timeout_s: float | None = None,
             keep_engines: bool | None = None) -> Iterator[list[str]]:
    """Hold the job's GPUs for the body (model load, measurement, scoring); yields the
    physical GPU ids locked (``[]`` for a CPU job, which takes no lock).

    ``gpus`` and ``lock_dir`` override what the spec says (tests lock "GPU 0" on a CPU
    machine this way). Locks are taken in sorted order, so two tensor-parallel jobs never
    deadlock on each other.

    When the body leaves a vLLM engine cached on the GPU: if the sweep's next jobs run in
    this process (``keep_engines``, default :func:`jobs_share_this_process`), the engine
    and the lock are kept for them — anyone else still waits, as the GPU is still taken;
    otherwise the engines are stopped, so the lock can go to the next process.
    """
    ids = list(gpus) if gpus is not None else job_gpus(spec)
    if not ids:
        yield []
        return
    base = Path(lock_dir) if lock_dir is not None else lock_dir_for(spec)
    paths = [base / f"gpu-{_safe(i)}.lock" for i in sorted(set(ids))]
    who = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
    taken: list[Path] = []
    keep = False
    try:
        for p in paths:
            _acquire(p, poll_s, timeout_s, who)
            taken.append(p)
        yield ids
    finally:
        try:
            if taken and cached_engines():
                share = jobs_share_this_process() if keep_engines is None else keep_engines
                if share:
                    keep = True
                else:
                    shutdown_all()
        finally:
            for p in reversed(taken):
                _exit(p, keep)
