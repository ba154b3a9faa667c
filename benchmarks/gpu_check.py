"""The GPU matrix for the optimization axes, on the SmolLM2-135M architecture with random
weights (config + tokenizer travel in benchmarks/assets, < 5 MB; no weights needed).

    python benchmarks/gpu_check.py                 # CUDA: the full matrix, < 6 minutes
    python benchmarks/gpu_check.py --smoke         # CPU: a tiny smoke run of the same code

Rows: attention (eager | sdpa | sdpa_flash) x KV cache (on | off) x batch (1 | 8 | 32), then
static cache + torch.compile rows (default mode, then reduce-overhead = CUDA graphs). Each
row is measured through the pipeline's own HF backend and metric functions (one way to
time), with fixed-length greedy output, and carries the roofline (the card's bandwidth and
matmul rate measured once, as every pipeline job does) and the share of it reached.
Prints a table and rewrites results.json after every row (default:
outputs/gpu_check/results.json), so a run cut short by ``--deadline-s`` still reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import provenance  # noqa: E402
from pipeline.backends.hf import HFBackend, HFBackendConfig  # noqa: E402
from pipeline.config import DecodingConfig, ModelConfig  # noqa: E402
from pipeline.measure.memory import PeakRSSSampler, cuda_peaks, cuda_reset_peaks  # noqa: E402
from pipeline.measure.roofline import DTYPE_BYTES, roofline_tokens_per_s  # noqa: E402
from pipeline.measure.timing import clock  # noqa: E402
from pipeline.metrics import performance  # noqa: E402
from pipeline.workload import make_requests  # noqa: E402

ASSETS = ROOT / "benchmarks" / "assets" / "smollm2-135m"
PROMPT = "Explain in two sentences why the sky looks blue during the day."


def measure_row(backend: HFBackend, batch: int, new_tokens: int, repeats: int,
                rates: dict[str, float]) -> dict:
    """Warm up once, then time ``repeats`` fixed-length greedy batches; add the roofline."""
    reqs = make_requests([PROMPT] * batch, backend.tokenizer, use_chat_template=True)
    d = DecodingConfig()
    backend.generate(reqs, d, max_new_tokens=new_tokens, fixed_length=True)
    cuda_reset_peaks()
    records, wall = [], 0.0
    with PeakRSSSampler() as mem:
        for _ in range(repeats):
            t0 = clock(backend.sync)
            records += backend.generate(reqs, d, max_new_tokens=new_tokens, fixed_length=True)
            wall += clock(backend.sync) - t0
    m = performance.throughput_metrics(records, wall)
    m.update(performance.latency_metrics(records))
    m["peak_rss_bytes"] = mem.peak_bytes
    m.update(cuda_peaks())
    applied = backend.applied_settings()
    roof = roofline_tokens_per_s(applied["num_parameters"], DTYPE_BYTES[applied["dtype"]],
                                 batch, rates["bandwidth_bytes_per_s"],
                                 rates["matmul_flops_per_s"])
    m["roofline_tokens_per_s"] = roof
    m["roofline_share"] = m["output_tokens_per_s"] / roof
    return m


def main() -> int:
    """Run the matrix and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check" / "results.json")
    ap.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8 32)")
    ap.add_argument("--compiled-only", action="store_true",
                    help="only the static cache + torch.compile rows")
    ap.add_argument("--compile-modes", nargs="+", default=["default", "reduce-overhead"],
                    help="torch.compile modes of the compiled rows")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="skip the rows left once this many seconds have passed (0: none)")
    args = ap.parse_args()

    import torch

    from pipeline.measure.roofline import measure_rates

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("error: no CUDA device; run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    batches = args.batches or ((1, 2) if args.smoke else (1, 8, 32))
    new_tokens = 4 if args.smoke else 64
    repeats = 1 if args.smoke else 3
    dtype = "bfloat16" if cuda else "float32"
    model_dir = _tiny_copy(ASSETS) if args.smoke else ASSETS
    model = ModelConfig(name="smollm2-135m-random", source="hf", path=str(model_dir),
                        weights="random", dtype=dtype, device="cuda" if cuda else "cpu")
    variants = [(attn, cache, "dynamic", "") for attn in ("eager", "sdpa", "sdpa_flash")
                for cache in (True, False)]
    # compiled rows last: they cost the most and a deadline should cut them, not the matrix
    variants += [("sdpa", True, "static", mode) for mode in args.compile_modes]
    if args.compiled_only:
        variants = [v for v in variants if v[3]]
    if args.smoke:
        variants = [v for v in variants if not v[3]]  # compile takes minutes on 2 cores
    rates = measure_rates("cuda" if cuda else "cpu", dtype)
    print(f"card: read {rates['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, {dtype} matmul "
          f"{rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s"
          + (" (BUSY while measured: " + "; ".join(rates["bandwidth"]["busy_reasons"]
                                                   + rates["matmul"]["busy_reasons"]) + ")"
             if rates["busy"] else ""), flush=True)
    rows: list[dict] = []
    t_start = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for attn, cache, impl, mode in variants:
        if args.deadline_s and time.time() - t_start > args.deadline_s:
            print(f"deadline: skipped {attn} cache={cache} {impl} compile={mode or False}")
            continue
        cfg = HFBackendConfig(attn_implementation=attn, use_cache=cache,
                              cache_implementation=impl, compile=bool(mode),
                              compile_mode=mode or "default")
        with HFBackend(str(model_dir), model, cfg, seed=0) as backend:
            for b in batches:
                t0 = time.time()
                try:
                    m = measure_row(backend, b, new_tokens, repeats, rates)
                    err = ""
                except Exception as e:  # e.g. a kernel the card lacks: report, go on
                    m, err = {}, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                rows.append({"attn": attn, "kv_cache": cache, "cache_impl": impl,
                             "compile": mode or False, "batch": b,
                             "seconds": time.time() - t0, "error": err,
                             "applied": backend.applied_settings(), **m})
                print(_line(rows[-1]), flush=True)
                args.out.write_text(json.dumps({
                    "provenance": provenance.collect(sys.argv[1:]), "machine_rates": rates,
                    "new_tokens": new_tokens, "repeats": repeats, "dtype": dtype,
                    "rows": rows}, indent=1, default=str))
    print(f"\n{len(rows)} rows in {time.time() - t_start:.0f} s; wrote {args.out}")
    print(_table(rows))
    return 0


def _tiny_copy(src: Path) -> Path:
    """The same architecture cut to 2 layers: the smoke run checks the code path, not speed."""
    import shutil
    import tempfile

    dst = Path(tempfile.mkdtemp(prefix="gpu-check-smoke-"))
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _line(r: dict) -> str:
    head = (f"{r['attn']:<11} cache={r['kv_cache']!s:<5} {r['cache_impl']:<8} "
            f"compile={r['compile']!s:<15} batch={r['batch']:<3}")
    if "output_tokens_per_s" not in r:
        return f"{head} ERROR {r['error']}"
    mem = r.get("cuda_max_allocated_bytes", r["peak_rss_bytes"]) / 2**20
    return (f"{head} {r['output_tokens_per_s']:9.1f} tok/s  TPOT {r.get('tpot_ms_mean', 0):7.2f}"
            f" ms  mem {mem:8.0f} MiB  roofline {r['roofline_share']:6.1%}")


def _table(rows: list[dict]) -> str:
    """Markdown table of the measured rows (what docs/ quotes)."""
    out = ["| attention | KV cache | cache | compile | batch | out tok/s | TPOT ms | "
           "peak MiB | roofline tok/s | share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "output_tokens_per_s" not in r:
            out.append(f"| {r['attn']} | {r['kv_cache']} | {r['cache_impl']} | "
                       f"{r['compile']} | {r['batch']} | error: {r['error']} |||||")
            continue
        mem = r.get("cuda_max_allocated_bytes", r["peak_rss_bytes"]) / 2**20
        out.append(f"| {r['attn']} | {r['kv_cache']} | {r['cache_impl']} | {r['compile']} | "
                   f"{r['batch']} | {r['output_tokens_per_s']:.1f} | "
                   f"{r.get('tpot_ms_mean', 0):.2f} | {mem:.0f} | "
                   f"{r['roofline_tokens_per_s']:.0f} | {r['roofline_share']:.1%} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
