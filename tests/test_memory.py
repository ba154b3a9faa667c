"""Peak-memory measurement: the kernel's high-water mark, no sampling thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from pipeline.measure import memory
from pipeline.measure.memory import PeakRSSSampler, tree_rss

MiB = 2**20


def _touch(n_bytes: int) -> bytearray:
    buf = bytearray(n_bytes)
    for i in range(0, n_bytes, 4096):  # make every page resident
        buf[i] = 1
    return buf


SPIKE = """
import json, os, threading
from pipeline.measure.memory import PeakRSSSampler, tree_rss
before = tree_rss(os.getpid())
with PeakRSSSampler() as mem:
    threads = [t.name for t in threading.enumerate()]
    buf = bytearray(200 * 2**20)
    for i in range(0, len(buf), 4096):  # make every page resident
        buf[i] = 1
    del buf  # gone long before any 250 ms sample could have seen it
print(json.dumps({"before": before, "peak": mem.peak_bytes, "method": mem.method,
                  "threads": threads}))
"""


def test_short_spike_is_caught_without_a_sampling_thread() -> None:
    # A fresh interpreter: child processes that other tests of this session leave behind
    # (and that may exit during the block, taking their share of the tree's RSS with them)
    # must not blur a 200 MiB difference.
    import json

    from tests.conftest import ROOT

    p = subprocess.run([sys.executable, "-c", SPIKE], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert "rss-sampler" not in r["threads"]
    assert r["method"] == "high_water_mark"
    assert r["peak"] >= r["before"] + 150 * MiB


def test_peak_is_per_block_not_per_process() -> None:
    buf = _touch(300 * MiB)
    del buf
    with PeakRSSSampler() as mem:
        time.sleep(0.01)
    # the 300 MiB from before the block must not count (ru_maxrss would keep it)
    assert mem.peak_bytes < tree_rss(os.getpid()) + 100 * MiB


def test_child_process_peak_counts() -> None:
    code = ("import sys,time; b=bytearray(250*2**20)\n"
            "for i in range(0,len(b),4096): b[i]=1\n"
            "del b; print('done', flush=True); time.sleep(30)")
    mem = PeakRSSSampler().__enter__()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        own = tree_rss(os.getpid(), [])
        mem.__exit__(None, None, None)  # while the child lives, as a job's engine does
    finally:
        child.kill()
        child.wait()
    assert mem.peak_bytes >= own + 200 * MiB  # the child's freed 250 MiB were seen


def test_falls_back_to_sampling_where_the_kernel_refuses(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    # A fake for a fault this machine cannot provoke: a kernel without clear_refs
    # (non-Linux, Linux < 4.0) or a process we may not reset.
    monkeypatch.setattr(memory, "_reset_high_water_mark", lambda pid: False)
    with PeakRSSSampler(interval=0.02) as mem:
        assert [t for t in threading.enumerate() if t.name == "rss-sampler"]
        buf = _touch(200 * MiB)
        time.sleep(0.2)
        del buf
    assert mem.method == "sampled"
    assert not [t for t in threading.enumerate() if t.name == "rss-sampler"]
    assert mem.peak_bytes >= 200 * MiB


def test_baseline_hands_back_freed_heap_memory() -> None:
    """A job reusing a cached model must not count what an earlier job freed as "the
    loaded model": the baseline trims the heap first (glibc's malloc_trim)."""
    import numpy as np

    from pipeline.measure.memory import memory_now, tree_rss, trim_heap

    if not trim_heap():
        pytest.skip("no glibc malloc_trim here")
    base = memory_now()["rss_bytes"]
    blocks = [np.ones(1000) for _ in range(100_000)]  # ~800 MB of small heap blocks
    grown = tree_rss(os.getpid())
    keep = np.ones(10)  # allocated on top, so the freed blocks stay inside the heap
    del blocks
    after = memory_now()["rss_bytes"]
    assert grown - base > 500 * 2**20
    assert after - base < 100 * 2**20, (base, grown, after)
    del keep
