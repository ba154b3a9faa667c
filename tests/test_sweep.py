"""End to end: `run.py -m` sweeps land in a real MLflow store, one parent, one child a job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import CACHE_DIR, run_cli

pytestmark = pytest.mark.slow

JOB_METRICS = (
    "ttft_ms_mean", "ttft_ms_p99", "tpot_ms_p50", "itl_ms_p90", "e2el_ms_mean",
    "output_tokens_per_s", "requests_per_s", "peak_rss_bytes", "perplexity",
    "distinct_1", "distinct_2", "rep_2", "self_bleu", "time_load_s",
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, model_dir: str) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sweep")
    p = run_cli("-m", "decoding=greedy,topp,beam", f"paths.output_dir={out}",
                f"paths.cache_dir={CACHE_DIR}", "workload.max_new_tokens=12",
                "workload.num_prompts=4")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


def test_sweep_creates_parent_and_three_children(sweep: tuple[Path, str]) -> None:
    from mlflow.tracking import MlflowClient

    out, _ = sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("infersweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["jobs_total"] == 3
    assert {c.data.tags["decoding"] for c in children} == {"greedy", "topp", "beam"}
    for c in children:
        assert c.info.status == "FINISHED"
        missing = [m for m in JOB_METRICS if m not in c.data.metrics]
        assert not missing, missing
        assert c.data.params["decoding.name"] == c.data.tags["decoding"]
        for tag in ("backend", "model", "hydra_overrides", "git_commit", "version.torch",
                    "hardware.cpu"):
            assert tag in c.data.tags
        arts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"generations.json", "results.json"} <= arts
        table = json.loads(Path(client.download_artifacts(c.info.run_id, "generations.json"))
                           .read_text())
        assert len(table["data"]) == 4


def test_results_json_per_job(sweep: tuple[Path, str]) -> None:
    out, _ = sweep
    files = sorted((out / "multirun").glob("*/*/results.json"))
    assert len(files) == 3
    for f in files:
        r = json.loads(f.read_text())
        assert r["status"] == "FINISHED"
        assert len(r["requests"]) == 4
        assert r["provenance"]["versions"]["transformers"]
        assert r["applied"]["dtype"] == "float32"
        assert r["metrics"]["total_output_tokens"] == sum(
            q["output_tokens"] for q in r["requests"])


def test_sweep_prints_table_and_ui_command(sweep: tuple[Path, str]) -> None:
    _, stdout = sweep
    assert "out tok/s" in stdout and "3 job(s)" in stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in stdout
    assert "--host 127.0.0.1 --workers 1" in stdout
