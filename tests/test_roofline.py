"""Roofline arithmetic on hand-made cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.measure.roofline import (
    roofline_metrics,
    roofline_tokens_per_s,
    safetensors_parameters,
)


def test_batch_one_is_bandwidth_bound() -> None:
    # 100 M params in bf16 = 200 MB per step; 20 GB/s -> 100 steps/s -> 100 tok/s at batch 1.
    # compute bound: 1e12 / (2 * 1e8) = 5000 tok/s, far above.
    assert roofline_tokens_per_s(100_000_000, 2, 1, 20e9, 1e12) == pytest.approx(100.0)


def test_large_batch_becomes_compute_bound() -> None:
    # batch 64: memory bound 6400 tok/s; compute bound 1e12 / 2e8 = 5000 tok/s -> 5000.
    assert roofline_tokens_per_s(100_000_000, 2, 64, 20e9, 1e12) == pytest.approx(5000.0)


def test_bad_inputs_rejected() -> None:
    with pytest.raises(ValueError):
        roofline_tokens_per_s(0, 2, 1, 1e9, 1e9)


def test_share_uses_cached_machine_rates(tmp_path: Path, monkeypatch) -> None:
    # Pre-seed the per-machine cache so the arithmetic is checked on known rates.
    from pipeline.measure import roofline

    monkeypatch.setattr(roofline, "machine_key", lambda device, dtype: "fixed")
    (tmp_path / "roofline").mkdir()
    (tmp_path / "roofline" / "fixed.json").write_text(json.dumps(
        {"bandwidth_bytes_per_s": 24e9, "matmul_flops_per_s": 2e11}))
    # 135 M params fp32 = 540 MB -> 24e9 / 5.4e8 = 44.44 tok/s at batch 1; measured 20 -> 0.45
    m = roofline_metrics({"num_parameters": 135_000_000, "dtype": "float32", "device": "cpu"},
                         batch=1, tokens_per_s=20.0, cache_dir=tmp_path)
    assert m["roofline_tokens_per_s"] == pytest.approx(24e9 / 5.4e8)
    assert m["roofline_share"] == pytest.approx(20.0 / (24e9 / 5.4e8))
    assert roofline_metrics({}, 1, 20.0, tmp_path) == {}


def test_parameter_count_from_safetensors_header(tmp_path: Path) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                         "b": {"dtype": "F32", "shape": [5], "data_offsets": [48, 68]},
                         "__metadata__": {"format": "pt"}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                                 + bytes(68))
    assert safetensors_parameters(tmp_path) == 3 * 4 + 5


def test_measured_rates_never_fall_below_float32_matmul() -> None:
    # Real measurement (about a second): on CPUs without bf16 instructions torch's bf16
    # matmul is ~100x slower than float32; the machine limit must not inherit that.
    from pipeline.measure.roofline import measure_rates

    r = measure_rates("cpu", "bfloat16")
    assert r["bandwidth_bytes_per_s"] > 1e8
    assert r["matmul_flops_per_s"] >= r["matmul_flops_per_s_native_dtype"] > 0
