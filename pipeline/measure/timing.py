"""The one clock of the pipeline, and phase timing.

All timestamps are ``time.perf_counter()`` seconds. On CUDA the device is synchronized
before a clock is read, so a timestamp never precedes the kernels it is meant to follow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Sync = Callable[[], None]


def no_sync() -> None:
    """Synchronization for devices that run in program order (the CPU)."""


def clock(sync: Sync = no_sync) -> float:
    """Synchronize, then read the monotonic clock (seconds)."""
    sync()
    return time.perf_counter()


class PhaseTimer:
    """Accumulates wall time per named phase of a job (load, warmup, generate, ...)."""

    def __init__(self, sync: Sync = no_sync) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block; repeated phases add up."""
        t0 = clock(self.sync)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + clock(self.sync) - t0
