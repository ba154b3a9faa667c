"""hf, hf_fast, vLLM and llama.cpp side by side against this machine's roofline, in one run.

    python benchmarks/roofline_table.py [--batches 1,8] [--new-tokens 64] [--prompts 8]
                                        [--dtype bfloat16] [--backends hf,hf_fast,vllm,llamacpp]

Runs the pipeline's own sweep (``run.py -m +experiment=fast_path`` with the arguments as
overrides) into a throwaway output folder, so every figure is measured the way a job
measures it (greedy, fixed length, prefill included, warm-up untimed), then prints one
table: output tokens/s, the roofline for that batch and the share of it reached, compile
time, plus where the sweep's wall time went and the machine (CPU flags, versions).

Server backends (llamacpp, vllm_server) run as a second sweep whose ``batch`` is the
number of requests in flight (``workload.concurrency``); llama.cpp's roofline divides by
its GGUF's real bytes per parameter (Q4_1 for the packaged model), not by ``--dtype``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.provenance import cpu_flags, cpu_model  # noqa: E402

#: backends that serve requests online: swept over the requests in flight, not the batch
SERVERS = ("llamacpp", "vllm_server")


def run_sweep(args: argparse.Namespace, out: Path) -> float:
    """The fast_path sweep with these settings (a second one for the server backends);
    returns the wall time in seconds."""
    names = args.backends.split(",")
    offline = [b for b in names if b not in SERVERS]
    online = [b for b in names if b in SERVERS]
    wall = 0.0
    if offline:
        wall += _sweep(args, out / "offline", ",".join(offline),
                       [f"workload.batch_size={args.batches}"])
    if online:
        wall += _sweep(args, out / "online", ",".join(online),
                       ["workload.batch_size=1", f"workload.concurrency={args.batches}"])
    return wall


def _sweep(args: argparse.Namespace, out: Path, backends: str, batching: list[str]) -> float:
    cmd = [sys.executable, "run.py", "-m", "+experiment=fast_path",
           f"backend={backends}", *batching,
           f"workload.max_new_tokens={args.new_tokens}", f"workload.num_prompts={args.prompts}",
           f"model.dtype={args.dtype}", f"workload.repeats={args.repeats}",
           f"paths.output_dir={out}",
           f"paths.cache_dir={ROOT / 'outputs' / 'cache'}", "tracking.enabled=false",
           *args.overrides]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"the sweep failed (exit {p.returncode})")
    return wall


def rows(out: Path) -> list[dict]:
    """One row per job of the sweep, from its results.json."""
    found = []
    for f in sorted(out.glob("*/multirun/*/*/results.json")):
        r = json.loads(f.read_text())
        m, c = r.get("metrics", {}), r.get("config", {})
        backend = (r.get("choices") or {}).get("backend") or c["backend"]["name"]
        found.append({
            "backend": backend,
            "batch": c["workload"]["concurrency"] if backend in SERVERS
            else c["workload"]["batch_size"], "status": r["status"],
            "loop": (r.get("applied") or {}).get("decode_loop") or "",
            "tok_s": m.get("output_tokens_per_s_repeat_mean", m.get("output_tokens_per_s")),
            "ci": m.get("output_tokens_per_s_ci95"), "roof": m.get("roofline_tokens_per_s"),
            "share": m.get("roofline_share"), "ttft": m.get("ttft_ms_mean"),
            "tpot": m.get("tpot_ms_mean"),
            "compile_s": m.get("compile_s"), "generate_s": m.get("time_generate_s", 0.0),
            "bw": m.get("machine_bandwidth_gb_per_s"), "busy": m.get("machine_rates_busy"),
        })
    return found


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backends", default="hf,hf_fast,vllm,llamacpp")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measured repeats per job: tok/s is their mean +- 95%% CI")
    ap.add_argument("overrides", nargs="*",
                    help="more Hydra overrides for every job, e.g. backend.decode_loop=generate")
    args = ap.parse_args()

    from pipeline import provenance

    with tempfile.TemporaryDirectory(prefix="roofline-table-") as tmp:
        wall = run_sweep(args, Path(tmp))
        table = rows(Path(tmp))
    versions = provenance.collect([]).get("versions", {})
    print(f"{time.strftime('%Y-%m-%d')}  CPU: {cpu_model()}; {cpu_flags()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v))
    print(f"greedy, {args.new_tokens} new tokens fixed, {args.prompts} prompts, {args.dtype}, "
          f"prefill included" + (f"; {' '.join(args.overrides)}" if args.overrides else "")
          + "\n")
    head = (f"{'backend':10}{'loop':>9}{'batch':>6}{'tok/s':>16}{'roofline':>10}{'share':>7}"
            f"{'TTFT ms':>9}{'TPOT ms':>9}{'compile s':>11}")
    print(head + "\n" + "-" * len(head))
    for r in table:
        tok = fmt(r["tok_s"], ".1f") + (f" ± {r['ci']:.1f}" if r["ci"] is not None else "")
        print(f"{r['backend']:10}{r['loop']:>9}{r['batch']:>6}{tok:>16}"
              f"{fmt(r['roof'], '.0f'):>10}{fmt(r['share'], '.2f'):>7}"
              f"{fmt(r['ttft'], '.0f'):>9}{fmt(r['tpot'], '.1f'):>9}"
              f"{fmt(r['compile_s'], '.0f'):>11}" + ("" if r["status"] == "FINISHED"
                                                     else f"  {r['status']}"))
    bws = [r["bw"] for r in table if r["bw"] is not None]
    busy = sum(bool(r["busy"]) for r in table)
    if bws:  # a share divided by a rate read on a busy machine is too high: say so
        span = f"{min(bws):.1f}" + (f"-{max(bws):.1f}" if max(bws) > min(bws) else "")
        print(f"\nmachine rates: read {span} GB/s; "
              + (f"measured on a busy machine for {busy} of {len(table)} jobs "
                 "(machine_rates_busy=1): their shares are too high" if busy
                 else "measured idle (cached)"))
    gen = sum(r["generate_s"] for r in table)
    print(f"\nsweep wall {wall:.0f} s, measured generation {gen:.0f} s "
          f"({gen / wall:.0%} of it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
