"""The report's decision section: the Pareto front over speed, quality and cost, the
recommendations and their noise notes, degraded jobs drawn but never recommended."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.measure.energy import NOT_MEASURED
from pipeline.report import decision
from pipeline.report.build import write_report
from tests.conftest import job_run, sweep_data


def test_pareto_front_hand_worked() -> None:
    # (speed tok/s, quality, USD/Mtok): higher, higher, lower is better
    pts = [(100, 0.8, 3.0),   # A: on the front
           (80, 0.9, 3.75),   # B: slower but better quality: on the front
           (60, 0.7, 5.0),    # C: A beats it on every axis
           (100, 0.8, 3.0),   # D: A's tie: equal points do not dominate each other
           (150, 0.95, 2.0)]  # E: degraded; beats all, but it is not eligible
    higher = (True, True, False)
    assert decision.pareto_front(pts, higher, [True, True, True, True, False]) == [
        True, True, False, True, False]
    # were E eligible it would be the whole front: the mask is what keeps A, B, D
    assert decision.pareto_front(pts, higher) == [False, False, False, False, True]
    # equal on two axes, better on one: dominated
    assert decision.pareto_front([(1, 1), (1, 2)], (True, True)) == [False, True]


def _gate_sweep(**tps_ci: tuple[float, float]) -> list:
    """Job 0 the baseline; job 1 an equivalent optimization; job 2 a degraded one (fastest
    and it would lead on every axis); job 3 another decoding, slower."""
    gated = {"gate_baseline_job": "0"}
    jobs = [job_run(0, "greedy", "1.0", 10.0, 900),
            job_run(1, "greedy", "1.0", 20.0, 450, **{"gate.ppl_delta": 0.001}),
            job_run(2, "greedy", "1.0", 40.0, 200, **{"gate.ppl_delta": -0.5}),
            job_run(3, "topp", "0.7", 5.0, 1800)]
    jobs[1].tags.update(gated, gate_verdict="equivalent")
    jobs[2].tags.update(gated, gate_verdict="degraded")
    for j in jobs:
        j.metrics.pop("perplexity")  # the gate's figure is the quality axis here
        if str(j.job) in tps_ci:
            mean, ci = tps_ci[str(j.job)]
            j.metrics.update(output_tokens_per_s_repeat_mean=mean, output_tokens_per_s_ci95=ci)
    return jobs


def test_degraded_job_is_drawn_but_never_recommended() -> None:
    jobs = _gate_sweep()
    d = decision.decide(jobs)
    assert [a.key for a in d.axes] == ["output_tokens_per_s", "gate.ppl_delta"]
    # job 0 (baseline, |delta| 0) is on the front: job 1 is faster but 0.1% further off
    # job 3 has no gate figure (not gated, no one's baseline): not ranked at all
    assert d.front == {"run0": True, "run1": True, "run2": False}
    picks = {o: (i, t) for o, i, t in d.picks}
    assert picks["fastest"][0] == "run1" and picks["best quality"][0] == "run0"
    assert "single measurement" in picks["fastest"][1] and "repeats >= 2" in picks["fastest"][1]
    assert "no 95% CI for this figure" in picks["best quality"][1]
    assert "cheapest" not in picks  # not priced


def test_within_noise_from_overlapping_cis_and_cost_axis() -> None:
    jobs = _gate_sweep(**{"0": (10.0, 1.0), "1": (20.0, 1.0), "3": (5.0, 0.5)})
    for j in jobs:  # $1.20/h: USD per Mtok = 1.2 / (3600 x tok/s) x 1e6
        j.metrics["usd_per_million_output_tokens"] = 1.2 / (3600 * j.metrics[
            "output_tokens_per_s"]) * 1e6
    d = decision.decide(jobs)
    assert [a.key for a in d.axes][-1] == "usd_per_million_output_tokens"
    picks = {o: (i, t) for o, i, t in d.picks}
    assert picks["cheapest"][0] == "run1"  # 16.67 USD/Mtok against job 0's 33.33
    assert "ahead beyond noise" in picks["fastest"][1]
    # now job 0's interval reaches job 1's: within noise, named
    jobs[0].metrics["output_tokens_per_s_ci95"] = 9.5
    picks = {o: (i, t) for o, i, t in decision.decide(jobs).picks}
    assert "within noise of job 0" in picks["fastest"][1]
    assert "within noise of job 0" in picks["cheapest"][1]


def test_report_has_the_section_with_plot_and_lines(tmp_path: Path) -> None:
    data = sweep_data(_gate_sweep())
    rep = write_report(data, tmp_path / "r", interactive=False)
    md = rep.markdown_text
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert titles[:2] == ["## Summary", "## Which configuration?"]
    part = md.split("## Which configuration?")[1].split("\n## ")[0]
    assert "- fastest: job 1" in part and "- best quality: job 0" in part
    row2 = next(line for line in part.splitlines() if line.startswith("| 2 |"))
    assert "degraded: never recommended" in row2
    assert "missing a figure" in next(line for line in part.splitlines()
                                      if line.startswith("| 3 |"))
    assert NOT_MEASURED in part and "cost: not priced" in part
    assert (tmp_path / "r" / f"{decision.IMAGE}.png").stat().st_size > 0
    assert f"{decision.IMAGE}.png" in md


@pytest.mark.parametrize(("metrics", "key"), [
    ({"ref_f1": 0.5, "ref_exact_match": 0.2}, "ref_exact_match"),
    ({"ref_scored_requests": 3.0}, "perplexity"),
])
def test_quality_axis_prefers_the_task_metric(metrics: dict, key: str) -> None:
    jobs = [job_run(0, "greedy", "1.0", 10.0, 900, **metrics),
            job_run(1, "topp", "0.7", 12.0, 800, **metrics)]
    axis = decision.quality_axis(jobs)
    assert axis is not None and axis.key == key
