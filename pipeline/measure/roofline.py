"""How close a job gets to the machine's physical limit.

Decoding one step reads every weight once and produces one token per sequence in the
batch, so at small batch the rate is bound by memory bandwidth:
``batch * bandwidth / weight_bytes``. At large batch the matmuls dominate:
``flops / (2 * parameters)`` tokens/s. The roofline is the smaller of the two; the KV
cache, activations and attention are left out, so the bound is optimistic (a share above
1 means the model does fewer bytes/FLOPs than assumed, e.g. a smaller effective batch).

The machine's rates come from :mod:`pipeline.measure.machine_rates`: bandwidth once per
machine and boot, the matmul rate per dtype, each cached only when measured on an idle
machine; a job whose rates were read on a busy machine says so (``machine_rates_busy``).
Measure again with ``python -m pipeline.measure.roofline [--force]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from pipeline.measure.machine_rates import (  # noqa: F401  (re-exported: callers import them here)
    LIMITS,
    busy_reasons,
    cached_bandwidth,
    cached_matmul,
    cached_rates,
    machine_key,
    measure_rates,
)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def roofline_tokens_per_s(
    num_parameters: int, bytes_per_param: float, batch: int,
    bandwidth_bytes_per_s: float, flops_per_s: float,
) -> float:
    """min(bandwidth-bound, compute-bound) decode tokens/s for ``batch`` sequences."""
    if num_parameters <= 0 or bytes_per_param <= 0 or batch <= 0:
        raise ValueError("num_parameters, bytes_per_param and batch must be positive")
    memory_bound = batch * bandwidth_bytes_per_s / (num_parameters * bytes_per_param)
    compute_bound = flops_per_s / (2.0 * num_parameters)
    return min(memory_bound, compute_bound)


def safetensors_parameters(model_dir: str | Path) -> int:
    """Parameter count from the safetensors headers of a model folder (no weights read)."""
    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                total += count
    return total


def roofline_metrics(applied: dict[str, Any], batch: int, tokens_per_s: float,
                     cache_dir: Path, model_dir: str | None = None,
                     dtype: str | None = None,
                     provenance: dict[str, Any] | None = None) -> dict[str, float]:
    """``roofline_tokens_per_s`` and ``roofline_share`` for a job, from what was applied
    (parameter count, dtype, device), falling back to the model folder's safetensors
    headers and the configured dtype; empty when neither says.

    The bytes per parameter are the applied ``bytes_per_parameter`` when the backend read
    them back from the loaded model (quantized weights: packed int8 plus what stays in
    float), else the dtype's width. The rates are measured in the compute dtype (a
    quantized model still computes in its float dtype). Beside them: ``machine_rates_busy``
    (1 when a rate was read on a busy machine: the share is then too high) and the
    conditions of the measurement (:func:`rates_metrics`); the measurements' full records,
    busy reasons included, go to ``provenance["machine_rates"]`` when a dict is given."""
    params = applied.get("num_parameters")
    if not params and model_dir and Path(model_dir).is_dir():
        params = safetensors_parameters(model_dir)
    dtype = str(applied.get("dtype") or dtype or "").removeprefix("torch.")
    device = "cuda" if str(applied.get("device", "cpu")).startswith("cuda") else "cpu"
    if not params or dtype not in DTYPE_BYTES:
        return {}
    # the reading taken before the model loaded, busy or not: measuring now would only
    # add the finished job's leftovers (compile workers, engine children) to the load
    rates = cached_rates(cache_dir, device, dtype, reuse_busy_s=math.inf)
    if provenance is not None:
        provenance["machine_rates"] = rates_provenance(rates)
    applied_bytes = applied.get("bytes_per_parameter")
    bpp = float(applied_bytes) if applied_bytes else float(DTYPE_BYTES[dtype])
    roof = roofline_tokens_per_s(int(params), bpp, batch,
                                 rates["bandwidth_bytes_per_s"], rates["matmul_flops_per_s"])
    return {
        "roofline_tokens_per_s": roof,
        "roofline_share": tokens_per_s / roof,
        "roofline_bytes_per_parameter": bpp,
        **rates_metrics(rates),
    }


def _numbers(*values: Any) -> list[float]:
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def rates_metrics(rates: dict[str, Any]) -> dict[str, float]:
    """The rates and how they were measured, as job metrics (numbers only; a rate pinned
    by hand in the cache has no conditions): bandwidth (best, median of the runs, runs),
    matmul, ``machine_rates_busy``, when the bandwidth was measured (epoch seconds), the
    1-minute load average then, others' CPU share (the larger of the two measurements')
    and this process's own CPU share (the smaller)."""
    bw, mm = rates.get("bandwidth") or {}, rates.get("matmul") or {}
    out = {
        "machine_bandwidth_gb_per_s": rates["bandwidth_bytes_per_s"] / 1e9,
        "machine_matmul_gflops": rates["matmul_flops_per_s"] / 1e9,
        "machine_rates_busy": float(bool(rates.get("busy"))),
    }
    optional = {
        "machine_bandwidth_gb_per_s_median": _numbers(bw.get("bandwidth_bytes_per_s_median")),
        "machine_bandwidth_runs": _numbers(bw.get("runs")),
        "machine_rates_measured_at": _numbers(bw.get("measured_at_epoch")),
        "machine_rates_load_avg_1m": _numbers(bw.get("load_avg_1m")),
        "machine_rates_others_cpu_share": _numbers(bw.get("others_cpu_share"),
                                                   mm.get("others_cpu_share")),
        "machine_rates_own_cpu_share": _numbers(bw.get("own_cpu_share"),
                                                mm.get("own_cpu_share")),
    }
    for k, vals in optional.items():
        if vals:
            v = min(vals) if k == "machine_rates_own_cpu_share" else max(vals)
            out[k] = v / 1e9 if k == "machine_bandwidth_gb_per_s_median" else v
    return out


def rates_provenance(rates: dict[str, Any]) -> dict[str, Any]:
    """The provenance entry for a job's machine rates: busy or not and why, the limits
    judged against, and each measurement's record (when, conditions, runs, best and
    median, where it is cached or that it was not)."""
    bw, mm = rates.get("bandwidth") or {}, rates.get("matmul") or {}
    return {
        "busy": bool(rates.get("busy")),
        "busy_reasons": [f"{part}: {r}" for part, rec in (("bandwidth", bw), ("matmul", mm))
                         for r in rec.get("busy_reasons") or []],
        "limits": {"others_cpu_share_max": LIMITS.others_cpu_share,
                   "steal_share_max": LIMITS.steal_share,
                   "own_cpu_share_min": LIMITS.own_cpu_share},
        "bandwidth": bw,
        "matmul": mm,
    }


def _describe(name: str, rec: dict[str, Any], rate: str, scale: float, unit: str) -> str:
    """One measurement in a line or two: rate, runs, when, conditions, where cached."""
    line = f"{name:16}{rec[rate] / scale:9.1f} {unit}"
    median = rec.get(f"{rate}_median")
    if median:
        line += f" (best of {rec.get('runs')} runs; median {median / scale:.1f})"
    if rec.get("measured_at"):
        cond = [f"load {rec['load_avg_1m']:.2f}" if rec.get("load_avg_1m") is not None
                else "", f"others' CPU {rec['others_cpu_share']:.0%}"
                if "others_cpu_share" in rec else "",
                f"own CPU {rec['own_cpu_share']:.0%} of {rec.get('threads', 0):.0f} threads"
                if "own_cpu_share" in rec else ""]
        line += f"\n{'':16}measured {rec['measured_at']}: " + ", ".join(c for c in cond if c)
    f = rec.get("cache_file")
    if rec.get("cached"):
        line += f"\n{'':16}{'from' if rec.get('source') == 'cache' else 'cached in'} {f}"
    else:
        line += (f"\n{'':16}BUSY, not cached: " + "; ".join(rec.get("busy_reasons") or [])
                 + f"\n{'':16}" + (f"the cache keeps its earlier idle reading: {f}"
                                     if f and Path(f).is_file() else f"(cache entry: {f})"))
    return line


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.measure.roofline``: print the machine's rates (measuring what
    is not cached, or everything with ``--force``) and where they are cached. Exit status
    1 when a measurement was taken on a busy machine and so was not cached."""
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.measure.roofline",
        description="Measure (or read from the cache) this machine's read bandwidth and "
                    "matmul rate for the roofline; only an idle measurement is cached.")
    ap.add_argument("--force", action="store_true",
                    help="measure again even when cached (a busy reading never replaces "
                         "a cached idle one)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help=f"matmul dtypes, comma separated; of {', '.join(DTYPE_BYTES)}")
    ap.add_argument("--cache-dir", type=Path, default=Path("outputs/cache"),
                    help="the pipeline's paths.cache_dir (default: outputs/cache)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = ap.parse_args(argv)
    # the lines below say why a reading was busy; the measuring module's warning would repeat it
    logging.getLogger("pipeline.measure.machine_rates").setLevel(logging.ERROR)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPE_BYTES]
    if bad or not dtypes:
        ap.error(f"--dtypes={args.dtypes!r} is invalid: {', '.join(bad) or 'empty'}; "
                 f"allowed: {', '.join(DTYPE_BYTES)}")
    from pipeline.devices import cuda_present

    device = args.device
    if device == "auto":
        device = "cuda" if cuda_present() else "cpu"
    elif device == "cuda" and not cuda_present():
        ap.error("--device=cuda is invalid: no CUDA device is visible; use cpu or auto")
    cache_dir = args.cache_dir.resolve()
    bw = cached_bandwidth(cache_dir, device, args.force)  # once: it does not depend on dtype
    mms = {d: cached_matmul(cache_dir, device, d, args.force) for d in dtypes}
    busy = bool(bw.get("busy") or any(m.get("busy") for m in mms.values()))
    if args.json:
        print(json.dumps({"device": device, "cache_dir": str(cache_dir), "busy": busy,
                          "bandwidth": bw, "matmul": mms}, indent=1))
        return 1 if busy else 0
    from pipeline.provenance import boot_id, cpu_flags, cpu_model

    print(f"machine: {cpu_model()} ({cpu_flags()}), device {device}, boot {boot_id()[:8]}")
    print(_describe("read bandwidth", bw, "bandwidth_bytes_per_s", 1e9, "GB/s"))
    for d, m in mms.items():
        print(_describe(f"{d} matmul", m, "matmul_flops_per_s", 1e9, "GFLOP/s"))
    if busy:
        print("\nsome rates were measured on a busy machine and are not cached: jobs will "
              "measure again (flagged machine_rates_busy=1) until an idle reading is.")
    return 1 if busy else 0


if __name__ == "__main__":
    sys.exit(main())
