"""The machine's rates for the roofline: read bandwidth and matmul FLOP/s.

Each rate is the best of several short runs, taken together with the conditions it was
measured under (when, the 1-minute load average, the share of CPU time other processes and
other virtual machines took, this process's own CPU share, the number of runs, best and
median). A measurement is judged busy by :func:`busy_reasons`; only an idle one is written
to the cache (``<cache_dir>/roofline/``), so a rate read while other work ran is never
reused by later jobs: it serves the job that measured it, flagged, and the next job
measures again.

Bandwidth does not depend on the model's dtype: it is measured once per machine (and
device), in float32, under its own cache entry; the matmul rate has one entry per dtype.
Machine identity is the CPU name, its speed flags, core count, GPU, torch threads and this
boot (:func:`machine_key`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: bump when a measurement changes meaning: older cache entries are then ignored
CACHE_VERSION = 4


@dataclass(frozen=True)
class BusyLimits:
    """When a measurement counts as taken on a busy machine. Each share is over the timed
    runs only (allocation and warm-up excluded), from the kernel's CPU accounting."""

    #: other processes' CPU time / all cores' time: anything that ran beside the
    #: measurement took cores (and memory bandwidth) from it
    others_cpu_share: float = 0.15
    #: time the hypervisor gave to other guests / all cores' time (virtual machines)
    steal_share: float = 0.10
    #: this process's CPU time / (wall time x the threads it runs): below it the
    #: measurement did not get its cores, whoever took them (CPU device only: a GPU
    #: measurement waits on the card)
    own_cpu_share: float = 0.60


LIMITS = BusyLimits()


def busy_reasons(conditions: Mapping[str, Any], device: str = "cpu",
                 limits: BusyLimits = LIMITS) -> list[str]:
    """Why a measurement taken under ``conditions`` (``others_cpu_share``,
    ``steal_share``, ``own_cpu_share``, shares of CPU time during the timed runs) was on a
    busy machine; empty when it was idle. A condition that could not be read is not judged.

    The 1-minute load average is recorded but not judged: it trails by a minute, so it
    still counts work that ended before a one-second measurement began, and misses work
    that started during it."""
    reasons = []
    others = conditions.get("others_cpu_share")
    if others is not None and others > limits.others_cpu_share:
        reasons.append(f"other processes used {others:.0%} of the machine's CPU time while "
                       f"measuring (limit {limits.others_cpu_share:.0%})")
    steal = conditions.get("steal_share")
    if steal is not None and steal > limits.steal_share:
        reasons.append(f"the hypervisor gave {steal:.0%} of the CPU time to other virtual "
                       f"machines (steal; limit {limits.steal_share:.0%})")
    own = conditions.get("own_cpu_share")
    if device == "cpu" and own is not None and own < limits.own_cpu_share:
        reasons.append(f"the measuring process got {own:.0%} of its threads' wall time "
                       f"(limit {limits.own_cpu_share:.0%})")
    return reasons


@dataclass(frozen=True)
class CpuSample:
    """Clocks read together: wall, this process's CPU time, the machine's CPU times."""

    wall: float
    own_cpu: float
    busy: float  # all cores: user + nice + system + irq + softirq
    steal: float
    total: float  # all cores: busy + steal + idle + iowait


def cpu_sample() -> CpuSample:
    """Read the clocks (``time.process_time`` counts every thread of this process)."""
    import psutil

    t = psutil.cpu_times()
    busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))
    steal = getattr(t, "steal", 0.0)
    idle = getattr(t, "idle", 0.0) + getattr(t, "iowait", 0.0)
    return CpuSample(time.perf_counter(), time.process_time(), busy, steal,
                     busy + steal + idle)


def conditions_between(a: CpuSample, b: CpuSample, threads: int) -> dict[str, float]:
    """Shares of CPU time between two samples: others' (the machine's busy time less this
    process's), steal, and this process's own CPU time over ``threads`` x wall."""
    wall = max(b.wall - a.wall, 1e-9)
    own = max(b.own_cpu - a.own_cpu, 0.0)
    total = b.total - a.total
    out = {"wall_s": wall, "own_cpu_share": own / (wall * max(threads, 1)),
           "threads": float(threads)}
    if total > 0:  # /proc/stat counts in 10 ms ticks: nothing to say below one
        out["others_cpu_share"] = max(b.busy - a.busy - own, 0.0) / total
        out["steal_share"] = max(b.steal - a.steal, 0.0) / total
    return out


def cgroup_cpu_limit() -> float | None:
    """The CPUs a container's CPU quota allows (cgroup v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us``); None when there is no quota."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
                                     "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            parts = Path(quota_file).read_text().split()
            if period_file:
                parts.append(Path(period_file).read_text().strip())
            quota, period = parts[0], parts[1]
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period)
        except (OSError, ValueError, IndexError):
            continue
    return None


def _threads() -> int:
    """The cores the measurement can run on: torch's threads, at most the CPUs allowed
    (affinity, and a container's CPU quota: without it, a container would judge every
    reading busy for the cores it may not use)."""
    import torch

    try:
        allowed: float = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit:
        allowed = min(allowed, limit)
    return max(1, min(torch.get_num_threads(), int(allowed)))


def _timed_runs(fn: Callable[[], None], repeats: int, budget_s: float) -> list[float]:
    """Durations of up to ``repeats`` runs, stopping once ``budget_s`` is spent (an
    emulated bf16 matmul takes seconds per run on AVX2 CPUs)."""
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if sum(times) > budget_s:
            break
    return times


def _record(rate_key: str, work: float, times: list[float], cond: dict[str, float],
            device: str) -> dict[str, Any]:
    """A measurement: best and median rate, runs, when, conditions, busy verdict."""
    reasons = busy_reasons(cond, device)
    now = time.time()
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = None
    return {
        rate_key: work / min(times),
        f"{rate_key}_median": work / statistics.median(times),
        "runs": len(times),
        "measured_at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"),
        "measured_at_epoch": now,
        "load_avg_1m": load,
        **cond,
        "busy": bool(reasons),
        "busy_reasons": reasons,
    }


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def measure_bandwidth(device: str = "cpu", repeats: int = 100,
                      budget_s: float = 1.0) -> dict[str, Any]:
    """Read bandwidth (a large float32 tensor summed: bytes read / s), best of up to
    ``repeats`` runs, with the conditions of the timed runs. The tensor (256 MiB on CPU,
    512 on a GPU) is far larger than any cache."""
    import torch

    sync = _sync(device)
    n_bytes = 512 * 2**20 if device == "cuda" else 256 * 2**20
    x = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)

    def read() -> None:
        x.sum()
        sync()

    read()  # first touch and thread-pool start-up are not the machine's bandwidth
    threads = _threads()
    a = cpu_sample()
    times = _timed_runs(read, repeats, budget_s)
    cond = conditions_between(a, cpu_sample(), threads)
    return {**_record("bandwidth_bytes_per_s", n_bytes, times, cond, device),
            "device": device}


def measure_matmul(device: str = "cpu", dtype: str = "float32", repeats: int = 10,
                   budget_s: float = 1.0) -> dict[str, Any]:
    """Matmul FLOP/s: the better of ``dtype`` and float32 (see below), best of up to
    ``repeats`` runs each, with the conditions of all the timed runs."""
    import torch

    sync = _sync(device)
    n = 4096 if device == "cuda" else 1024
    tdtype = getattr(torch, dtype)
    threads = _threads()
    a = cpu_sample()

    def matmul_times(d: Any) -> list[float]:
        x = torch.randn(n, n, dtype=d, device=device)
        y = torch.randn(n, n, dtype=d, device=device)

        def mm() -> None:
            x @ y
            sync()

        t0 = time.perf_counter()
        mm()
        first = time.perf_counter() - t0
        if first > 1.0:  # an emulated dtype: one run says enough
            return [first]
        return _timed_runs(mm, repeats, budget_s)

    native = matmul_times(tdtype)
    # A 16-bit matmul can always run as float32 arithmetic on converted operands (inductor's
    # CPU micro-kernels do exactly that), so the float32 rate is a floor on what the machine
    # can do: torch's own bf16 kernel on CPUs without bf16 instructions (AVX2) manages
    # ~1 GFLOP/s, a software limit that would put the "roofline" below plain eager runs.
    fp32 = native if tdtype == torch.float32 else matmul_times(torch.float32)
    cond = conditions_between(a, cpu_sample(), threads)
    work = 2.0 * n**3
    best = native if min(native) <= min(fp32) else fp32
    return {**_record("matmul_flops_per_s", work, best, cond, device),
            "matmul_flops_per_s_native_dtype": work / min(native),
            "device": device, "dtype": dtype}


def machine_key(device: str, dtype: str | None = None) -> str:
    """Identifies the hardware a cached measurement belongs to: CPU name, speed flags and
    core count, GPU, threads, and this boot (cloud machines of one name differ in memory
    bandwidth from one boot to the next, by 2x in this project's sessions). ``dtype`` None
    is the machine's bandwidth entry; a dtype names that dtype's matmul entry."""
    from pipeline.provenance import boot_id, hardware

    hw = hardware()
    ident = json.dumps([CACHE_VERSION, hw.get("cpu"), hw.get("cpu_flags"), hw.get("cpu_count"),
                        hw.get("gpu"), hw.get("torch_threads"), device,
                        dtype or "bandwidth", boot_id()])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


#: the best busy measurement of each cache entry this process took (never written to
#: disk): contention only lowers a rate, so the highest busy reading is the best estimate
#: until an idle one is cached; it spares a job a worse reading taken after its model ran
_PROCESS_BEST: dict[str, dict[str, Any]] = {}


def _read(f: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):  # absent, or half-written by an older version
        return None
    return d if isinstance(d, dict) else None


def _write(f: Path, record: dict[str, Any]) -> None:
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(f)  # atomic: two jobs measuring at once never leave half a file


def _measured(f: Path, rate_key: str, measure: Callable[[], dict[str, Any]]
              ) -> dict[str, Any]:
    """Measure; cache the reading when idle, else keep this process's best busy one."""
    rec = measure()
    if not rec["busy"]:
        _write(f, rec)
        _PROCESS_BEST.pop(str(f), None)
        return {**rec, "source": "measured", "cached": True, "cache_file": str(f)}
    log.warning("machine busy while measuring the %s rate: %s. Not cached; the job's "
                "roofline metrics carry machine_rates_busy=1", rate_key.split("_")[0],
                "; ".join(rec["busy_reasons"]))
    prev = _PROCESS_BEST.get(str(f))
    count = (prev["busy_measurements"] if prev else 0) + 1
    best = rec if prev is None or rec[rate_key] > prev[rate_key] else prev
    _PROCESS_BEST[str(f)] = {**best, "busy_measurements": count}
    return {**_PROCESS_BEST[str(f)], "source": "measured busy (best in this process)",
            "cached": False, "cache_file": str(f)}


#: a busy reading this process took less than this long ago serves again instead of a new
#: measurement: on a loaded machine every job of a sweep would otherwise spend seconds
#: re-measuring, and add to the load it measures
BUSY_REUSE_S = 60.0


def _cached(f: Path, rate_key: str, force: bool, reuse_busy_s: float = BUSY_REUSE_S
            ) -> dict[str, Any] | None:
    """The cache entry ``f`` when it holds ``rate_key`` (and ``force`` is off), else this
    process's busy reading of it when younger than ``reuse_busy_s``."""
    d = None if force else _read(f)
    if d is not None and rate_key in d:
        return {**d, "source": "cache", "cached": True, "cache_file": str(f)}
    prev = None if force else _PROCESS_BEST.get(str(f))
    if prev is not None and time.time() - prev["measured_at_epoch"] < reuse_busy_s:
        return {**prev, "source": "measured busy (best in this process)", "cached": False,
                "cache_file": str(f)}
    return None


def cached_bandwidth(cache_dir: Path, device: str, force: bool = False,
                     reuse_busy_s: float = BUSY_REUSE_S) -> dict[str, Any]:
    """The machine's read bandwidth record (``bandwidth_bytes_per_s``, conditions,
    ``source``, ``cached``, ``cache_file``): the cached idle measurement, else one taken
    now (``force``: always taken now; a busy one never replaces a cached idle one)."""
    f = Path(cache_dir) / "roofline" / f"{machine_key(device, None)}.json"
    return _cached(f, "bandwidth_bytes_per_s", force, reuse_busy_s) or _measured(
        f, "bandwidth_bytes_per_s", lambda: measure_bandwidth(device))


def cached_matmul(cache_dir: Path, device: str, dtype: str, force: bool = False,
                  reuse_busy_s: float = BUSY_REUSE_S) -> dict[str, Any]:
    """The machine's matmul record for ``dtype`` (``matmul_flops_per_s``, its
    ``_native_dtype`` reading, conditions, source), cached like :func:`cached_bandwidth`."""
    f = Path(cache_dir) / "roofline" / f"{machine_key(device, dtype)}.json"
    return _cached(f, "matmul_flops_per_s", force, reuse_busy_s) or _measured(
        f, "matmul_flops_per_s", lambda: measure_matmul(device, dtype))


def cached_rates(cache_dir: Path, device: str, dtype: str, force: bool = False,
                 reuse_busy_s: float = BUSY_REUSE_S) -> dict[str, Any]:
    """The machine's rates for ``dtype`` on ``device``: ``bandwidth_bytes_per_s``,
    ``matmul_flops_per_s`` (and its ``_native_dtype`` reading), ``busy`` (either reading
    was taken on a busy machine) and the two records (``bandwidth``, ``matmul``:
    conditions, source, cache file).

    Each comes from the cache when an idle measurement is there, else is measured now
    (about a second each, more under load; bandwidth first, the rate a small batch's
    roofline rests on). ``force`` measures both again; a busy reading this process took
    within ``reuse_busy_s`` serves again (the roofline after a job reuses the one taken
    before its model loaded: pass ``math.inf``). A dtype entry that carries its own
    ``bandwidth_bytes_per_s`` (rates pinned by hand) is used whole."""
    mm_file = Path(cache_dir) / "roofline" / f"{machine_key(device, dtype)}.json"
    pinned = _cached(mm_file, "matmul_flops_per_s", force, reuse_busy_s)
    if pinned is not None and "bandwidth_bytes_per_s" in pinned:
        bw, mm = pinned, pinned
    else:
        bw = cached_bandwidth(cache_dir, device, force, reuse_busy_s)
        mm = pinned or cached_matmul(cache_dir, device, dtype, force, reuse_busy_s)
    return {
        "bandwidth_bytes_per_s": float(bw["bandwidth_bytes_per_s"]),
        "matmul_flops_per_s": float(mm["matmul_flops_per_s"]),
        "matmul_flops_per_s_native_dtype": float(
            mm.get("matmul_flops_per_s_native_dtype", mm["matmul_flops_per_s"])),
        "busy": bool(bw.get("busy") or mm.get("busy")),
        "bandwidth": bw,
        "matmul": mm,
    }


def measure_rates(device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Measure both rates now, uncached (``bandwidth_bytes_per_s``, ``matmul_flops_per_s``,
    ``matmul_flops_per_s_native_dtype``, ``busy``, and each measurement's record)."""
    bw = measure_bandwidth(device)
    mm = measure_matmul(device, dtype)
    return {"bandwidth_bytes_per_s": bw["bandwidth_bytes_per_s"],
            "matmul_flops_per_s": mm["matmul_flops_per_s"],
            "matmul_flops_per_s_native_dtype": mm["matmul_flops_per_s_native_dtype"],
            "busy": bw["busy"] or mm["busy"], "bandwidth": bw, "matmul": mm}
