"""The metric catalog covers every metric the pipeline logs, and docs/metrics.md is its
rendering.

What MLflow holds after real runs is checked where those runs already happen (a plain job:
test_robustness.py, a stub load profile: test_profile_capacity.py, a gate sweep:
test_mlflow_resume.py, a sweep with repeats: test_report.py), each with
``uncovered(logged_metric_keys(...))``. Here: the checker itself (it fails when a row is
removed), the keys the metric functions produce on hand-made inputs, and the docs file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.metrics import catalog
from pipeline.metrics.catalog import ENTRIES, Entry, entry_for, pattern_regex, uncovered
from pipeline.records import RequestRecord
from tests.conftest import ROOT

#: a sample value for each named placeholder, to build a key a pattern row stands for
SAMPLE = {"stat": "p99", "phase": "generate", "name": "my_metric", "N": "3",
          "headline": "ttft_ms_mean", "figure": "mean_kl"}


def sample_key(name: str) -> str:
    """A concrete key the catalog name stands for (``<a|b>``: its last word)."""
    return re.sub(r"<([^<>]+)>",
                  lambda m: SAMPLE.get(m.group(1)) or m.group(1).split("|")[-1], name)


def test_every_row_covers_its_own_keys_and_removing_it_uncovers_them() -> None:
    """Each row is reached by a key of its own (no earlier row shadows it), and the checker,
    given the catalog without that row, reports the key: a deleted row fails the tests.
    The exception are the shipped ``ref_*`` metrics, rows of their own that refine the
    ``ref_<name>`` family (any ``evaluate`` module): without their row the family holds."""
    refined = []
    for row in ENTRIES:
        key = sample_key(row.name)
        assert entry_for(key) is row, (row.name, key, entry_for(key))
        without = tuple(e for e in ENTRIES if e is not row)
        family = entry_for(key, without)
        if family is None:
            assert uncovered([key], without) == [key], row.name
        else:
            assert "<" in family.name and "<" not in row.name, (row.name, family.name)
            refined.append(f"{row.name} in {family.name}")
    assert refined == [f"ref_{m} in ref_<name>" for m in ("exact_match", "f1", "bleu",
                                                         "chrf", "rougeL", "pass_at_1",
                                                         "scored_requests")]


def test_checker_names_uncovered_keys_only() -> None:
    """Known keys pass, unknown ones are listed once, sorted; patterns match whole keys."""
    keys = ["ttft_ms_p99", "time_generate_s", "ref_my_metric", "gate.job12.ref_f1",
            "job0.perplexity", "load.itl_ms_p50", "nosuch_metric", "ttft_ms_p95",
            "time_generate_s_extra", "nosuch_metric"]
    assert uncovered(keys) == ["nosuch_metric", "time_generate_s_extra", "ttft_ms_p95"]
    assert uncovered(["ttft_ms_mean"], (Entry("ttft_ms_<stat>", "ms", "d", "lower", "s", "g"),
                                        )) == []
    assert uncovered(["ttft_ms_mean"], ()) == ["ttft_ms_mean"]


def test_unknown_placeholder_is_refused() -> None:
    with pytest.raises(ValueError, match=r"<stats>.*allowed: <stat>"):
        pattern_regex("ttft_ms_<stats>")


def test_rows_are_complete() -> None:
    """Every row has a unit (or none on purpose: a ratio), a definition, a known direction,
    a known group, a unique name and a source naming files (and functions) that exist."""
    names = [e.name for e in ENTRIES]
    assert len(names) == len(set(names))
    for e in ENTRIES:
        assert e.definition.strip() and e.source.strip(), e.name
        assert e.direction in (catalog.LOWER, catalog.HIGHER, catalog.NEUTRAL), e.name
        assert e.group in catalog.GROUPS, e.name
        refs = re.findall(r"(pipeline/(?:\w+/)*(?:\w+\.py)?)(?:: (\w+))?", e.source)
        assert refs, e.name
        for path, name in refs:
            assert (ROOT / path).exists(), f"{e.name}: source {path} does not exist"
            if name:  # a function or class of that module
                assert re.search(rf"^(?:def|class) {name}\b", (ROOT / path).read_text(),
                                 re.M), f"{e.name}: no {name} in {path}"


def _rec(i: int, t0: float, first: float, end: float, n: int, **extra: float) -> RequestRecord:
    times = [first + k * (end - first) / max(n - 1, 1) for k in range(n)]
    return RequestRecord(index=i, prompt="p", text="x", prompt_tokens=5,
                         output_token_ids=list(range(n)), t_start=t0, t_first_token=first,
                         t_end=end, token_times=times, extra=dict(extra))


def test_the_metric_functions_produce_only_catalogued_keys() -> None:
    """Latency, throughput, batching, goodput, schedule and load-point figures on
    hand-made timelines, the roofline's machine figures and the parent's summary."""
    from pipeline.measure.roofline import rates_metrics
    from pipeline.metrics import performance as perf
    from pipeline.serving import points as pts
    from pipeline.tracking.sweep import parent_summary

    recs = [_rec(0, 0.0, 0.1, 0.5, 4, t_scheduled=0.0, dispatch_lag_s=0.001),
            _rec(1, 0.0, 0.2, 0.9, 6, t_scheduled=0.05, dispatch_lag_s=0.002)]
    slo = {"ttft_ms": 500.0, "tpot_ms": 200.0, "e2el_ms": 2000.0}
    keys = {*perf.latency_metrics(recs), *perf.throughput_metrics(recs, 1.0),
            *perf.batch_phase_metrics(recs), *perf.goodput(recs, 1.0, slo)}
    assert set(perf.summarize([1.0, 2.0])) == set(catalog.STATS)
    assert {"itl_ms_p99", "decode_tokens_per_s", "prefill_s_mean", "goodput_fraction"} <= keys
    limits = {"max_client_cpu_percent": 90.0, "max_dispatch_lag_ms": 50.0,
              "saturation_rate_ratio": 0.9}
    point = pts.summarize_point(0, "rate", 2.0, None, recs, 1.0, 2, slo, 90.0, 5.0, limits,
                                engine={"engine_kv_cache_usage_max": 0.5,
                                        "engine_requests_waiting_max": 1.0,
                                        "engine_requests_running_max": 2.0,
                                        "engine_preemptions": 0.0,
                                        "engine_prefix_cache_hit_rate": 0.1})
    keys |= set(pts.summary_metrics([point], "sweep", None))
    curve = pts.curve_metrics(point)
    assert len(curve) > 20
    keys |= set(curve) | {f"load.{k}" for k in pts.CURVE_KEYS}
    rec = {"runs": 9, "measured_at_epoch": 1.0, "load_avg_1m": 0.1, "others_cpu_share": 0.0,
           "own_cpu_share": 1.0, "bandwidth_bytes_per_s_median": 1e9}
    keys |= set(rates_metrics({"bandwidth_bytes_per_s": 1e10, "matmul_flops_per_s": 1e11,
                               "bandwidth": rec, "matmul": rec}))
    rows = [{"job": 0, "status": "FINISHED", "metrics": {k: 1.0 for k in catalog.HEADLINE}}]
    keys |= set(parent_summary(rows, {"sweep_wall_s": 1.0, "sweep_generate_s": 0.5,
                                      "sweep_generate_share": 0.5, "sweep_engine_starts": 1.0,
                                      "sweep_engine_jobs": 2.0}))
    assert uncovered(keys) == []


def test_gate_figures_are_catalogued() -> None:
    """Every ``gate.*`` figure of a pair, on the job and as ``gate.job<N>.*`` on the parent."""
    from pipeline.analysis.gate import gate_metrics

    pair = {"exact_match_rate": 0.5, "first_divergence_min": 3, "mean_kl": 1e-3,
            "max_kl": 1e-2, "ppl_delta": 0.01, "speedup": 1.5, "verdict": "numerics",
            "task_metric_deltas": {"ref_f1": -0.01, "ref_my_metric": 0.0}}
    figures = gate_metrics(pair)
    assert len(figures) == 9
    parent = {f"gate.job4.{k.removeprefix('gate.')}" for k in figures}
    assert uncovered([*figures, *parent]) == []


def test_docs_metrics_md_is_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/metrics.md is what the catalog renders (regenerate: ``python -m
    pipeline.metrics.catalog``)."""
    assert catalog.main(["--check"]) == 0, capsys.readouterr().err


def test_check_fails_on_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    out = tmp_path / "metrics.md"
    assert catalog.main(["--check", "--out", str(out)]) == 1  # missing
    assert catalog.main(["--out", str(out)]) == 0
    assert catalog.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text().replace("`ttft_ms_<stat>`", "`ttft`"))
    assert catalog.main(["--check", "--out", str(out)]) == 1
    assert "python -m pipeline.metrics.catalog" in capsys.readouterr().err
    text = out.read_text()
    for e in ENTRIES[1:]:
        assert f"`{e.name}`".replace("|", "\\|") in text
