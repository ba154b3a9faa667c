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


# --- grouping by what the sweep varied, more SLOs, speed sweeps, the gate ---------------

def _config(task: str, decoding: str, seed: int = 0, backend: str = "hf",
            max_num_seqs: int = 8) -> dict:
    """A job config shaped like results.json's: task workloads differ in their own fields,
    presets in theirs, seeds in the bookkeeping (seed, backend.seed, paths)."""
    dec = {"greedy": {"do_sample": False, "temperature": 1.0},
           "topp": {"do_sample": True, "temperature": 0.7}}[decoding]
    return {"model": {"name": "smollm2-135m", "dtype": "float32"},
            "backend": {"name": backend, "impl": "engine" if backend == "vllm" else "hf",
                        "max_num_seqs": max_num_seqs, "seed": seed, "log_dir": f"/o/{seed}"},
            "decoding": {"name": decoding, **dec},
            "workload": {"name": task, "prompts_file": f"data/{task}.jsonl",
                         "max_new_tokens": 64 if task == "task_qa" else 256, "repeats": 1},
            "scoring": {"reference_metrics": None,
                        "task_reference_metrics": {"task_qa": ["exact_match"],
                                                   "task_code": ["pass_at_1"]}},
            "paths": {"output_dir": f"/o/{seed}"}, "tracking": {"enabled": True}, "seed": seed}


def _run(config: dict, overrides: list[str], metrics: dict[str, float],
         scores: list[float] | None = None, verdict: str = "") -> _Run:
    metric = ("ref_exact_match" if config["workload"]["name"] == "task_qa"
              else "ref_pass_at_1")
    reqs = [{"extra": {"ref_scores": {metric: s}}} for s in scores or []]
    if scores:
        metrics = {metric: sum(scores) / len(scores), **metrics}
    return _Run("FINISHED", metrics, {"status": "FINISHED", "overrides": overrides,
                                      "config": config, "requests": reqs},
                {"gate_verdict": verdict} if verdict else {})


def _decoding_sweep() -> list[_Run]:
    runs = []
    for task in ("task_qa", "task_code"):
        for i, (preset, sc) in enumerate((("greedy", [1.0, 1.0, 0.0]),
                                          ("topp", [1.0, 0.0, 0.0]))):
            for seed in (0, 1):
                knob = ["decoding.top_p=0.8"] if preset == "topp" else []
                runs.append(_run(_config(task, preset, seed),
                                 [f"workload={task}", f"decoding={preset}", f"seed={seed}",
                                  *knob],
                                 {"tpot_ms_mean": 40.0 + 10 * i + seed,
                                  "output_tokens_per_s": 20.0 - i, "distinct_2": 0.5},
                                 sc))
    return runs


#: the markdown the parent commit rendered for _decoding_sweep() (n_boot=200): a decoding
#: sweep must keep rendering exactly this
DECODING_MD = "\n".join([
    '# Decoding recommendations per use case',
    '',
    'Sweep: sweep S',
    '',
    'Task metric: the first reference metric of the task; 95% bootstrap CI over per-request s'
    'cores (pooled over seeds/repeats).',
    '',
    '| use case | metric | best preset | score [95% CI] | runner-up | score [95% CI] | note |'
    ' distinct-2 | self-BLEU | TPOT ms | out tok/s |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
    '| task_code | ref_pass_at_1 | greedy | 0.667 [0.167, 1.000] | topp decoding.top_p=0.8 | '
    '0.333 [0.000, 0.667] | **within noise**: best and runner-up CIs overlap | 0.500 | - | 40'
    '.5 | 20.0 |',
    '| task_qa | ref_exact_match | greedy | 0.667 [0.167, 1.000] | topp decoding.top_p=0.8 | '
    '0.333 [0.000, 0.667] | **within noise**: best and runner-up CIs overlap | 0.500 | - | 40'
    '.5 | 20.0 |',
    '',
    '## task_code (ref_pass_at_1)',
    '',
    '| rank | preset | score [95% CI] | n | jobs | ref_pass_at_1 | distinct-2 | self-BLEU | T'
    'POT ms | out tok/s |',
    '|---|---|---|---|---|---|---|---|---|---|',
    '| 1 | greedy | 0.667 [0.167, 1.000] | 6 | 2 | 0.667 | 0.500 | - | 40.5 | 20.0 |',
    '| 2 | topp decoding.top_p=0.8 | 0.333 [0.000, 0.667] | 6 | 2 | 0.333 | 0.500 | - | 50.5 '
    '| 19.0 |',
    '',
    '## task_qa (ref_exact_match)',
    '',
    '| rank | preset | score [95% CI] | n | jobs | ref_exact_match | distinct-2 | self-BLEU |'
    ' TPOT ms | out tok/s |',
    '|---|---|---|---|---|---|---|---|---|---|',
    '| 1 | greedy | 0.667 [0.167, 1.000] | 6 | 2 | 0.667 | 0.500 | - | 40.5 | 20.0 |',
    '| 2 | topp decoding.top_p=0.8 | 0.333 [0.000, 0.667] | 6 | 2 | 0.333 | 0.500 | - | 50.5 '
    '| 19.0 |',
    '',
])


def test_a_decoding_sweep_renders_as_before() -> None:
    runs = _decoding_sweep()
    assert rc.grouping_keys(runs) == ["decoding"]  # not workload.*, seed, paths, backend.seed
    md = rc.render_markdown(rc.recommend(rc.job_scores(runs), n_boot=200), "sweep S",
                            by=rc.grouping_keys(runs))
    assert md == DECODING_MD
    # a swept knob of one preset (decoding.top_p=0.8,0.9) still leaves presets as the label
    knobs = [_config("task_qa", "topp"), _config("task_qa", "topp"), _config("task_qa", "greedy")]
    knobs[0]["decoding"]["top_p"], knobs[1]["decoding"]["top_p"] = 0.8, 0.9
    assert rc.varying_keys(knobs) == ["decoding"]


def test_an_engine_key_is_the_candidate_and_seeds_are_pooled() -> None:
    runs = [_run(_config("task_qa", "greedy", seed, "vllm", n),
                 ["backend=vllm", f"backend.max_num_seqs={n}", f"seed={seed}"],
                 {"tpot_ms_mean": 100.0 / n, "output_tokens_per_s": 10.0 * n}, [1.0, 0.0])
            for n in (4, 8) for seed in (0, 1)]
    assert rc.grouping_keys(runs) == ["backend.max_num_seqs"]
    (r,) = rc.recommend(rc.job_scores(runs), n_boot=100)
    by_label = {c.preset: c for c in r.ranked}
    assert set(by_label) == {"backend.max_num_seqs=4", "backend.max_num_seqs=8"}
    assert [(c.n_jobs, c.n_requests) for c in by_label.values()] == [(2, 4), (2, 4)]
    assert r.best.preset == "backend.max_num_seqs=8"  # equal scores: the faster one first
    md = rc.render_markdown([r], by=["backend.max_num_seqs"])
    assert md.startswith("# Recommendations per use case (by backend.max_num_seqs)")
    assert "| best candidate |" in md and "| 1 | backend.max_num_seqs=8 |" in md


def test_a_backend_group_stands_for_its_keys_and_by_overrides_the_default() -> None:
    runs = [_run(_config("task_qa", "greedy", 0, b, n), [f"backend={b}",
                                                         f"backend.max_num_seqs={n}"],
                 {"tpot_ms_mean": 10.0}, [1.0])
            for b in ("hf", "vllm") for n in (4, 8)]
    # backend.impl differs only with the name; max_num_seqs differs within one backend too
    assert rc.grouping_keys(runs) == ["backend", "backend.max_num_seqs"]
    labels = {js.preset for js in rc.job_scores(runs)}
    assert "backend=vllm backend.max_num_seqs=4" in labels and len(labels) == 4
    pooled = rc.job_scores(runs, ["backend.name"])
    assert {js.preset for js in pooled} == {"backend.name=hf", "backend.name=vllm"}
    with pytest.raises(rc.ConfigError, match=r"'backend\.max_seqs'.*allowed.*backend"):
        rc.job_scores(runs, ["backend.max_seqs"])
    # backend files that share `name: hf` (hf_baseline, hf_kv) go by the option picked
    ladder = []
    for option, use_cache in (("hf_baseline", False), ("hf_kv", True)):
        cfg = _config("task_qa", "greedy")
        cfg["backend"]["use_cache"] = use_cache
        run = _run(cfg, [f"backend={option}"], {"tpot_ms_mean": 10.0}, [1.0])
        run.results["choices"] = {"backend": option, "decoding": "greedy"}
        ladder.append(run)
    assert rc.grouping_keys(ladder) == ["backend"]
    assert [js.preset for js in rc.job_scores(ladder)] == ["backend=hf_baseline",
                                                          "backend=hf_kv"]


def _lat(ttft: float, tpot: float, e2el: float, rate: float | None = None) -> dict:
    m = {"ttft_ms_p90": ttft, "tpot_ms_p90": tpot, "e2el_ms_p90": e2el, "tpot_ms_mean": 1.0}
    return m | ({"max_rate_under_slo": rate} if rate is not None else {})


def test_each_slo_bound_excludes_and_says_which_it_broke() -> None:
    jobs = [rc.JobScores("task_qa", name, "ref_f1", {"ref_f1": score, **m})
            for name, score, m in (("ok", 0.1, _lat(100, 10, 900, 5.0)),
                                   ("ttft", 0.9, _lat(600, 10, 900, 5.0)),
                                   ("tpot", 0.8, _lat(100, 60, 900, 5.0)),
                                   ("e2el", 0.7, _lat(100, 10, 3000, 5.0)),
                                   ("rate", 0.6, _lat(100, 10, 900, 1.5)),
                                   ("no_rate", 0.5, _lat(100, 10, 900)))]
    bounds = rc.SloBounds(ttft_ms=500, tpot_ms=50, e2el_ms=2000, percentile=90, min_rate=2)
    (r,) = rc.recommend(jobs, bounds=bounds)
    assert [c.preset for c in r.ranked] == ["ok"]
    assert {c.preset: c.broke for c in r.excluded} == {
        "ttft": ["ttft_ms_p90 600.0 > 500 ms"], "tpot": ["tpot_ms_p90 60.0 > 50 ms"],
        "e2el": ["e2el_ms_p90 3000.0 > 2000 ms"],
        "rate": ["max_rate_under_slo 1.50 < 2 req/s"],
        "no_rate": ["max_rate_under_slo not logged"]}
    md = rc.render_markdown([r], bounds=bounds)
    assert ("SLO: p90 TTFT <= 500 ms, p90 TPOT <= 50 ms, p90 E2EL <= 2000 ms, "
            "max_rate_under_slo >= 2 req/s.") in md
    assert "| SLO x | ttft |" in md and "ttft (ttft_ms_p90 600.0 > 500 ms)" in md
    # the mean by default, as --slo-tpot-ms always was
    (mean,) = rc.recommend(jobs, bounds=rc.SloBounds(tpot_ms=0.5))
    assert mean.best is None and mean.excluded[0].broke == ["tpot_ms_mean 1.0 > 0.5 ms"]
    with pytest.raises(rc.ConfigError, match="--slo-percentile: 95 .*50, 90, 99"):
        rc.SloBounds(ttft_ms=1, percentile=95)


def test_bad_bounds_exit_2_before_reading_the_sweep(capsys: pytest.CaptureFixture) -> None:
    assert rc.main(["--sweep-dir", "/nonexistent", "--slo-ttft-ms", "-5"]) == 2
    assert "--slo-ttft-ms: -5.0 is not allowed; it must be > 0" in capsys.readouterr().err


def _speed_run(label: str, seed: int, tps: float, ci95: float | None = None,
               verdict: str = "") -> _Run:
    m = {"output_tokens_per_s": tps, "tpot_ms_mean": 1000 / tps}
    if ci95 is not None:
        m |= {"output_tokens_per_s_repeat_mean": tps, "output_tokens_per_s_ci95": ci95}
    cfg = _config("synthetic", "greedy", seed, "vllm")
    cfg["backend"]["enable_prefix_caching"] = label == "pc"
    return _run(cfg, [f"backend.enable_prefix_caching={label == 'pc'}", f"seed={seed}"], m,
                verdict=verdict)


def test_a_speed_sweep_ranks_by_output_tokens_per_s() -> None:
    runs = [_speed_run("pc", 0, 30.0, 3.0), _speed_run("pc", 1, 34.0, 4.0),
            _speed_run("off", 0, 25.0)]
    scores = rc.job_scores(runs)
    assert {js.metric for js in scores} == {"output_tokens_per_s"}
    (r,) = rc.recommend(scores)
    assert r.best.preset == "backend.enable_prefix_caching=True"
    assert r.best.value == 32.0 and r.best.ci == pytest.approx((29.5, 34.5))  # sqrt(9+16)/2
    assert r.runner_up.ci is None and r.within_noise is None
    md = rc.render_markdown([r], by=rc.grouping_keys(runs))
    assert "Ranked by output tokens/s (higher is better): the sweep has no task metric" in md
    assert "32.0 [29.5, 34.5]" in md and "25.0 (single measurement)" in md


def test_a_degraded_job_is_excluded_as_fast_but_wrong() -> None:
    runs = [_speed_run("pc", 0, 90.0, verdict="degraded"), _speed_run("pc", 1, 95.0),
            _speed_run("off", 0, 25.0, verdict="equivalent")]
    (r,) = rc.recommend(rc.job_scores(runs))
    assert [c.preset for c in r.ranked] == ["backend.enable_prefix_caching=False"]
    (bad,) = r.excluded
    assert bad.broke == ["gate verdict degraded: fast but wrong"] and bad.n_jobs == 2
    md = rc.render_markdown([r], by=["backend.enable_prefix_caching"])
    assert "| excluded | backend.enable_prefix_caching=True |" in md
    assert "fast but wrong" in md
