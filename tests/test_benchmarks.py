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
