"""The report's readings respect the measured noise, the applied-settings table shows only
what differs, the jobs table shows roofline share / start-up costs, the seed's expectations
sit beside the measured ratios, and report.html's plots are interactive (hand-made sweeps)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from pipeline.report import build, interactive, noise, render, tables
from pipeline.report.collect import JobRun
from tests.conftest import job_run, sweep_data


def _two_backends(**metrics1: float) -> list[JobRun]:
    """Greedy on hf and on vllm: same text, so diversity is equal within the threshold."""
    a = job_run(0, "greedy", "1.0", 10.0, 1000.0)
    b = job_run(1, "greedy", "1.0", 10.5, 980.0)
    for j, backend in ((a, "hf"), (b, "vllm")):
        j.params["backend.name"] = backend
        j.tags["hydra_overrides"] = f"decoding=greedy backend={backend}"
        j.metrics.update({"perplexity": 2.0, "self_bleu": 0.100, "distinct_2": 0.80,
                          "rep_2": 0.050})
    b.metrics.update({"self_bleu": 0.105, "distinct_2": 0.79, "rep_2": 0.06,
                      "perplexity": 2.01, **metrics1})
    return [a, b]


def test_equal_diversity_within_threshold_gets_no_ranking() -> None:
    data = sweep_data(_two_backends())
    t = tables.build_tables(data)
    reads = list(t["tradeoffs"].frame["reading"])
    for words in ("least diverse", "most diverse", "most repetition", "least repetition",
                  "fastest", "slowest", "perplexity", "bigrams"):
        assert not any(words in r for r in reads), (words, reads)
    md = render.render_markdown(data, render.build_sections(data, t))
    assert "Noise rule" in md and "10%" in md and "0.02" in md and "no repeats" in md
    assert "highest output tok/s" not in md and "lowest self-BLEU" not in md


def test_difference_beyond_threshold_is_ranked() -> None:
    data = sweep_data(_two_backends(output_tokens_per_s=20.0, self_bleu=0.2))
    reads = tables.build_tables(data)["tradeoffs"].frame.set_index("job")["reading"]
    assert "fastest" in reads[1] and "slowest" in reads[0]
    assert "least diverse" in reads[1] and "most diverse" in reads[0]
    assert "repetition" not in reads[0] + reads[1]  # 0.05 vs 0.06: within 0.02


def test_repeat_ci_decides_when_jobs_have_repeats() -> None:
    # 15% apart but the 95% intervals overlap: no ranking
    wide = _two_backends(output_tokens_per_s=11.5, output_tokens_per_s_repeat_mean=11.5,
                         output_tokens_per_s_ci95=1.0)
    wide[0].metrics.update(output_tokens_per_s_repeat_mean=10.0, output_tokens_per_s_ci95=1.0)
    reads = list(tables.build_tables(sweep_data(wide))["tradeoffs"].frame["reading"])
    assert not any("fastest" in r for r in reads)
    # 8% apart (under the fixed 10%) but the intervals are tight and apart: ranked
    tight = _two_backends(output_tokens_per_s=10.8, output_tokens_per_s_repeat_mean=10.8,
                          output_tokens_per_s_ci95=0.2)
    tight[0].metrics.update(output_tokens_per_s_repeat_mean=10.0, output_tokens_per_s_ci95=0.2)
    data = sweep_data(tight)
    t = tables.build_tables(data)
    assert "fastest" in t["tradeoffs"].frame.set_index("job").loc[1, "reading"]
    md = render.render_markdown(data, render.build_sections(data, t))
    assert "95% intervals of the repeat means must not overlap" in md
    assert "highest output tok/s: job 1" in md


def test_noise_extremes_ties() -> None:
    f = noise.Figure
    best, worst = noise.extremes("output_tokens_per_s",
                                 {"a": f(10.0), "b": f(10.5), "c": f(20.0)}, True)
    assert best == {"c"} and worst == {"a", "b"}
    assert noise.extremes("self_bleu", {"a": f(0.10), "b": f(0.11)}, False) == (set(), set())
    assert noise.relative("ttft_ms_mean") and not noise.relative("rep_2")


def test_applied_table_shows_only_differing_settings() -> None:
    jobs = [job_run(0, "greedy", "1.0", 10.0, 1000.0), job_run(1, "greedy", "1.0", 11.0, 900.0)]
    for j, attn in zip(jobs, ("eager", "sdpa"), strict=True):
        assert j.results is not None
        j.results["applied"] = {"device": "cpu", "dtype": "float32", "torch_threads": 2,
                                "attn_implementation": attn}
    data = sweep_data(jobs)
    t = tables.build_tables(data)
    assert list(t["applied"].frame.columns) == ["job", "attn_implementation"]
    md = render.render_markdown(data, render.build_sections(data, t))
    assert "Same in every job: device=cpu, dtype=float32, torch_threads=2." in md
    assert "| job | attn_implementation |" in md


def test_jobs_table_shows_roofline_and_startup_costs() -> None:
    jobs = [job_run(0, "greedy", "1.0", 10.0, 1000.0, roofline_share=0.25, compile_s=84.0),
            job_run(1, "topp", "1.0", 11.0, 900.0, engine_start_s=31.5)]
    shown = tables.build_tables(sweep_data(jobs))["jobs"].display()
    assert list(shown["roofline share"]) == ["0.25", "-"]
    assert list(shown["compile s"]) == ["84.0", "-"]
    assert list(shown["engine start s"]) == ["-", "31.5"]
    plain = tables.build_tables(sweep_data([job_run(0, "greedy", "1.0", 10.0, 1000.0)]))["jobs"]
    assert not {"roofline share", "compile s", "engine start s"} & set(plain.display().columns)


def _sweep(param_sets: list[dict[str, str]], tps: list[float]) -> Any:
    jobs = []
    for n, (params, v) in enumerate(zip(param_sets, tps, strict=True)):
        j = job_run(n, "greedy", "1.0", v, 1000.0)
        j.params.update(params)
        j.tags["hydra_overrides"] = " ".join(f"{k}={x}" for k, x in params.items())
        jobs.append(j)
    return sweep_data(jobs)


def _expected(data: Any) -> list[dict[str, Any]]:
    return tables.build_tables(data)["expected"].frame.to_dict("records")


def test_seed_expectations_beside_measured_ratios() -> None:
    kv = _sweep([{"backend.use_cache": c, "workload.max_new_tokens": "200"}
                 for c in ("true", "false")], [25.0, 10.0])
    (row,) = _expected(kv)
    assert row["optimization"] == "KV cache" and row["throughput_x"] == pytest.approx(2.5)
    assert "2–3x" in row["expected"] and row["verdict"] == "within the expected range"
    md = render.render_markdown(kv, render.build_sections(kv, tables.build_tables(kv)))
    section = md.split("## Against the baseline")[1].split("\n## ")[0]
    assert "2–3x faster generation" in section and "2.50" in section

    attn = _sweep([{"backend.attn_implementation": a} for a in ("eager", "sdpa", "sdpa_flash")],
                  [10.0, 10.4, 30.0])
    rows = {r["change"]: r for r in _expected(attn)}
    assert rows["backend.attn_implementation: eager → sdpa"]["verdict"].startswith(
        "within noise")
    assert rows["backend.attn_implementation: eager → sdpa_flash"]["verdict"] == (
        "within the expected range")
    assert all("1.5–3x" in r["expected"] for r in rows.values())

    batch = _sweep([{"workload.batch_size": b} for b in ("1", "4", "20")], [13.0, 28.0, 72.0])
    by = {r["job"]: r for r in _expected(batch)}
    assert by[1]["throughput_x"] == pytest.approx(28 / 13) and "2–4x" in by[1]["expected"]
    assert by[2]["verdict"] == "above the expected range"

    # a decoding sweep: no expectation speaks about it
    assert _expected(sweep_data([job_run(0, "greedy", "1.0", 10, 900),
                                 job_run(1, "topp", "1.0", 12, 800)])) == []


def test_phase3_ladder_pairs_each_step_with_its_reference() -> None:
    hf = {"backend.impl": "hf", "backend.name": "hf"}
    ladder = _sweep([
        {**hf, "backend.attn_implementation": "eager", "backend.use_cache": "false"},
        {**hf, "backend.attn_implementation": "eager", "backend.use_cache": "true"},
        {**hf, "backend.attn_implementation": "sdpa", "backend.use_cache": "true"},
        {"backend.impl": "vllm", "backend.name": "vllm", "backend.max_num_seqs": "4"},
    ], [5.4, 29.4, 30.6, 41.3])
    got = {(r["optimization"], r["job"], r["ref_job"]) for r in _expected(ladder)}
    assert got == {("KV cache", 1, 0), ("attention kernels", 2, 1), ("vLLM", 3, 0)}


def _report(tmp_path: Any, interactive_html: bool) -> str:
    data = sweep_data([job_run(0, "greedy", "1.0", 10.0, 1000.0),
                       job_run(1, "topp", "1.0", 20.0, 800.0)])
    rep = build.write_report(data, tmp_path, interactive=interactive_html)
    assert rep.images and all(p.read_bytes().startswith(b"\x89PNG") for p in rep.images.values())
    return rep.html.read_text()


@pytest.mark.skipif(not interactive.available(), reason="plotly is not installed")
def test_html_plots_are_interactive_with_plotlyjs_inlined_once(tmp_path: Any) -> None:
    page = _report(tmp_path / "i", True)
    assert page.count("window.PlotlyConfig") == 1  # plotly.js inlined once, not per figure
    assert "<script src=" not in page  # self-contained: nothing fetched
    ids = re.findall(r'Plotly\.newPlot\(\s*"([^"]+)"', page)
    assert ids == ["plot-quality_vs_diversity", "plot-throughput_vs_latency",
                   "plot-latency_distributions"]
    assert '<img alt="Quality vs diversity' not in page and "click a legend entry" in page
    md = (tmp_path / "i" / "report.md").read_text()
    assert "![" in md and "quality_vs_diversity.png" in md  # markdown keeps the PNGs
    static = _report(tmp_path / "s", False)
    # the three plots above plus the decision section's speed-vs-quality front
    assert static.count("data:image/png;base64,") == 4 and "Plotly" not in static
