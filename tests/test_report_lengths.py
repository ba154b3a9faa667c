"""The report's length-scaling and prefix-caching parts, on hand-made sweeps with
hand-worked numbers (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.metrics.catalog import MIB, missing
from pipeline.report import build, lengths, plots, render, tables
from pipeline.report.collect import JobRun, SweepData
from pipeline.report.expectations import BY_NAME, EXPECTATIONS


def _job(n: int, params: dict[str, str], metrics: dict[str, float],
         requests: list[dict[str, Any]] | None = None) -> JobRun:
    over = " ".join(f"{k}={v}" for k, v in params.items())
    return JobRun(
        run_id=f"run{n}", name=f"{n}-hf-greedy-synthetic", job=n, status="FINISHED",
        start_time=1000 + n,
        tags={"backend": "hf", "model": "m", "workload": "synthetic", "decoding": "greedy",
              "hydra_overrides": over},
        params={**params, "seed": "0", "paths.output_dir": "/tmp/x", "decoding.name": "greedy"},
        metrics={"output_tokens_per_s": 10.0 + n, "e2el_ms_mean": 100.0 + n, **metrics},
        results={"job_num": n, "requests": requests or []},
    )


def _data(jobs: list[JobRun]) -> SweepData:
    return SweepData(
        tracking_uri="sqlite:////tmp/none.db", experiment_id="1", experiment_name="infersweep",
        parent_id="parent", parent_name="sweep-x", parent_status="FINISHED",
        parent_start_time=1_700_000_000_000,
        parent_tags={"kind": "sweep", "hydra_overrides": "+experiment=context_length"},
        jobs=jobs,
    )


# (input tokens, attention, prefill s, decode tok/s, peak above load MiB)
CONTEXT = [(128, "eager", 0.010, 20.0, 100), (128, "sdpa", 0.005, 25.0, 60),
           (512, "eager", 0.060, 18.0, 400), (512, "sdpa", 0.020, 24.0, 200)]


def _context_sweep() -> SweepData:
    return _data([
        _job(n, {"workload.input_tokens": str(L), "backend.attn_implementation": attn},
             {"prefill_s_mean": pre, "decode_tokens_per_s": dec, "ttft_ms_mean": 999.0,
              "peak_rss_above_load_bytes": float(mem * MIB)})
        for n, (L, attn, pre, dec, mem) in enumerate(CONTEXT)])


def test_expectations_are_one_table() -> None:
    assert [e.name for e in EXPECTATIONS] == ["attention kernels", "KV cache", "batching", "vLLM",
                                             "prefix caching"]
    assert "1.5–3x" in BY_NAME["attention kernels"].expected
    kv = BY_NAME["KV cache"]
    assert kv.holds_at("workload.max_new_tokens", 200)
    assert not kv.holds_at("workload.max_new_tokens", 512)
    assert not kv.holds_at("workload.input_tokens", 128)


def test_context_length_scaling_and_ratios() -> None:
    data = _context_sweep()
    t = tables.build_tables(data)
    sc = t["scaling"].frame
    assert list(sc["config"]) == ["attn_implementation=eager"] * 2 + \
        ["attn_implementation=sdpa"] * 2
    assert list(sc["length"]) == [128, 512, 128, 512]
    # prefill_s_mean wins over TTFT, in ms; memory in MiB
    assert list(sc["prefill_ms"]) == pytest.approx([10.0, 60.0, 5.0, 20.0])
    assert set(sc["prefill_source"]) == {"prefill_s_mean"}
    assert list(sc["peak_above_load_mib"]) == pytest.approx([100, 400, 60, 200])

    r = t["length_ratios"].frame.set_index("length")
    assert list(r.index) == [128, 512]  # sdpa against eager, one row per length
    assert set(r["reference"]) == {"attn_implementation=eager"}
    assert r.loc[128, "prefill_x"] == pytest.approx(2.0)    # 10 / 5 ms
    assert r.loc[512, "prefill_x"] == pytest.approx(3.0)    # 60 / 20 ms
    assert r.loc[128, "decode_x"] == pytest.approx(1.25)    # 25 / 20 tok/s
    assert r.loc[512, "decode_x"] == pytest.approx(24 / 18)
    assert r.loc[128, "memory_ratio"] == pytest.approx(0.6)  # 60 / 100 MiB
    assert r.loc[512, "memory_saving_pct"] == pytest.approx(50.0)  # 1 - 200 / 400
    assert all("1.5–3x faster" in e for e in r["expected"])

    shown = t["length_ratios"].display()
    assert list(shown["prefill × (ref / this time)"]) == ["2.00", "3.00"]
    assert list(shown["memory saving %"]) == ["+40.0", "+50.0"]
    # the new metric is in the catalog: the jobs table shows it in MiB
    assert list(t["jobs"].display()["peak RSS above load MiB"]) == ["100", "60", "400", "200"]

    sections = render.build_sections(data, t)
    md = render.render_markdown(data, sections)
    assert "## Scaling with length" in md and "## Prefix caching" not in md
    for name in ("scaling_prefill", "scaling_decode", "scaling_memory"):
        assert f"]({name}.png)" in md
    images = plots.plot_images(data, t)
    assert {"scaling_prefill", "scaling_decode", "scaling_memory"} <= set(images)
    assert all(png.startswith(b"\x89PNG") for png in images.values())
    page = render.render_html(data, sections, images)
    assert page.count("data:image/png;base64,") == 6


def test_kv_cache_length_against_use_cache_false_with_ttft_fallback() -> None:
    # (new tokens, use_cache as MLflow logs a bool, TTFT ms, decode tok/s)
    rows = [(32, "True", 40.0, 30.0), (32, "False", 50.0, 12.0),
            (512, "True", 41.0, 28.0), (512, "False", 52.0, 4.0)]
    data = _data([_job(n, {"workload.max_new_tokens": str(L), "backend.use_cache": uc},
                       {"ttft_ms_mean": ttft, "decode_tokens_per_s": dec})
                  for n, (L, uc, ttft, dec) in enumerate(rows)])
    t = tables.build_tables(data)  # baseline: job 0 (use_cache=True); the reference is False
    sc = t["scaling"].frame
    assert set(sc["prefill_source"]) == {"ttft_ms_mean"}
    r = t["length_ratios"].frame.set_index("length")
    assert set(r["config"]) == {"use_cache=True"} and set(r["reference"]) == {"use_cache=False"}
    assert r.loc[32, "decode_x"] == pytest.approx(2.5)     # 30 / 12
    assert r.loc[512, "decode_x"] == pytest.approx(7.0)    # 28 / 4
    assert r.loc[32, "prefill_x"] == pytest.approx(50 / 40)
    assert r["memory_ratio"].isna().all()  # no memory figure: no ratio
    # the seed's figure speaks about up to 200 new tokens only
    assert "2–3x faster" in r.loc[32, "expected"]
    assert missing(r.loc[512, "expected"])
    images = plots.plot_images(data, t)
    assert "scaling_decode" in images and "scaling_memory" not in images


def test_no_length_section_when_no_length_varies() -> None:
    data = _data([_job(n, {"workload.input_tokens": "512", "backend.attn_implementation": a},
                       {"prefill_s_mean": 0.01 * (n + 1)})
                  for n, a in enumerate(("eager", "sdpa"))])
    t = tables.build_tables(data)
    assert t["scaling"].frame.empty and t["length_ratios"].frame.empty
    md = render.render_markdown(data, render.build_sections(data, t))
    assert "Scaling with length" not in md
    assert not any(k.startswith("scaling_") for k in plots.plot_images(data, t))


def _req(i: int, group: int, pos: int, ttft_ms: float, error: str | None = None
         ) -> dict[str, Any]:
    t0 = 10.0 + i
    return {"index": i, "t_start": t0, "t_first_token": None if error else t0 + ttft_ms / 1000,
            "t_end": t0 + 1.0, "error": error,
            "extra": {"prefix_group": group, "group_position": pos}}


def test_prefix_caching_first_vs_later_ttft() -> None:
    off = [_req(0, 0, 0, 100), _req(1, 0, 1, 90), _req(2, 1, 0, 110), _req(3, 1, 1, 100)]
    on = [_req(0, 0, 0, 100), _req(1, 0, 1, 20), _req(2, 0, 2, 30), _req(3, 1, 0, 120),
          _req(4, 1, 1, 40), _req(5, 1, 2, 0, error="boom")]
    data = _data([_job(0, {"backend.enable_prefix_caching": "False"}, {}, off),
                  _job(1, {"backend.enable_prefix_caching": "True"}, {}, on)])
    t = tables.build_tables(data)
    assert t["scaling"].frame.empty
    p = t["prefix_ttft"].frame.set_index("job")
    assert p.loc[0, "ttft_first_ms"] == pytest.approx(105.0)   # (100 + 110) / 2
    assert p.loc[0, "ttft_later_ms"] == pytest.approx(95.0)    # (90 + 100) / 2
    assert p.loc[1, "groups"] == 2
    assert (p.loc[1, "first_n"], p.loc[1, "later_n"]) == (2, 3)  # the failed one left out
    assert p.loc[1, "ttft_first_ms"] == pytest.approx(110.0)   # (100 + 120) / 2
    assert p.loc[1, "ttft_later_ms"] == pytest.approx(30.0)    # (20 + 30 + 40) / 3
    assert p.loc[1, "later_over_first"] == pytest.approx(30 / 110)
    assert missing(p.loc[0, "expected"]) and "lower than the first" in p.loc[1, "expected"]
    md = render.render_markdown(data, render.build_sections(data, t))
    assert "## Prefix caching" in md and "| 110.0 |" in md and "| 0.27 |" in md


def test_length_sweep_from_a_real_mlflow_store(tmp_path: Path) -> None:
    """The hand-made context-length sweep logged to a SQLite store and reported by the CLI."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("lengths", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="sweep", tags={"kind": "sweep"}).info.run_id
    for j in _context_sweep().jobs:
        run = client.create_run(exp, run_name=j.name,
                                tags={**j.tags, "mlflow.parentRunId": parent}).info.run_id
        client.log_batch(run, metrics=[Metric(k, v, 0, 0) for k, v in j.metrics.items()],
                         params=[Param(k, v) for k, v in j.params.items()])
        client.log_text(run, json.dumps(j.results), "results.json")
        client.set_terminated(run)
    client.set_terminated(parent)
    out = tmp_path / "report"
    assert build.main(["--run-id", parent, "--tracking-uri", uri, "--output-dir", str(out),
                       "--no-log"]) == 0
    for name in ("scaling_prefill", "scaling_decode", "scaling_memory"):
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    md = (out / "report.md").read_text()
    assert "## Scaling with length" in md
    row = next(line for line in md.splitlines() if line.startswith("| 512 | attn"))
    assert "| 3.00 |" in row and "| +50.0 |" in row
    assert lengths.length_axis(["backend.attn_implementation", "workload.input_tokens"]) == \
        "workload.input_tokens"
