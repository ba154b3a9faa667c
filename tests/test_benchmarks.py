"""The benchmark scripts run (tiny sizes): they must not rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    # 3 attention kinds x cache on/off x 2 batch sizes, all measured without error
    assert len(rows) == 12 and not [r for r in rows if r["error"]]
    assert {r["applied"]["attn_implementation"] for r in rows} == {"eager", "sdpa"}
    assert all(r["total_output_tokens"] == r["batch"] * 4 for r in rows)


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
