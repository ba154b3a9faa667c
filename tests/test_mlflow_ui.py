"""MLflow's own UI, as a user opens it after a sweep: a tiny real sweep, ``mlflow ui`` on
its store, and headless Chromium loading the runs page filtered to the sweep's children
(the URL the pipeline prints, :func:`pipeline.tracking.links.runs_url`). The rendered DOM
must list every child run by name."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.tracking.links import compare_url, runs_url
from pipeline.tracking.parent_run import read_parent_id
from tests.conftest import CACHE_DIR, run_cli


def browser() -> str | None:
    """The headless Chromium binary, if installed (Debian: ``chromium``)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ui(store: str, port: int, log: Path) -> subprocess.Popen:
    """``mlflow ui`` on ``store`` (one worker, loopback), in its own process group."""
    with log.open("w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float = 180) -> None:
    """Until the server answers ``/health`` (fails with its log if it exits first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"mlflow ui exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow ui not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server's process group (the server and its worker), by its own id."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def chromium(binary: str, url: str, profile: Path, *extra: str, budget_ms: int = 15000
             ) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url`` (``extra``: ``--dump-dom`` or ``--screenshot=...``)."""
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--run-all-compositor-stages-before-draw",
         f"--virtual-time-budget={budget_ms}", *extra, url],
        capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_runs_page_lists_the_sweeps_child_runs(tmp_path: Path, model_dir: str) -> None:
    binary = browser()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run "
                    "installs it)")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    p = run_cli("-m", "decoding=greedy,topp", "workload.num_prompts=2",
                "workload.max_new_tokens=4", "workload.warmup=0", "scoring.perplexity=false",
                f"paths.output_dir={out}", f"paths.cache_dir={CACHE_DIR}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (sweep_dir,) = sorted((out / "multirun").iterdir())
    pid = read_parent_id(sweep_dir)
    assert pid
    store = f"sqlite:///{out / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(pid)
    exp_id = parent.info.experiment_id
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{pid}'")
    names = sorted(r.info.run_name for r in children)
    assert names == ["0-hf-greedy-quick", "1-hf-topp-quick"]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow-ui.log"
    proc = start_ui(store, port, log)
    try:
        wait_ready(proc, base, log)
        # MLflow's default order (start time) nests the children under their collapsed
        # parent row, which is all the page shows
        url = runs_url(base, exp_id, pid, flat=False)
        dom = chromium(binary, url, tmp_path / "profile0", "--dump-dom").stdout
        assert "<html" in dom.lower(), dom[-2000:]
        assert parent.info.run_name in dom, "the runs table did not render"
        # as the pipeline prints it and the report links it (ordered by run name): the
        # children, flat
        url = runs_url(base, exp_id, pid)
        dom = chromium(binary, url, tmp_path / "profile", "--dump-dom").stdout
        for name in names:
            assert name in dom, f"{name} not in the rendered runs page {url}"
        assert parent.info.run_name not in dom  # the filter holds: no parent row
        # the compare page the pipeline prints renders the jobs too
        cmp = chromium(binary, compare_url(base, exp_id, [r.info.run_id for r in children]),
                       tmp_path / "profile2", "--dump-dom").stdout
        for name in names:
            assert name in cmp, f"{name} not on the compare page"
    finally:
        stop(proc)
