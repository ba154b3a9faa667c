"""How close a job gets to the machine's physical limit.

Decoding one step reads every weight once and produces one token per sequence in the
batch, so at small batch the rate is bound by memory bandwidth:
``batch * bandwidth / weight_bytes``. At large batch the matmuls dominate:
``flops / (2 * parameters)`` tokens/s. The roofline is the smaller of the two; the KV
cache, activations and attention are left out, so the bound is optimistic (a share above
1 means the model does fewer bytes/FLOPs than assumed, e.g. a smaller effective batch).

The machine's rates are measured once per machine and boot, and cached in the cache folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

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


def _best_of(fn: Any, repeats: int, budget_s: float = 1.0) -> float:
    """Fastest of up to ``repeats`` runs, stopping once ``budget_s`` is spent (an emulated
    bf16 matmul takes seconds per run on AVX2 CPUs)."""
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return best


def measure_rates(device: str = "cpu", dtype: str = "float32") -> dict[str, float]:
    """Read bandwidth (a large tensor summed: bytes read / s) and matmul FLOP/s on
    ``device``, best of several runs: the better of ``dtype`` and float32 (see below)."""
    import torch

    tdtype = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n_bytes = 512 * 2**20 if device == "cuda" else 256 * 2**20
    x = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)

    def read() -> None:
        x.sum()
        sync()

    read()
    bw = n_bytes / _best_of(read, 5)
    n = 4096 if device == "cuda" else 1024

    def matmul_rate(dt: Any) -> float:
        a = torch.randn(n, n, dtype=dt, device=device)
        b = torch.randn(n, n, dtype=dt, device=device)

        def mm() -> None:
            a @ b
            sync()

        t0 = time.perf_counter()
        mm()
        first = time.perf_counter() - t0
        if first > 1.0:  # an emulated dtype: one run says enough
            return 2 * n**3 / first
        return 2 * n**3 / _best_of(mm, 5)

    native = matmul_rate(tdtype)
    # A 16-bit matmul can always run as float32 arithmetic on converted operands (inductor's
    # CPU micro-kernels do exactly that), so the float32 rate is a floor on what the machine
    # can do: torch's own bf16 kernel on CPUs without bf16 instructions (AVX2) manages
    # ~1 GFLOP/s, a software limit that would put the "roofline" below plain eager runs.
    fp32 = native if tdtype == torch.float32 else matmul_rate(torch.float32)
    return {"bandwidth_bytes_per_s": bw, "matmul_flops_per_s": max(native, fp32),
            "matmul_flops_per_s_native_dtype": native}


def machine_key(device: str, dtype: str) -> str:
    """Identifies the hardware a cached measurement belongs to: CPU name, speed flags and
    core count, GPU, threads, and this boot (cloud machines of one name differ in memory
    bandwidth from one boot to the next, by 2x in this project's sessions)."""
    from pipeline.provenance import boot_id, hardware

    hw = hardware()
    # the leading version invalidates caches written by an older measure_rates
    ident = json.dumps([3, hw.get("cpu"), hw.get("cpu_flags"), hw.get("cpu_count"),
                        hw.get("gpu"), hw.get("torch_threads"), device, dtype, boot_id()])
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def cached_rates(cache_dir: Path, device: str, dtype: str) -> dict[str, float]:
    """Machine rates, measured on first use (about a second) and cached per machine."""
    f = cache_dir / "roofline" / f"{machine_key(device, dtype)}.json"
    if f.is_file():
        return json.loads(f.read_text())
    rates = measure_rates(device, dtype)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(rates))
    return rates


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
                     dtype: str | None = None) -> dict[str, float]:
    """``roofline_tokens_per_s`` and ``roofline_share`` for a job, from what was applied
    (parameter count, dtype, device), falling back to the model folder's safetensors
    headers and the configured dtype; empty when neither says.

    The bytes per parameter are the applied ``bytes_per_parameter`` when the backend read
    them back from the loaded model (quantized weights: packed int8 plus what stays in
    float), else the dtype's width. The rates are measured in the compute dtype (a
    quantized model still computes in its float dtype)."""
    params = applied.get("num_parameters")
    if not params and model_dir and Path(model_dir).is_dir():
        params = safetensors_parameters(model_dir)
    dtype = str(applied.get("dtype") or dtype or "").removeprefix("torch.")
    device = "cuda" if str(applied.get("device", "cpu")).startswith("cuda") else "cpu"
    if not params or dtype not in DTYPE_BYTES:
        return {}
    rates = cached_rates(cache_dir, device, dtype)
    applied_bytes = applied.get("bytes_per_parameter")
    bpp = float(applied_bytes) if applied_bytes else float(DTYPE_BYTES[dtype])
    roof = roofline_tokens_per_s(int(params), bpp, batch,
                                 rates["bandwidth_bytes_per_s"], rates["matmul_flops_per_s"])
    return {
        "roofline_tokens_per_s": roof,
        "roofline_share": tokens_per_s / roof,
        "roofline_bytes_per_parameter": bpp,
        "machine_bandwidth_gb_per_s": rates["bandwidth_bytes_per_s"] / 1e9,
        "machine_matmul_gflops": rates["matmul_flops_per_s"] / 1e9,
    }
