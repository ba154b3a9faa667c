"""The offline engine's processes: one started ``vllm.LLM`` and the processes it runs in
(:class:`StartedEngine`), the per-process cache of them (:data:`ENGINES`), which child
processes a start created (:func:`new_engine_pids`) and the cores its workers run on
(:func:`worker_affinity`). Nothing here imports vLLM or torch.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import psutil

from pipeline.backends.vllm.engine_cache import EngineCache, Shared, reap
from pipeline.backends.vllm.environment import cpu_list

log = logging.getLogger(__name__)

#: seconds vLLM's process manager waits for the engine core before it kills it; vLLM's own
#: default (5 s) is shorter than its executor's grace for workers, so the core got killed
#: mid-teardown
SHUTDOWN_TIMEOUT_S = 20.0
#: seconds to wait for engine processes to go after shutdown, before killing them
REAP_TIMEOUT_S = 10.0


@dataclass
class StartedEngine(Shared):
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
ENGINES: EngineCache[StartedEngine] = EngineCache("vLLM engine")


def child_pids_now() -> set[int]:
    """This process's direct children now (taken before an engine starts)."""
    return {p.pid for p in psutil.Process().children(recursive=False)}


def new_engine_pids(before: set[int]) -> list[int]:
    """The engine processes a start created: the direct children not in ``before``.

    Only what this start created: other vLLM processes under this one (a `vllm serve` of
    another backend) are not ours to count or stop.
    """
    new = [p for p in psutil.Process().children(recursive=False) if p.pid not in before]
    return [p.pid for p in new if _is_vllm(p)] or [p.pid for p in new
                                                   if "resource_tracker" not in
                                                   " ".join(_cmdline(p))]


def worker_affinity(pids: list[int]) -> str | None:
    """The cores the workers under the engine processes ``pids`` run on, read from the OS:
    the union of their threads' affinities (vLLM pins each OpenMP thread to one core of
    ``VLLM_CPU_OMP_THREADS_BIND``); ``|`` separates workers. Linux only."""
    found = []
    for pid in pids:
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
