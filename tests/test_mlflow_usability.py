"""MLflow as its users use it: the UI's landing page, run names from the chosen presets,
the job's real duration, artifacts beside the SQLite store, the printed UI links."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from pipeline.records import JobResult
from pipeline.tracking.job_runs import log_job, run_name
from pipeline.tracking.links import run_url, runs_url, ui_hint
from pipeline.tracking.store import (
    EXPERIMENT_KIND_TAG,
    client_for,
    default_store_uri,
    tracking_uri,
)
from tests.conftest import CACHE_DIR, TINY, run_cli


def _cfg(tmp_path: Path, uri: str | None) -> DictConfig:
    return OmegaConf.create({
        "tracking": {"enabled": True, "uri": uri, "experiment": "usability",
                     "log_generations": False},
        "paths": {"output_dir": str(tmp_path / "outputs")},
    })


def _result(**kw: Any) -> JobResult:
    config = {g: {"name": n} for g, n in
              (("backend", "hf"), ("model", "smollm2-135m"), ("decoding", "greedy"),
               ("workload", "quick"))}
    prov = {"overrides": ["backend=hf_kv"], "command": "run.py backend=hf_kv",
            "git_commit": "abc", "hardware": {"cpu": "test"}, "versions": {"torch": "x"}}
    return JobResult(status="FINISHED", job_num=2, config=config, config_hash="h",
                     provenance=prov, metrics={"time_generate_s": 3.0}, **kw)


def test_new_experiment_opens_on_the_runs_table(tmp_path: Path) -> None:
    """A new experiment carries mlflow.experimentKind=custom_model_development."""
    client, exp_id = client_for(_cfg(tmp_path, None))
    tags = client.get_experiment(exp_id).tags
    assert tags.get(EXPERIMENT_KIND_TAG) == "custom_model_development"


def test_existing_experiment_gets_the_kind_tag(tmp_path: Path) -> None:
    """An experiment made before (no kind tag) is tagged the next time a job uses it."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'old.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("usability")
    client, exp_id = client_for(_cfg(tmp_path, uri))
    assert client.get_experiment(exp_id).tags.get(EXPERIMENT_KIND_TAG) == \
        "custom_model_development"


def test_custom_sqlite_store_keeps_artifacts_beside_the_db(tmp_path: Path) -> None:
    """tracking.uri=sqlite:///<dir>/x.db puts artifacts in <dir>/artifacts, not ./mlruns."""
    db_dir = tmp_path / "store"
    db_dir.mkdir()
    client, exp_id = client_for(_cfg(tmp_path, f"sqlite:///{db_dir / 'x.db'}"))
    loc = client.get_experiment(exp_id).artifact_location
    assert loc == (db_dir / "artifacts").as_uri()
    assert "mlruns" not in loc


def test_run_name_tags_and_times_come_from_the_job(tmp_path: Path) -> None:
    """The run is named after the chosen presets, tagged with them and the applied dtype,
    and spans the job's own start and end."""
    cfg = _cfg(tmp_path, None)
    t0 = 1_700_000_000_000
    result = _result(choices={"backend": "hf_kv", "decoding": "greedy", "workload": "quick",
                              "model": "smollm2-135m"},
                     applied={"dtype": "bfloat16"}, started_at=t0, ended_at=t0 + 5000)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    run_id = log_job(cfg, result, job_dir, None, {"seed": 0})
    client, _ = client_for(cfg)
    run = client.get_run(run_id)
    assert run.info.run_name == "2-hf_kv-greedy-quick"
    assert run.data.tags["preset.backend"] == "hf_kv"
    assert run.data.tags["applied.dtype"] == "bfloat16"
    assert run.data.params["applied.dtype"] == "bfloat16"
    assert (run.info.start_time, run.info.end_time) == (t0, t0 + 5000)


def test_run_name_falls_back_to_config_names_without_choices() -> None:
    """results.json files from before ``choices`` existed still get a name."""
    assert run_name(_result()) == "2-hf-greedy-quick"


def test_ui_hint_links_the_sweeps_runs_and_compare_page() -> None:
    """The hint names the UI command, the runs table filtered to the parent's children
    and the compare page, in MLflow 3's hash-route format."""
    hint = ui_hint("sqlite:////x/mlflow.db", "7", "p1", ["b", "a"])
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in hint
    runs = next(line for line in hint.split() if "/runs?" in line)
    assert runs.startswith("http://127.0.0.1:5000/#/experiments/7/runs?searchFilter=")
    flt, _, order = runs.split("searchFilter=")[1].partition("&")
    assert urllib.parse.unquote(flt) == "tags.mlflow.parentRunId = 'p1'"
    # listed flat by name (with the default order MLflow nests them under the parent)
    assert urllib.parse.unquote(order) == "orderByKey=tags.`mlflow.runName`&orderByAsc=true"
    comp = next(line for line in hint.split() if "compare-runs" in line)
    assert urllib.parse.unquote(comp) == \
        'http://127.0.0.1:5000/#/compare-runs?runs=["a","b"]&experiments=["7"]'
    assert ui_hint("http://srv:5000/", "7").endswith("http://srv:5000/#/experiments/7/runs")


def test_plain_run_prints_the_url_of_its_run_page(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """After a plain run the summary names the run's own page in the MLflow UI, with the
    real experiment and run ids, in the route MLflow 3.17's UI bundle defines."""
    import mlflow

    from pipeline.job_results import print_summary

    cfg = _cfg(tmp_path, None)
    result = _result()
    result.job_num = None  # a plain run: no sweep, no job number
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    result.mlflow_run_id = log_job(cfg, result, job_dir, None, {})
    print_summary(result, cfg)  # type: ignore[arg-type]  # reads tracking.* and paths.*
    out = capsys.readouterr().out
    client, exp_id = client_for(cfg)
    assert exp_id != "0"  # the job's experiment, not MLflow's Default
    assert client.get_run(result.mlflow_run_id).info.experiment_id == exp_id
    url = f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{result.mlflow_run_id}"
    assert url in out.split()
    assert run_url(tracking_uri(cfg), exp_id, result.mlflow_run_id) == url
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    # the hash route of the installed UI (its Routes.runPage), so a renamed route fails here
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    assert any("/experiments/:experimentId/runs/:runUuid" in f.read_text(errors="ignore")
               for f in bundle.glob("main.*.js"))


@pytest.mark.slow
def test_sweep_job_run_is_named_by_preset_and_lasts_as_long_as_the_job(
        tmp_path: Path, model_dir: str) -> None:
    """A real one-job sweep with ``backend=hf_kv`` (whose yaml says name: hf) on a custom
    SQLite store: preset name, preset tags, job-long duration, artifacts beside the db,
    the runs link printed."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "store" / "m.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    p = run_cli("-m", "backend=hf_kv", f"tracking.uri={uri}", f"paths.output_dir={tmp_path}",
                f"paths.cache_dir={CACHE_DIR}", *TINY)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("infersweep")
    assert exp.tags.get(EXPERIMENT_KIND_TAG) == "custom_model_development"
    assert exp.artifact_location == (db.parent / "artifacts").as_uri()
    runs = client.search_runs([exp.experiment_id])
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert child.info.run_name == "0-hf_kv-greedy-quick"
    assert child.data.tags["preset.backend"] == "hf_kv"
    assert "applied.dtype" in child.data.tags
    duration_s = (child.info.end_time - child.info.start_time) / 1000
    assert duration_s >= child.data.metrics["time_generate_s"]
    assert child.info.artifact_uri.startswith((db.parent / "artifacts").as_uri())
    (job_results,) = tmp_path.glob("multirun/*/*/results.json")
    saved = json.loads(job_results.read_text())
    assert saved["choices"]["backend"] == "hf_kv"
    assert saved["started_at"] == child.info.start_time
    assert saved["ended_at"] == child.info.end_time
    assert runs_url(uri, exp.experiment_id, parent.info.run_id) in p.stdout


@pytest.mark.slow
def test_resume_continues_the_killed_sweep_and_links_skipped_jobs(
        tmp_path: Path, model_dir: str) -> None:
    """``resume=true`` takes over the parent a killed sweep left RUNNING (same overrides),
    and in another sweep a skipped job is linked as a SKIPPED child of the new parent."""
    from mlflow.tracking import MlflowClient

    common = (f"paths.output_dir={tmp_path}", f"paths.cache_dir={CACHE_DIR}", *TINY)
    p = run_cli("-m", "decoding=greedy,topk", *common)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    client = MlflowClient(tracking_uri=default_store_uri(tmp_path))
    exp_id = client.get_experiment_by_name("infersweep").experiment_id

    def parents() -> list[Any]:
        return [r for r in client.search_runs([exp_id]) if r.data.tags.get("kind") == "sweep"]

    (first,) = parents()
    client.update_run(first.info.run_id, status="RUNNING")  # as a killed sweep leaves it

    p = run_cli("-m", "decoding=greedy,topk", *common, "resume=true")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (again,) = parents()  # taken over, not a second parent
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    kids = client.search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{first.info.run_id}'")
    assert len(kids) == 2  # the skipped jobs were not linked twice

    p = run_cli("-m", "decoding=greedy,topp", *common, "resume=true")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (new,) = [r for r in parents() if r.info.run_id != first.info.run_id]
    kids = client.search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{new.info.run_id}'")
    by_decoding = {k.data.tags["decoding"]: k for k in kids}
    assert set(by_decoding) == {"greedy", "topp"}
    link = by_decoding["greedy"]
    assert link.data.tags["status"] == "SKIPPED"
    orig = client.get_run(link.data.tags["resumed_from"])
    assert orig.data.tags["mlflow.parentRunId"] == first.info.run_id
    assert link.data.metrics["output_tokens_per_s"] == orig.data.metrics["output_tokens_per_s"]
    assert new.data.metrics["jobs_total"] == 2 and new.data.metrics["jobs_skipped"] == 1
