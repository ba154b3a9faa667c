"""Searching instead of sweeping a grid (``hydra/sweeper=optuna``): the search-space parser,
what a job's result and its quality verdict mean to its trial, the best trial(s), a real
search of hf jobs end to end (search.json, the MLflow parent, a failed trial, the best
trial rerun with repeats, the per-trial gate on its job folders, resuming), and vLLM's
scheduler keys reaching the engine. The search_vllm preset is dry-run by
tests/test_robustness.py with every other preset."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CACHE_DIR, run_cli

optuna = pytest.importorskip("optuna")


def _parse(*lines: str) -> tuple[dict[str, Any], list[str]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.infersweep_optuna.space import parse_space

    return parse_space(OverridesParser.create().parse_overrides(list(lines)))


def test_search_space_from_override_grammar() -> None:
    """Each sweep form becomes the distribution worked out by hand; fixed overrides and
    Hydra's own settings stay out of the space; a categorical keeps each choice's text."""
    from optuna.distributions import CategoricalDistribution as C
    from optuna.distributions import FloatDistribution as F
    from optuna.distributions import IntDistribution as I

    space, fixed = _parse(
        "workload.batch_size=choice(1,2,4)", "backend=hf,hf_kv", "a.n=range(1,9)",
        "a.even=range(0,10,2)", "a.p=interval(0.1,1.0)", "a.k=int(interval(1,64))",
        "a.lr=tag(log, interval(0.001,1.0))", "+a.new=choice(x,y)", "a.flag=true,false",
        "workload.max_new_tokens=4", "hydra.sweeper.n_trials=3")
    assert fixed == ["workload.max_new_tokens=4", "hydra.sweeper.n_trials=3"]
    d = {k: p.distribution for k, p in space.items()}
    assert d["workload.batch_size"] == C((1, 2, 4))
    assert d["backend"] == C(("hf", "hf_kv"))
    assert d["a.n"] == I(1, 8)
    assert d["a.even"] == I(0, 8, step=2)
    assert d["a.p"] == F(0.1, 1.0)
    assert d["a.k"] == I(1, 64)
    assert d["a.lr"] == F(0.001, 1.0, log=True)
    assert d["a.flag"] == C((True, False))
    # the override a trial's value becomes: "+" kept, yaml's spelling of true
    assert space["a.new"].override("y") == "+a.new=y"
    assert space["a.flag"].override(True) == "a.flag=true"
    assert space["a.n"].override(7) == "a.n=7"


def test_search_settings_refused_in_one_line() -> None:
    """What Optuna cannot search, a grid over a continuous range and an unknown sampler are
    refused naming the override or the key."""
    from hydra_plugins.infersweep_optuna.space import grid_space, make_sampler
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"a.p=interval\(1.0,0.5\) is invalid: the interv"):
        _parse("a.p=interval(1.0,0.5)")
    with pytest.raises(ConfigError, match="log-scale interval must start above 0"):
        _parse("a.p=tag(log, interval(0,1.0))")
    space, _ = _parse("a.p=interval(0.1,1.0)", "b=choice(1,2)")
    with pytest.raises(ConfigError, match="sampler='grid' is invalid: a.p is a continuous"):
        grid_space(space)
    assert grid_space(_parse("b=choice(1,2)", "c=range(1,4)")[0]) == {"b": [1, 2],
                                                                      "c": [1, 2, 3]}
    with pytest.raises(ConfigError, match="sampler='cma' is invalid: allowed values are tpe"):
        make_sampler("cma", 0, space)


def test_search_section_validated() -> None:
    """Metric names must be catalog names (pattern rows included), directions
    maximize|minimize, a constraint needs a bound or a known verdict (and then a fixed
    baseline), rerun_best is 0 or >= 2 with one objective."""
    from pipeline.config.schemas import SearchConfig, SearchConstraint, SearchObjective
    from pipeline.config.validation import validate_search
    from pipeline.errors import ConfigError

    validate_search(SearchConfig([SearchObjective("ttft_ms_p90", "minimize")],
                                 [SearchConstraint("peak_rss_bytes", max=2e9)]))
    validate_search(SearchConfig(constraints=[SearchConstraint(gate_verdict_not="degraded")],
                                 rerun_best=3), reference_run="0")
    two = [SearchObjective("ttft_ms_p90", "minimize"), SearchObjective()]
    for cfg, needle in (
        (SearchConfig([SearchObjective("tokens_per_s")]),
         "search.objectives[0].metric='tokens_per_s' is invalid: not a metric name"),
        (SearchConfig([SearchObjective("ttft_ms_p90", "lowest")]),
         "search.objectives[0].direction='lowest' is invalid: allowed values are maximize"),
        (SearchConfig([]), "search.objectives=[] is invalid"),
        (SearchConfig(constraints=[SearchConstraint("ttft_ms_p90")]),
         "search.constraints[0].max=None is invalid: give max and/or min"),
        (SearchConfig(constraints=[SearchConstraint(gate_verdict_not="bad")]),
         "search.constraints[0].gate_verdict_not='bad' is invalid: allowed values are "
         "equivalent, numerics, degraded, unverified"),
        (SearchConfig(constraints=[SearchConstraint(gate_verdict_not="degraded")]),
         "scoring.reference_run=None is invalid: search.constraints[0].gate_verdict_not "
         "needs a fixed baseline"),
        (SearchConfig(constraints=[SearchConstraint("ttft_ms_p90", max=1.0,
                                                    gate_verdict_not="degraded")]),
         "search.constraints[0].metric='ttft_ms_p90' is invalid: a constraint is either"),
        (SearchConfig(rerun_best=1), "search.rerun_best=1 is invalid: use 0 (off) or a "
                                     "repeat count >= 2"),
        (SearchConfig(two, rerun_best=2), "search.rerun_best=2 is invalid: 2 objectives "
                                          "have a Pareto front"),
    ):
        with pytest.raises(ConfigError) as e:
            validate_search(cfg, reference_run=None)
        assert needle in str(e.value)


def test_verdict_constraint_and_rerun_overrides() -> None:
    """A ``gate_verdict_not`` constraint breaks (1.0) on the banned verdict and on a trial
    that could not be judged, keeps (0.0) on any other verdict, next to metric bounds; the
    rerun's overrides are the fixed ones without their repeats, the best trial's, then the
    repeats; its search.json block keeps the objective and its interval as logged."""
    from pipeline.analysis.search import job_outcome, rerun_overrides, rerun_result
    from pipeline.config.schemas import SearchConfig, SearchConstraint, SearchObjective

    s = SearchConfig([SearchObjective("output_tokens_per_s")],
                     [SearchConstraint("ttft_ms_p90", max=500.0),
                      SearchConstraint(gate_verdict_not="degraded")])
    job = {"status": "FINISHED", "metrics": {"output_tokens_per_s": 9.0, "ttft_ms_p90": 100}}
    for verdict, feasible in (("equivalent", True), ("numerics", True), ("unverified", True),
                              ("degraded", False), (None, False)):
        out = job_outcome(job, s, {"verdict": verdict, "reason": "why", "mean_kl": 0.1})
        assert out.feasible is feasible and out.values == [9.0]
        assert out.constraints == [-400.0, 0.0 if feasible else 1.0]
        assert out.gate == {"verdict": verdict, "reason": "why"}
    ungated = job_outcome(job, s)
    assert not ungated.feasible and ungated.gate == {"verdict": None,
                                                     "reason": "the trial was not gated"}
    assert job_outcome(job, SearchConfig()).gate is None

    fixed = ["workload.num_prompts=2", "workload.repeats=5", "+workload.repeats=4"]
    assert rerun_overrides(fixed, ["workload.batch_size=2", "backend.max_num_seqs=4"], 3) == [
        "workload.num_prompts=2", "workload.batch_size=2", "backend.max_num_seqs=4",
        "workload.repeats=3"]
    ret = {"status": "FINISHED", "metrics": {"output_tokens_per_s": 4.0, "ttft_ms_p90": 1.0,
                                             "output_tokens_per_s_ci95": 0.5}}
    assert rerun_result(7, ["a=1"], ret, s) == {
        "job": 7, "overrides": ["a=1"], "status": "FINISHED",
        "metrics": {"output_tokens_per_s": 4.0, "output_tokens_per_s_ci95": 0.5}}
    failed = rerun_result(7, ["a=1"], None, s)
    assert failed["status"] == "FAILED" and failed["metrics"] == {} and "raised" in failed[
        "error"]


def test_job_outcome_and_best_trials() -> None:
    """A job's return (or results.json dict) becomes the trial's values and constraint
    values (Optuna's sign: <= 0 kept); a FAILED job or a missing metric fails the trial; the
    best trial is the feasible optimum, several objectives give the feasible Pareto front."""
    from pipeline.analysis.search import best_trials, job_outcome
    from pipeline.config.schemas import SearchConfig, SearchConstraint, SearchObjective

    s = SearchConfig([SearchObjective("output_tokens_per_s")],
                     [SearchConstraint("ttft_ms_p90", max=500.0),
                      SearchConstraint("distinct_2", min=0.5, max=0.9)])
    ok = job_outcome({"status": "FINISHED", "metrics": {
        "output_tokens_per_s": 20.0, "ttft_ms_p90": 450.0, "distinct_2": 0.95}}, s)
    assert ok.state == "complete" and ok.values == [20.0]
    assert ok.constraints == pytest.approx([-50.0, 0.05]) and not ok.feasible
    skipped = job_outcome({"status": "SKIPPED", "metrics": {
        "output_tokens_per_s": 3, "ttft_ms_p90": 600, "distinct_2": 0.6}}, s)
    assert skipped.values == [3.0] and skipped.constraints == pytest.approx([100, -0.1])
    failed = job_outcome({"status": "FAILED", "metrics": {}, "error": "OOM"}, s)
    assert failed.state == "fail" and failed.reason == "job FAILED: OOM"
    missing = job_outcome({"status": "FINISHED", "metrics": {
        "output_tokens_per_s": math.nan, "ttft_ms_p90": 1.0, "distinct_2": 0.6}}, s)
    assert missing.state == "fail" and "output_tokens_per_s" in str(missing.reason)
    assert job_outcome(None, s).state == "fail"

    def t(n: int, *values: float, feasible: bool = True, state: str = "complete") -> dict:
        return {"number": n, "values": list(values), "feasible": feasible, "state": state}

    trials = [t(0, 5.0, 1.0), t(1, 9.0, 3.0, feasible=False), t(2, 7.0, 2.0),
              t(3, 4.0, 0.5), t(4, 6.0, 2.5), t(5, 0.0, 0.0, state="fail", feasible=False)]
    assert [x["number"] for x in best_trials(trials, ["maximize"])] == [2]
    assert [x["number"] for x in best_trials(trials, ["minimize"])] == [3]
    # max the first, min the second: 4 (6.0, 2.5) is dominated by 2 (7.0, 2.0)
    assert [x["number"] for x in best_trials(trials, ["maximize", "minimize"])] == [0, 2, 3]
    assert best_trials([t(0, 1.0, feasible=False)], ["maximize"]) == []


@pytest.fixture(scope="module")
def search_run(tmp_path_factory: pytest.TempPathFactory, model_dir: str
               ) -> tuple[Any, Path, Path]:
    """One real search: grid over batch sizes 0 (refused by validation: a FAILED job, no
    model load), 1 and 2 of two prompts and four new tokens on hf, three trials, then the
    best trial rerun with two repeats (job 3)."""
    out = tmp_path_factory.mktemp("search") / "outputs"
    sweep_dir = out / "multirun" / "s"
    p = run_cli("-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid",
                "hydra.sweeper.n_trials=3", "workload.batch_size=choice(0,1,2)",
                f"hydra.sweep.dir={sweep_dir}", f"paths.output_dir={out}",
                f"paths.cache_dir={CACHE_DIR}", "workload.num_prompts=2",
                "workload.max_new_tokens=4", "workload.warmup=0", "scoring.perplexity=false",
                "scoring.diversity=false", "print_table=false", "search.rerun_best=2")
    return p, out, sweep_dir


@pytest.mark.slow
def test_search_end_to_end(search_run: tuple[Any, Path, Path]) -> None:
    """Three trials run as three jobs of one sweep; search.json holds each trial's params,
    state and value (equal to its job's results.json metric), the FAILED job's trial is
    told FAIL, the best trial is the larger throughput; the best trial's overrides ran once
    more as job 3 with two repeats, its mean and interval in search.json's rerun block; the
    MLflow parent has the four jobs as children and the best trial's value and params."""
    from mlflow.tracking import MlflowClient

    p, out, sweep_dir = search_run
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]  # a job failed
    assert "workload.batch_size=0 is invalid" in p.stdout + p.stderr
    summary = json.loads((sweep_dir / "search.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 3 and summary["sampler"] == "grid"
    assert sorted(t["params"]["workload.batch_size"] for t in trials) == [0, 1, 2]
    for t in trials:
        result = json.loads((sweep_dir / str(t["job"]) / "results.json").read_text())
        (override,) = t["overrides"]  # what the job got, as search.json says
        assert override == f"workload.batch_size={t['params']['workload.batch_size']}"
        assert override in result["overrides"]
        if t["params"]["workload.batch_size"] == 0:
            assert t["state"] == "fail" and result["status"] == "FAILED"
            assert "must be >= 1" in t["error"] and t["values"] is None
        else:
            assert t["state"] == "complete" and result["status"] == "FINISHED"
            assert t["values"] == [result["metrics"]["output_tokens_per_s"]]
    done = [t for t in trials if t["state"] == "complete"]
    (best,) = summary["best"]
    assert best["values"][0] == max(t["values"][0] for t in done)
    assert summary["counts"] == {"trials": 3, "complete": 2, "failed": 1, "infeasible": 0}
    rerun = summary["rerun"]
    again = json.loads((sweep_dir / "3" / "results.json").read_text())
    assert rerun["job"] == 3 and again["status"] == "FINISHED" == rerun["status"]
    assert rerun["overrides"][-2:] == best["overrides"] + ["workload.repeats=2"]
    assert again["config"]["workload"]["repeats"] == 2
    assert again["config"]["workload"]["batch_size"] == best["params"]["workload.batch_size"]
    assert rerun["metrics"] == {k: again["metrics"][k] for k in (
        "output_tokens_per_s", "output_tokens_per_s_repeat_mean", "output_tokens_per_s_ci95")}
    assert "  rerun: job 3 (workload.repeats=2, FINISHED): output_tokens_per_s=" in p.stdout

    client = MlflowClient(f"sqlite:///{out}/mlflow/mlflow.db")
    parent = client.get_run((sweep_dir / "mlflow_parent_run_id").read_text().strip())
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 and parent.data.tags["search.rerun_job"] == "3"
    assert parent.data.metrics["search.best.output_tokens_per_s"] == best["values"][0]
    assert parent.data.params["search.best.workload.batch_size"] == str(
        best["params"]["workload.batch_size"])
    assert parent.data.tags["search.best_jobs"] == str(best["job"])
    from pipeline.metrics.catalog import uncovered

    assert uncovered(parent.data.metrics) == []  # the search.* figures have catalog rows


@pytest.mark.slow
def test_search_gates_a_trial_on_its_job_folders(search_run: tuple[Any, Path, Path]) -> None:
    """The sweeper's per-trial gate hook on the search's own finished job folders (a real
    gate call each, no model load: KL is not informative between equal settings): a job
    against itself as ``scoring.reference_run`` is equivalent, so a ``gate_verdict_not``
    constraint keeps it; another batch size is another task, not judged, so infeasible; a
    FAILED job is no baseline."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from hydra_plugins.infersweep_optuna.optuna_sweeper import OptunaSweeper
    from pipeline.analysis.search import job_outcome
    from pipeline.config.schemas import SearchConfig, SearchConstraint

    _, _, sweep_dir = search_run
    trials = json.loads((sweep_dir / "search.json").read_text())["trials"]
    job = {t["params"]["workload.batch_size"]: t["job"] for t in trials}
    sweeper = OptunaSweeper()
    sweeper.config = OmegaConf.load(sweep_dir / "multirun.yaml")
    s = SearchConfig(constraints=[SearchConstraint(gate_verdict_not="degraded")])

    def gate(ref: int, num: int) -> tuple[dict[str, Any], bool]:
        sweeper.config.scoring.reference_run = str(ref)
        row = sweeper._gate(SimpleNamespace(hydra_cfg=None), sweep_dir, num)
        result = json.loads((sweep_dir / str(num) / "results.json").read_text())
        return row, job_outcome(result, s, row).feasible

    same, ok = gate(job[1], job[1])
    assert same["verdict"] == "equivalent" and same["exact_match_rate"] == 1.0 and ok
    other, ok = gate(job[1], job[2])
    assert other == {"verdict": None,
                     "reason": f"not comparable with baseline {job[1]}: another task"}
    assert not ok
    failed, ok = gate(job[0], job[1])
    assert failed["verdict"] is None and not ok
    assert failed["reason"] == f"no finished baseline scoring.reference_run={job[0]}"


@pytest.mark.slow
def test_search_resumes_its_study(search_run: tuple[Any, Path, Path]) -> None:
    """The same search rerun into its folder without ``resume=true`` is refused (the study
    exists); with it, the study's three trials count and a fourth (random now: the grid is
    used up) runs as job 4 (3 is the rerun's): a batch size already measured is SKIPPED
    with its metrics, 0 fails again; the sweep's new parent run holds it."""
    from mlflow.tracking import MlflowClient

    _, out, sweep_dir = search_run
    common = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=random",
              "workload.batch_size=choice(0,1,2)", f"hydra.sweep.dir={sweep_dir}",
              f"paths.output_dir={out}", f"paths.cache_dir={CACHE_DIR}",
              "workload.num_prompts=2", "workload.max_new_tokens=4", "workload.warmup=0",
              "scoring.perplexity=false", "scoring.diversity=false", "print_table=false"]
    # no tracking: the refusal comes from the study, before any MLflow work
    p = run_cli(*common, "hydra.sweeper.n_trials=3", "tracking.enabled=false")
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "already exists" in p.stderr and "add resume=true" in p.stderr
    p = run_cli(*common, "hydra.sweeper.n_trials=4", "resume=true")
    assert "has 3 finished trial(s); 1 to go" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((sweep_dir / "search.json").read_text())
    assert [t["job"] for t in summary["trials"]] == [0, 1, 2, 4]
    fourth = summary["trials"][3]
    result = json.loads((sweep_dir / "4" / "results.json").read_text())
    if fourth["params"]["workload.batch_size"] == 0:
        assert fourth["state"] == "fail" and result["status"] == "FAILED"
    else:  # the same job as before: resume=true skips it and returns its metrics
        assert result["status"] == "SKIPPED"
        same = next(t for t in summary["trials"][:3] if t["params"] == fourth["params"])
        assert fourth["values"] == same["values"]
    client = MlflowClient(f"sqlite:///{out}/mlflow/mlflow.db")
    parent = (sweep_dir / "mlflow_parent_run_id").read_text().strip()
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 1


def test_interrupted_trial_is_proposed_again_under_its_job_number() -> None:
    """A resumed study's trial left RUNNING by a killed search is failed (marked
    ``interrupted``) and its params come back first, with its job number (its folder and,
    through ``resume=true``, its finished MLflow run are reused)."""
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState

    from hydra_plugins.infersweep_optuna.optuna_sweeper import OptunaSweeper

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    dists = {"workload.batch_size": IntDistribution(1, 64)}
    done = study.ask(dists)
    done.set_user_attr("job", 0)
    study.tell(done, 1.0)
    killed = study.ask(dists)
    killed.set_user_attr("job", 1)  # never told: the search was killed during its job
    OptunaSweeper._requeue_interrupted(study)
    old = study.get_trials(deepcopy=False)[1]
    assert old.state == TrialState.FAIL and old.user_attrs["interrupted"] is True
    again = study.ask(dists)
    assert again.params == killed.params and again.user_attrs["job"] == 1


def test_vllm_scheduler_keys_reach_the_engine(tmp_path: Path) -> None:
    """``max_num_batched_tokens`` and ``enable_chunked_prefill``: absent from the engine's
    arguments and the server's flags while null (vLLM's default), passed when set, part of
    the engine-reuse key, range-checked."""
    from pipeline.backends.vllm.config import VLLMBackendConfig, VLLMServerBackendConfig
    from pipeline.backends.vllm.engine import VLLMBackend
    from pipeline.backends.vllm.engine_cache import engine_key
    from pipeline.backends.vllm.server import VLLMServerBackend
    from pipeline.config import ModelConfig
    from pipeline.errors import ConfigError

    m = ModelConfig()
    default = VLLMBackend("/m", m, VLLMBackendConfig(), seed=0).engine_kwargs("float32")
    assert "max_num_batched_tokens" not in default and "enable_chunked_prefill" not in default
    cfg = VLLMBackendConfig(max_num_batched_tokens=1024, enable_chunked_prefill=False)
    kwargs = VLLMBackend("/m", m, cfg, seed=0).engine_kwargs("float32")
    assert kwargs["max_num_batched_tokens"] == 1024 and kwargs["enable_chunked_prefill"] is False
    server = VLLMServerBackend("/m", m, VLLMServerBackendConfig(
        max_num_batched_tokens=512, enable_chunked_prefill=True, log_dir=str(tmp_path)), seed=0)
    cmd = server.server_command(8000)
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "512"
    assert "--enable-chunked-prefill" in cmd
    off = VLLMServerBackend("/m", m, VLLMServerBackendConfig(
        enable_chunked_prefill=False, log_dir=str(tmp_path)), seed=0).server_command(8000)
    assert "--no-enable-chunked-prefill" in off and "--max-num-batched-tokens" not in off
    keys = {engine_key("/m", m, VLLMBackendConfig(max_num_batched_tokens=n), "float32", 0, {})
            for n in (None, 512)}
    assert len(keys) == 2
    with pytest.raises(ConfigError, match="backend.max_num_batched_tokens=0 is invalid"):
        VLLMBackend.validate_settings(VLLMBackendConfig(max_num_batched_tokens=0))


@pytest.mark.slow
def test_search_finds_the_known_best_concurrency_on_a_stub_of_known_capacity(
        tmp_path: Path, model_dir: str) -> None:
    """The search against a server whose answer is known, which no real engine can give
    (so a stub: tests/stub_engine.py, its own process on 127.0.0.1). Each step of the
    stub lasts a + b n with n requests in flight (a = 5 ms, b = 1 ms); 16 requests of 32
    tokens at concurrency c keep n = c in flight, so TPOT = a + b c and output tok/s =
    c / (a + b c): c = 1 -> 6 ms, 167 tok/s; c = 4 -> 9 ms, 444 tok/s; c = 16 -> 21 ms,
    762 tok/s. Maximizing tok/s with TPOT <= 13 ms: c = 16 is the fastest but breaks the
    bound (infeasible), so the best feasible trial is c = 4."""
    from tests.stub_engine import stub_server

    sweep_dir = tmp_path / "multirun" / "s"
    with stub_server(0.005, 0.001) as url:
        p = run_cli("-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid",
                    "hydra.sweeper.n_trials=3", "workload.concurrency=choice(1,4,16)",
                    "search.constraints=[{metric:tpot_ms_mean,max:13}]",
                    "backend=openai", f"backend.base_url={url}", "workload=serving",
                    "workload.fixed_length=false", f"hydra.sweep.dir={sweep_dir}",
                    f"paths.output_dir={tmp_path}", f"paths.cache_dir={CACHE_DIR}",
                    "scoring.perplexity=false", "scoring.diversity=false",
                    "print_table=false", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((sweep_dir / "search.json").read_text())
    by_c = {t["params"]["workload.concurrency"]: t for t in summary["trials"]}
    assert sorted(by_c) == [1, 4, 16]
    tps = {c: t["values"][0] for c, t in by_c.items()}
    print("out tok/s by concurrency:", tps, "feasible:",
          {c: t.get("feasible") for c, t in by_c.items()})
    assert tps[1] < tps[4] < tps[16]  # the stub's throughput grows with what is in flight
    (best,) = summary["best"]
    assert best["params"] == {"workload.concurrency": 4}, summary["best"]
