"""The gate's arithmetic on hand-made numbers, its verdict thresholds, and how a sweep's
optimized jobs find their baselines (no model loaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.analysis import gate as sweep
from pipeline.analysis import gate_rules as g
from pipeline.records import JobResult

T = g.THRESHOLDS
HF = "pipeline.backends.hf:HFBackend"


def test_perplexity_and_deltas() -> None:
    assert g.perplexity([math.log(4)] * 3) == pytest.approx(4.0)
    assert g.relative_delta(2.0, 2.1) == pytest.approx(0.05)
    assert g.relative_delta(None, 2.0) is None
    assert g.task_metric_deltas({"ref_f1": 0.5, "ppl": 3.0}, {"ref_f1": 0.4}) == {
        "ref_f1": pytest.approx(-0.1)}


def test_scored_request_count_is_not_a_task_metric() -> None:
    # one failed request in the optimized job leaves one reference unscored: a count, not
    # a quality drop, so token-identical jobs stay equivalent
    base = {"ref_exact_match": 0.5, "ref_scored_requests": 8.0}
    opt = {"ref_exact_match": 0.5, "ref_scored_requests": 7.0}
    deltas = g.task_metric_deltas(base, opt)
    assert deltas == {"ref_exact_match": 0.0}
    assert g.verdict(1.0, 0.0, 0.0, deltas)[0] == "equivalent"


def test_bleu_and_chrf_drops_are_judged_on_a_0_1_scale() -> None:
    # chrF and BLEU are 0..100: a 0.03-point drop is noise, a 5-point drop is not
    small = g.task_metric_deltas({"ref_chrf": 14.82}, {"ref_chrf": 14.79})
    assert g.verdict(1.0, 0.0, 0.0, small)[0] == "equivalent"
    big = g.task_metric_deltas({"ref_bleu": 30.0, "ref_f1": 0.5}, {"ref_bleu": 25.0,
                                                                   "ref_f1": 0.49})
    v, why = g.verdict(1.0, 0.0, 0.0, big)
    assert v == "degraded" and why.startswith("ref_bleu fell by 5.000")


@pytest.mark.parametrize(("em", "kl", "ppl", "tasks", "informative", "want"), [
    (1.0, None, None, None, True, "equivalent"),
    (0.5, T["equivalent_max_kl"] / 2, 0.0, None, True, "equivalent"),
    (0.5, T["numerics_max_kl"] / 2, T["numerics_max_ppl_delta"] / 2, None, True, "numerics"),
    (0.5, T["numerics_max_kl"] / 2, T["numerics_max_ppl_delta"] * 2, None, True, "degraded"),
    (0.5, T["numerics_max_kl"] * 2, 0.0, None, True, "degraded"),
    (1.0, 0.0, 0.0, {"ref_f1": -2 * T["max_task_metric_drop"]}, True, "degraded"),
    # KL 0 by construction (speculation): judged by tokens, then the jobs' perplexity
    (0.5, 0.0, 0.001, None, False, "numerics"),
    (0.5, 0.0, 0.5, None, False, "degraded"),
    (0.5, None, None, None, False, "unverified"),
])
def test_verdict_thresholds(em, kl, ppl, tasks, informative, want) -> None:
    assert g.verdict(em, kl, ppl, tasks, informative)[0] == want


def test_summarize_takes_parity_and_teacher_forced_figures() -> None:
    parity = {"prompts": [{"exact_match": True, "first_divergence": None},
                          {"exact_match": False, "first_divergence": 7}],
              "num_prompts": 2, "exact_matches": 1, "exact_match_rate": 0.5}
    s = g.summarize(parity, [1e-4, 3e-4], [1.0, 1.0], [1.0, 1.01], {}, {})
    assert s["first_divergence_min"] == 7
    assert s["mean_kl"] == pytest.approx(2e-4)
    assert s["ppl_delta"] == pytest.approx(math.exp(0.005) - 1)
    assert s["verdict"] == "numerics"


def _job(num: int, backend: dict, tokens: list[int], tps: float = 10.0) -> JobResult:
    base = {"name": "hf", "impl": HF, "attn_implementation": "sdpa", "compile": False,
            "quantization": None, "prompt_lookup_num_tokens": None, "dtype": None,
            "cache_implementation": "dynamic", "pad_bucket": 32}
    return JobResult(status="FINISHED", job_num=num,
                     config={"model": {"name": "m"}, "decoding": {"name": "greedy"},
                             "workload": {"batch_size": 1}, "backend": {**base, **backend},
                             "paths": {"output_dir": f"/o{num}"}},
                     overrides=[f"job={num}"], metrics={"output_tokens_per_s": tps},
                     requests=[{"index": 0, "output_token_ids": tokens}])


def test_baselines_are_found_in_the_sweep() -> None:
    jobs = [(Path(str(i)), j) for i, j in enumerate([
        _job(0, {}, [1, 2, 3]),
        _job(1, {"prompt_lookup_num_tokens": 10}, [1, 2, 3], 30.0),
        _job(2, {"quantization": "int8_dynamic"}, [1, 2, 4], 20.0),
        _job(3, {"prompt_lookup_num_tokens": 0}, [1, 2, 3]),  # off: a second baseline
    ])]
    pairs = sweep.find_pairs(jobs)
    assert sorted((b[1].job_num, o[1].job_num) for b, o in pairs) == [(0, 1), (0, 2)]
    assert not sweep.kl_informative(jobs[0][1].config, jobs[1][1].config)
    assert sweep.kl_informative(jobs[0][1].config, jobs[2][1].config)
    # a different task is no baseline
    other = _job(4, {"quantization": "int8_dynamic"}, [1])
    other.config["workload"] = {"batch_size": 4}
    assert sweep.find_pairs([jobs[0], (Path("4"), other)]) == []
    # named by scoring.reference_run
    assert [o[1].job_num for _, o in sweep.find_pairs(jobs, reference_run="1")] == [0, 2, 3]


def test_kl_is_uninformative_only_for_speculation_alone() -> None:
    base = _job(0, {}, [1]).config
    spec = _job(1, {"prompt_lookup_num_tokens": 10}, [1]).config
    spec_q = _job(2, {"prompt_lookup_num_tokens": 10, "quantization": "int8_dynamic"},
                  [1]).config
    assert not sweep.kl_informative(base, spec)
    assert sweep.kl_informative(base, spec_q)  # quantization changes the distributions
    # another backend computes differently whatever its speculative settings
    other = {**spec, "backend": {**spec["backend"], "impl": "tests.toy_backend:ToyBackend"}}
    assert sweep.kl_informative(base, other)


def test_undeclared_or_unknown_fields_count_as_task_fields() -> None:
    # a field the backend class does not declare might change anything: never ignored
    a, b = _job(0, {}, [1]).config, _job(1, {"mystery": 2}, [1]).config
    assert sweep.task_fields(b) == {"mystery": 2}
    assert sweep.comparable_key(a) != sweep.comparable_key(b)
    # an impl that cannot be imported: every field is a task field
    c = {**a, "backend": {**a["backend"], "impl": "nosuch.module:Backend"}}
    assert sweep.task_fields(c)["attn_implementation"] == "sdpa"
    assert sweep.optimizations_on(c) == {}


def test_sweep_gate_writes_gate_json_without_loading_a_model(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    for i, j in enumerate([_job(0, {}, [1, 2, 3]),
                           _job(1, {"prompt_lookup_num_tokens": 10}, [1, 2, 3], 30.0)]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(j.to_dict()))
    cfg = OmegaConf.create({"scoring": {"reference_run": None, "gate_max_requests": 4},
                            "paths": {"cache_dir": str(tmp_path)},
                            "tracking": {"enabled": False}})
    out = sweep.report_sweep_gate(cfg, tmp_path)
    assert out is not None and (tmp_path / sweep.GATE_FILE).is_file()
    (p,) = out["pairs"]
    assert p["verdict"] == "equivalent" and p["speedup"] == pytest.approx(3.0)
    assert p["optimizations"] == {"prompt_lookup_num_tokens": 10}


def test_report_table_lists_gated_jobs_only() -> None:
    from pipeline.report import gate_table as report_gate
    from pipeline.report.collect import JobRun, SweepData

    def run(job: int, tags: dict, metrics: dict) -> JobRun:
        return JobRun(run_id=f"r{job}", name=f"{job}-hf", job=job, status="FINISHED",
                      start_time=0, tags=tags, params={}, metrics=metrics)

    data = SweepData(tracking_uri="sqlite:///x", experiment_id="1", experiment_name="e",
                     parent_id="p", parent_name="p", parent_status="FINISHED",
                     parent_start_time=0, parent_tags={}, jobs=[
                         run(0, {}, {"output_tokens_per_s": 10.0}),
                         run(1, {"gate_verdict": "degraded", "gate_baseline_job": "0",
                                 "gate_optimizations": "quantization=int8_dynamic"},
                             {"output_tokens_per_s": 30.0, "gate.speedup": 3.0,
                              "gate.exact_match_rate": 0.0, "gate.mean_kl": 1.5,
                              "gate.ppl_delta": 5.0, "gate.first_divergence_min": 0.0})])
    df = report_gate.table(data)
    assert list(df["job"]) == [1]
    row = df.iloc[0]
    assert (row["verdict"], row["tok/s ×"], row["mean KL"], row["first divergence"]) == (
        "degraded", "3.00", "1.50e+00", "0")
    assert report_gate.sections(SweepData(**{**data.__dict__, "jobs": data.jobs[:1]})) == []
