"""The benchmark scripts run (tiny sizes): they must not rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_the_pipeline_on_cpu(tmp_path: Path) -> None:
    # The GPU check's own code path, end to end through run.py sweeps, at tiny sizes.
    out, doc = tmp_path / "check", tmp_path / "gpu.md"
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out",
                        str(out), "--doc", str(doc)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    by = {}
    for r in rows:
        by.setdefault(r["section"], []).append(r)
    assert list(by) == ["attention", "kv_cache", "fast_path", "vllm"]
    # eager/sdpa/sdpa_flash at one length, then flash_attention_2 (no flash-attn here)
    assert len(by["attention"]) == 4 and len(by["kv_cache"]) == 2
    assert len(by["fast_path"]) == 1 + 2 and len(by["vllm"]) == 1
    measured = [r for r in rows if r["status"] == "ok"]
    for r in measured:  # every measured row carries time, memory and the roofline share
        assert r["tpot_ms"] > 0 and r["ttft_ms"] > 0 and r["tok_s"] > 0, r
        assert r["peak_bytes"] > 0 and r["roofline_share"] > 0, r
        assert r["device"] == "cpu" and r["dtype"] == "float32", r
    for r in by["attention"]:
        if r["attention"] in ("eager", "sdpa"):
            assert r["status"] == "ok" and r["input_tokens"] == 64, r
        elif r["attention"] == "flash_attention_2":
            assert r["status"].startswith("skipped: "), r
        else:  # sdpa_flash in float32: measured, or refused by the hardware rule
            assert r["status"] == "ok" or "sdpa_flash" in r["status"], r
    assert [r["kv_cache"] for r in by["kv_cache"]] == [True, False]
    assert all(r["status"] == "ok" for r in by["kv_cache"] + by["fast_path"])
    fast = [r for r in by["fast_path"] if r["backend"] == "hf_fast"]
    # batch 1 with the CUDA-graph mode, then without; uncompiled in a smoke run
    assert [r["batch"] for r in fast] == [1, 1]
    assert all(r["decode_loop"] == "static" for r in fast)
    assert [r["compile"] for r in fast] == ["off (reduce-overhead)", "off (default)"]
    assert all(r["cuda_graphs"] == "off" for r in by["fast_path"])
    assert all(r["status"].startswith("skipped: ") for r in by["vllm"])
    # one table on stdout, the same block in the doc with where it came from
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| section | backend | attention |") and len(lines) == 11
    text = doc.read_text()
    for needle in ("<!-- gpu_check table: begin", "<!-- gpu_check table: end -->",
                   "- command: `python benchmarks/gpu_check.py --smoke", "- device: CPU",
                   "- versions: python ", " torch ", lines[0]):
        assert needle in text, needle


def test_assets_stay_small() -> None:
    size = sum(f.stat().st_size for f in (ROOT / "benchmarks" / "assets").rglob("*"))
    assert size < 5 * 2**20


def test_overhead_benchmark_runs(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "benchmarks/overhead.py", "--rounds", "1",
                        "--new-tokens", "4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    for line in ("bare model.generate", "pipeline hf job", "ratio of medians",
                 "job time breakdown", "outside load + generation + scoring"):
        assert line in p.stdout, p.stdout


def test_profile_script_splits_the_step() -> None:
    p = subprocess.run([sys.executable, "benchmarks/profile_fast_path.py", "--backend", "hf",
                        "--dtype", "float32", "--new-tokens", "6", "--top", "5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line[:34].strip(): line[34:].split() for line in p.stdout.splitlines()
            if line[:34].strip() and len(line) > 34}
    step = float(rows["decode step (generate)"][0])
    parts = float(rows["of which model forward"][0]) + float(
        rows["of which generate's own work"][0])
    assert step > 0 and parts == pytest.approx(step, rel=1e-3)
    assert "Self CPU" in p.stdout  # the profiler's op table


def test_roofline_table_runs_the_pipeline_sweep() -> None:
    p = subprocess.run([sys.executable, "benchmarks/roofline_table.py", "--backends", "hf",
                        "--batches", "1,2", "--new-tokens", "4", "--prompts", "2",
                        "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("hf ")]
    assert [ln[1:3] for ln in lines] == [["generate", "1"], ["generate", "2"]]
    for ln in lines:  # backend loop batch tok/s [± ci] roofline share ...
        rest = ln[4:] if ln[4] != "±" else ln[6:]
        tok_s, roof, share = float(ln[3]), float(rest[0]), float(rest[1])
        assert tok_s > 0 and roof > 0 and share == pytest.approx(tok_s / roof, abs=0.01)
        assert ln[4] == "±"  # 3 repeats by default: mean ± 95% CI
    assert "CPU:" in p.stdout and "of it)" in p.stdout
    # the rates the shares divide by, and whether they were read on a busy machine
    assert "machine rates: read " in p.stdout
    assert ("measured idle (cached)" in p.stdout) or ("measured on a busy machine" in p.stdout)


def test_client_lateness_runs_both_clients_on_one_schedule(tmp_path: Path) -> None:
    # tiny sizes: the structure of the table, never its timings
    out = tmp_path / "lateness.json"
    p = subprocess.run([sys.executable, "benchmarks/client_lateness.py", "--rates", "200,inf",
                        "--requests", "24", "--rounds", "2", "--warmup-requests", "8",
                        "--concurrency", "0", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["rate"], r["client"]) for r in rows] == [
        (200.0, "ours"), (200.0, "vllm"), (float("inf"), "ours"), (float("inf"), "vllm")]
    for r in rows:
        assert len(r["runs"]) == 2, r
        for run in r["runs"]:  # every scheduled request reached the stub, no earlier than due
            assert run["missing"] == 0 and run["late_p50_ms"] >= 0, run
            assert run["cpu_ms_per_request"] > 0, run
    assert "CPU ms/req" in p.stdout
