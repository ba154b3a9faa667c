"""``python -m pipeline.report`` after a plain ``python run.py`` (no ``-m``): the job is
reported as a sweep of one, found in MLflow like a sweep's parent run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_report_after_a_plain_run_has_the_jobs_row(plain_job: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.job_runs import RUN_ID_FILE
    from pipeline.tracking.store import default_store_uri

    (job_dir,) = [d for d in (plain_job / "runs").iterdir() if d.is_dir()]
    run_id = (job_dir / RUN_ID_FILE).read_text().strip()
    # as a user does it: from the folder that holds outputs/, no arguments
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "pipeline.report"], cwd=plain_job.parent,
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (md,) = list((plain_job / "reports").glob("*/report.md"))
    assert (md.parent / "report.html").stat().st_size > 0
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("|") and run_id in line]
    assert rows and "FINISHED" in rows[0], text[:3000]
    # it reads as one job: rerun without -m, no sweep parent run named
    assert "python run.py -m" not in text and "sweep parent run" not in text, text[:3000]
    assert "python run.py" in text and "job run" in text
    client = MlflowClient(tracking_uri=default_store_uri(plain_job))
    run = client.get_run(run_id)
    assert "mlflow.parentRunId" not in run.data.tags  # a plain job: no parent run made up
    # the report is logged to the job's own run, as a sweep's is to its parent run
    assert run.data.tags["report"].endswith("report/report.html")
    assert {"report/report.md", "report/report.html"} <= {
        a.path for a in client.list_artifacts(run_id, "report")}
