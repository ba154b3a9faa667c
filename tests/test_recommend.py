"""The recommendation logic: ranking, pooling over seeds, bootstrap CIs, the SLO filter and
the "within noise" note."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from pipeline.analysis import recommend as rc


def _job(task: str, preset: str, scores: list[float], tpot: float = 50.0,
         metric: str = "ref_exact_match") -> rc.JobScores:
    return rc.JobScores(task, preset, metric,
                        {metric: sum(scores) / len(scores), "tpot_ms_mean": tpot,
                         "distinct_2": 0.5}, list(scores))


def test_bootstrap_ci_contains_the_mean_and_needs_two_values() -> None:
    xs = [0.0, 1.0] * 20
    lo, hi = rc.bootstrap_ci(xs, n_boot=500)
    assert lo < 0.5 < hi and lo > 0.25 and hi < 0.75
    assert rc.bootstrap_ci([1.0]) is None
    assert rc.bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_clear_winner_is_beyond_noise() -> None:
    recs = rc.recommend([_job("task_qa", "greedy", [1.0] * 19 + [0.0]),
                         _job("task_qa", "chatbot", [0.0] * 19 + [1.0])], n_boot=500)
    (r,) = recs
    assert r.best.preset == "greedy" and r.runner_up.preset == "chatbot"
    assert r.best.value == pytest.approx(0.95)
    assert r.within_noise is False
    assert "beyond noise" in rc.render_markdown(recs)


def test_overlapping_cis_are_within_noise() -> None:
    a = [1.0, 0.0] * 5          # 0.5
    b = [1.0, 0.0, 0.0, 1.0, 0.0] * 2  # 0.4
    recs = rc.recommend([_job("task_qa", "beam", a), _job("task_qa", "greedy", b)],
                        n_boot=500)
    r = recs[0]
    assert r.best.preset == "beam"
    assert r.within_noise is True
    md = rc.render_markdown(recs)
    assert "**within noise**" in md


def test_seeds_are_pooled_and_tasks_kept_apart() -> None:
    jobs = [_job("task_qa", "topp", [1.0, 1.0], tpot=40), _job("task_qa", "topp", [0.0, 0.0],
                                                                tpot=60),
            _job("task_code", "code", [1.0, 0.0], metric="ref_pass_at_1")]
    recs = {r.task: r for r in rc.recommend(jobs, n_boot=200)}
    topp = recs["task_qa"].best
    assert (topp.n_jobs, topp.n_requests, topp.value) == (2, 4, 0.5)
    assert topp.metrics["tpot_ms_mean"] == 50
    assert recs["task_code"].metric == "ref_pass_at_1"


def test_slo_leaves_out_slow_presets() -> None:
    jobs = [_job("task_qa", "beam", [1.0] * 4, tpot=200), _job("task_qa", "greedy", [0.0] * 4,
                                                              tpot=30)]
    (r,) = rc.recommend(jobs, slo_tpot_ms=100, n_boot=100)
    assert r.best.preset == "greedy" and [c.preset for c in r.excluded] == ["beam"]
    assert r.runner_up is None
    (none,) = rc.recommend(jobs, slo_tpot_ms=10, n_boot=100)
    assert none.best is None
    assert "no preset meets the SLO" in rc.render_markdown([none], slo_tpot_ms=10)


def test_no_per_request_scores_ranks_by_the_corpus_metric() -> None:
    a = rc.JobScores("task_translation", "beam", "ref_chrf", {"ref_chrf": 40.0})
    b = rc.JobScores("task_translation", "greedy", "ref_chrf", {"ref_chrf": 35.0})
    (r,) = rc.recommend([a, b])
    assert r.best.preset == "beam" and r.best.ci is None and r.within_noise is None
    assert "no CI" in rc.render_markdown([r])


@dataclass
class _Run:  # the fields of report.collect.JobRun that recommend reads
    status: str
    metrics: dict[str, float]
    results: dict[str, Any] | None
    tags: dict[str, str] = field(default_factory=dict)


def _results(task: str, decoding: str, scores: list[float], overrides: list[str]) -> dict:
    return {"status": "FINISHED", "overrides": overrides,
            "config": {"workload": {"name": task}, "decoding": {"name": decoding},
                       "scoring": {"reference_metrics": None,
                                   "task_reference_metrics": {task: ["f1", "exact_match"]}}},
            "requests": [{"extra": {"ref_scores": {"ref_f1": s, "ref_exact_match": s}}}
                         for s in scores]}


def test_job_scores_read_collected_runs() -> None:
    runs = [
        _Run("FINISHED", {"ref_f1": 0.5, "ref_exact_match": 0.5},
             _results("task_qa", "topp", [1.0, 0.0], ["decoding=topp", "seed=1",
                                                      "decoding.top_p=0.8"])),
        _Run("FAILED", {}, _results("task_qa", "beam", [1.0], [])),
        _Run("FINISHED", {"output_tokens_per_s": 3.0}, {"config": {}, "requests": []}),
    ]
    (js,) = rc.job_scores(runs)
    assert js.task == "task_qa" and js.metric == "ref_f1"  # the task's first metric
    assert js.preset == "topp decoding.top_p=0.8"       # seed pooled, knob kept
    assert js.per_request == [1.0, 0.0]


def test_render_lists_every_preset_with_quality_and_speed() -> None:
    md = rc.render_markdown(rc.recommend([_job("task_qa", "factual_qa", [1.0, 0.0]),
                                          _job("task_qa", "greedy", [1.0, 1.0])], n_boot=100),
                            "sweep X")
    assert "## task_qa (ref_exact_match)" in md
    assert "factual_qa (use-case preset)" in md
    assert "| 1 | greedy |" in md and "Sweep: sweep X" in md


def test_ties_go_to_the_faster_preset() -> None:
    (r,) = rc.recommend([_job("task_math", "beam", [0.0] * 4, tpot=300),
                         _job("task_math", "greedy", [0.0] * 4, tpot=60)], n_boot=100)
    assert r.best.preset == "greedy" and r.within_noise is True
    assert "tie" in rc.render_markdown([r])
