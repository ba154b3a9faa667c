"""benchmarks/gpu_check.py's decisions, without running it: what it runs on a GPU, what it
skips, how it reads a job into the table and how it writes docs/gpu.md. The end-to-end
run is tests/test_benchmarks.py::test_gpu_check_smoke_runs_the_pipeline_on_cpu."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def gc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" /
                                                  "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_the_gpu_plan_covers_the_issue_matrix(gc: ModuleType) -> None:
    sweeps = gc.plan(smoke=False, cuda=True)
    attention = [s for s in sweeps if s.section == "attention"]
    kernels = [j["backend.attn_implementation"] for s in attention for j in s.jobs]
    assert sorted(set(kernels)) == ["eager", "flash_attention_2", "sdpa", "sdpa_flash"]
    lengths = {int(j["workload.input_tokens"]) for s in attention for j in s.jobs}
    assert lengths == {512, 2048, 8160}  # + 32 new tokens = the model's 8,192 context
    assert "workload.max_new_tokens=32" in attention[0].overrides
    kv = next(s for s in sweeps if s.section == "kv_cache")
    assert [j["backend.use_cache"] for j in kv.jobs] == ["true", "false"]
    fast = [s for s in sweeps if s.section == "fast_path"]
    assert [s.overrides[0] for s in fast] == ["backend=hf", "backend=hf_fast"]
    # hf_fast's compile mode is passed explicitly: CUDA graphs, then the same without
    modes = [(j["workload.batch_size"], j["backend.compile_mode"]) for j in fast[1].jobs]
    assert modes == [("1", "reduce-overhead"), ("1", "default"), ("8", "reduce-overhead"),
                     ("8", "default"), ("32", "reduce-overhead"), ("32", "default")]
    assert "backend.compile=false" not in fast[1].overrides  # compiled on the GPU
    assert {s.needs for s in sweeps} == {None, "flash_attn", "vllm"}
    # every batch is one batch of prompts (no batch-1 run of 32 prompts)
    assert all("workload.num_prompts=${workload.batch_size}" in s.overrides
               for s in fast)


def test_rows_without_their_package_are_skipped(gc: ModuleType) -> None:
    assert gc.skip_reason("vllm", False, smoke=False, cuda=True) == "skipped: not installed"
    assert gc.skip_reason("flash_attn", False, False, True) == "skipped: not installed"
    assert gc.skip_reason("flash_attn", True, False, True) is None
    assert gc.skip_reason("vllm", True, smoke=False, cuda=True) is None
    assert gc.skip_reason("vllm", True, smoke=True, cuda=False).startswith("skipped: smoke")
    assert gc.skip_reason(None, True, smoke=True, cuda=False) is None


def _result(compile_mode: str, tpot: float, device: str = "cuda:0") -> dict:
    return {"status": "FINISHED",
            "config": {"backend": {"compile_mode": compile_mode, "compile": True,
                                   "attn_implementation": "sdpa", "use_cache": True},
                       "workload": {"batch_size": 1, "input_tokens": 128,
                                    "max_new_tokens": 64}},
            "applied": {"device": device, "dtype": "bfloat16", "compiled": True,
                        "compile_mode": compile_mode, "attn_implementation": "sdpa",
                        "decode_loop": "static"},
            "metrics": {"tpot_ms_mean": tpot, "ttft_ms_mean": 9.0,
                        "output_tokens_per_s": 1000 / tpot,
                        "cuda_max_allocated_bytes": 2**30, "roofline_tokens_per_s": 5000.0,
                        "roofline_share": 0.1}}


def test_a_job_becomes_a_row_with_its_cuda_graphs(gc: ModuleType) -> None:
    sweep = gc.plan(smoke=False, cuda=True)[4]
    on = gc.make_row(sweep, sweep.jobs[0], _result("reduce-overhead", 2.0), None, False)
    off = gc.make_row(sweep, sweep.jobs[1], _result("default", 10.0), None, False)
    assert (on["cuda_graphs"], off["cuda_graphs"]) == ("on", "off")
    assert on["status"] == "ok" and on["peak_bytes"] == 2**30 and on["backend"] == "hf_fast"
    cpu = gc.make_row(sweep, sweep.jobs[0], _result("reduce-overhead", 2.0, "cpu"), None,
                      False)
    assert cpu["cuda_graphs"] == "off"  # no CUDA graphs on a CPU, whatever the mode
    speed = gc.graphs_speedup([on, off])
    assert speed is not None and speed.endswith(": 5.0x")
    # a job a deadline cut, or a refused one
    assert gc.make_row(sweep, sweep.jobs[2], None, None, True)["status"] == (
        "not run: deadline")
    bad = {**_result("default", 1.0), "status": "FAILED",
           "error": "ConfigError: backend.attn_implementation='sdpa_flash' is invalid"}
    row = gc.make_row(sweep, sweep.jobs[1], bad, None, False)
    assert row["status"] == "failed: ConfigError: backend.attn_implementation='sdpa_flash' " \
        "is invalid"
    table = gc.table([on, off, row]).splitlines()
    assert len(table) == 5 and table[0].count("|") == len(gc.COLUMNS) + 1


def test_the_doc_table_is_replaced_between_its_markers_only(gc: ModuleType,
                                                            tmp_path: Path) -> None:
    doc = tmp_path / "gpu.md"
    doc.write_text("# GPUs\n\n## Planning for a GPU\n\nkept\n")
    gc.write_doc(doc, "first table")
    gc.write_doc(doc, "second table")
    text = doc.read_text()
    assert text.count(gc.BEGIN) == 1 and "second table" in text and "first" not in text
    assert text.startswith("# GPUs\n\n## Planning for a GPU\n\nkept\n")
    doc.write_text(text + "\n## After\n\nalso kept\n")
    gc.write_doc(doc, "third table")
    assert doc.read_text().endswith(f"third table\n{gc.END}\n\n## After\n\nalso kept\n")
