"""Started vLLM engines kept per process and their processes: the key under which a
started engine is reused (:func:`engine_key`), the per-process cache that keeps at most one
idle engine (:class:`EngineCache` of :class:`Shared` items) and the reaping of an engine's
processes (:func:`reap`). The offline engine and the server both keep theirs here. Nothing
here imports vLLM or torch.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import psutil

from pipeline.backends.vllm.config import engine_eager
from pipeline.measure.memory import register_idle_pids

if TYPE_CHECKING:
    from pipeline.backends.vllm.config import VLLMSettings
    from pipeline.config import ModelConfig

log = logging.getLogger(__name__)


def engine_key(model_dir: str, model: ModelConfig, s: VLLMSettings, dtype: str, seed: int,
               env: dict[str, str], *extra: Any) -> tuple:
    """Every setting that shapes a started engine: jobs with equal keys can share one."""
    return (
        model_dir, model.revision, model.weights, model.trust_remote_code, model.device,
        dtype, s.max_model_len, engine_eager(s, model), s.gpu_memory_utilization,
        s.tensor_parallel_size, s.max_num_seqs, s.enable_prefix_caching, s.quantization, seed,
        s.max_num_batched_tokens, s.enable_chunked_prefill,
        tuple(sorted(env.items())), *extra,
    )



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

