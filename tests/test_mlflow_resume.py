"""``resume=true`` on a real store and real ``run.py`` sweeps (the toy backend, so a job
costs seconds; the SIGKILL test runs the packaged model, whose loads leave time to kill a
job mid-way): a taken-over parent keeps one child per job, whatever folder the resumed
sweep uses, and a parent whose sweep may still be running is not taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ConfigError
from pipeline.tracking import parent_run
from pipeline.tracking.job_runs import SUPERSEDED_TAG, job_number
from pipeline.tracking.parent_run import (
    OWNER_HOST_TAG,
    OWNER_PID_TAG,
    PARENT_ID_FILE,
    SweepStillOwned,
    open_parent,
    owner_tags,
    pid_alive,
    sweep_key,
    take_over_parent,
)
from pipeline.tracking.store import default_store_uri
from tests.conftest import CACHE_DIR, ROOT, TINY, run_cli

TOY = ("backend=toy", f"hydra.searchpath=[file://{ROOT / 'tests' / 'conf'}]")


def _common(tmp_path: Path) -> tuple[str, ...]:
    return (*TOY, f"paths.output_dir={tmp_path}", f"paths.cache_dir={CACHE_DIR}", *TINY)


def _store(tmp_path: Path) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=default_store_uri(tmp_path))
    return client, client.get_experiment_by_name("infersweep").experiment_id


def _parents(client: Any, exp_id: str) -> list[Any]:
    return [r for r in client.search_runs([exp_id]) if r.data.tags.get("kind") == "sweep"]


def _children(client: Any, exp_id: str, parent: str) -> list[Any]:
    """The parent's children as its UI lists them (deleted runs left out)."""
    return client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def _results(tmp_path: Path) -> int:
    return len(list(tmp_path.glob("multirun/*/*/results.json")))


@pytest.mark.slow
def test_resume_leaves_one_child_per_job_and_deletes_the_superseded_attempt(
        tmp_path: Path, model_dir: str) -> None:
    """A sweep whose job 1 FAILED (the toy refuses beam search) is left RUNNING as a kill
    leaves it; ``resume=true`` takes its parent over (its owner, the first ``run.py``, is
    dead) and re-runs job 1. The parent then lists one child per job: job 0's original
    (skipped) and job 1's rerun; job 1's first attempt is soft-deleted, tagged with its
    replacement, and can be restored."""
    args = ("-m", "decoding=greedy,beam", *_common(tmp_path))
    p = run_cli(*args)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]  # job 1 failed
    client, exp_id = _store(tmp_path)
    (parent,) = _parents(client, exp_id)
    pid = parent.info.run_id
    assert parent.data.tags[OWNER_HOST_TAG] == socket.gethostname()
    first_owner = int(parent.data.tags[OWNER_PID_TAG])
    assert not pid_alive(first_owner)  # that run.py has exited
    before = {job_number(r): r for r in _children(client, exp_id, pid)}
    assert {j: r.info.status for j, r in before.items()} == {0: "FINISHED", 1: "FAILED"}
    client.update_run(pid, status="RUNNING")  # as a killed sweep leaves it

    p = run_cli(*args, "resume=true")
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    (again,) = _parents(client, exp_id)  # taken over, not a second parent
    assert again.info.run_id == pid
    assert again.data.tags[OWNER_PID_TAG] != str(first_owner)  # the new owner
    kids = _children(client, exp_id, pid)
    assert sorted(job_number(k) for k in kids) == [0, 1]  # one child per job
    after = {job_number(k): k for k in kids}
    assert after[0].info.run_id == before[0].info.run_id  # skipped, not linked again
    rerun, old_id = after[1].info.run_id, before[1].info.run_id
    assert rerun != old_id
    old = client.get_run(old_id)  # deleted runs are still readable by id
    assert old.info.lifecycle_stage == "deleted"
    assert old.data.tags[SUPERSEDED_TAG] == rerun
    client.restore_run(old_id)  # nothing is lost: MLflow's own restore brings it back
    assert client.get_run(old_id).info.lifecycle_stage == "active"


@pytest.mark.slow
def test_resume_refuses_a_parent_whose_sweep_is_alive_and_takes_it_once_dead(
        tmp_path: Path, model_dir: str) -> None:
    """The parent's owner pid is a live process on this host: ``resume=true`` exits 2
    before any job, naming the parent run, the pid and the way out, and changes nothing.
    Once that process is dead the same command takes the parent over."""
    args = ("-m", "decoding=greedy", *_common(tmp_path))
    p = run_cli(*args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    client, exp_id = _store(tmp_path)
    (parent,) = _parents(client, exp_id)
    pid = parent.info.run_id
    client.update_run(pid, status="RUNNING")
    owner = subprocess.Popen(["sleep", "60"])  # stands in for the sweep still running
    try:
        client.set_tag(pid, OWNER_PID_TAG, str(owner.pid))
        jobs = _results(tmp_path)
        p = run_cli(*args, "resume=true", timeout=300)
        assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
        err = p.stderr.strip().splitlines()[-1]
        assert err.startswith("error: resume=true:")
        assert pid in err and str(owner.pid) in err and "tracking.force_takeover=true" in err
        assert _results(tmp_path) == jobs  # no job ran
        kept = client.get_run(pid)
        assert kept.info.status == "RUNNING"
        assert kept.data.tags[OWNER_PID_TAG] == str(owner.pid)
    finally:
        owner.kill()
        owner.wait()  # reaped: a zombie would still answer signal 0

    p = run_cli(*args, "resume=true", timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (again,) = _parents(client, exp_id)
    assert again.info.run_id == pid and again.info.status == "FINISHED"
    assert again.data.tags[OWNER_PID_TAG] not in ("", str(owner.pid))
    assert len(_children(client, exp_id, pid)) == 1


def _killed_parent(client: Any, exp_id: str, folder: Path, host: str | None,
                   pid: int | None) -> str:
    """A RUNNING sweep parent (key ``k``) for ``folder``, owned by ``host``/``pid`` (no owner
    tags when None: a sweep from before they existed), as another process left it."""
    folder.mkdir(exist_ok=True)
    owner = {} if host is None else {OWNER_HOST_TAG: host, OWNER_PID_TAG: str(pid)}
    parent = open_parent(client, exp_id, folder, {"sweep_key": "k", **owner})
    parent_run._OPENED_HERE.discard(parent)  # opened by that other process, not this one
    return parent


def _sqlite_store(tmp_path: Path) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    return client, client.create_experiment("resume")


def _parent_with_owner(tmp_path: Path, host: str | None, pid: int | None) -> tuple[Any, str,
                                                                                   str]:
    """A real SQLite store holding one :func:`_killed_parent` (folder ``old``)."""
    client, exp_id = _sqlite_store(tmp_path)
    return client, exp_id, _killed_parent(client, exp_id, tmp_path / "old", host, pid)


def _dead_pid() -> int:
    """The pid of a process of this host that has exited and been reaped."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_resume_refuses_another_hosts_parent_unless_forced(tmp_path: Path) -> None:
    """Another host's pid cannot be checked: refused (naming host, pid, the override)
    until ``force`` (``tracking.force_takeover=true``); the forced take-over re-tags the
    parent with this process as owner."""
    client, exp_id, parent = _parent_with_owner(tmp_path, "elsewhere.example", 4242)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    with pytest.raises(SweepStillOwned) as e:
        take_over_parent(client, exp_id, new_dir, "k")
    msg = str(e.value)
    assert parent in msg and "4242" in msg and "elsewhere.example" in msg
    assert "tracking.force_takeover=true" in msg
    assert isinstance(e.value, ConfigError)  # run.py's exit 2 for refused input
    assert not (new_dir / PARENT_ID_FILE).exists()
    assert take_over_parent(client, exp_id, new_dir, "k", force=True) == parent
    tags = client.get_run(parent).data.tags
    assert (tags[OWNER_HOST_TAG], tags[OWNER_PID_TAG]) == \
        (socket.gethostname(), str(os.getpid()))


def test_resume_takes_over_a_parent_without_owner_tags(tmp_path: Path) -> None:
    """Parents of sweeps from before the owner tags are taken over as before."""
    client, exp_id, parent = _parent_with_owner(tmp_path, None, None)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    assert take_over_parent(client, exp_id, new_dir, "k") == parent


def test_force_takeover_is_not_part_of_the_sweep_key() -> None:
    """``tracking.force_takeover=true`` added to a resume still finds the killed sweep."""
    assert sweep_key(["decoding=greedy,beam"]) == sweep_key(
        ["resume=true", "tracking.force_takeover=true", "decoding=greedy,beam"])


def test_resume_into_the_killed_sweeps_folder_takes_its_parent_over(tmp_path: Path) -> None:
    """Two killed sweeps with the same key left parents RUNNING; resuming into the older
    one's folder (its ``hydra.sweep.dir`` again) takes that folder's parent, whose children
    its job folders name, and marks the newer one KILLED."""
    client, exp_id = _sqlite_store(tmp_path)
    here = socket.gethostname()
    mine = _killed_parent(client, exp_id, tmp_path / "a", here, _dead_pid())
    time.sleep(0.05)  # the other one is the newest by start time
    other = _killed_parent(client, exp_id, tmp_path / "b", here, _dead_pid())
    assert take_over_parent(client, exp_id, tmp_path / "a", "k") == mine
    assert (tmp_path / "a" / PARENT_ID_FILE).read_text() == mine
    assert client.get_run(mine).info.status == "RUNNING"
    assert client.get_run(mine).data.tags[OWNER_PID_TAG] == str(os.getpid())
    assert client.get_run(other).info.status == "KILLED"


def test_resume_never_takes_over_a_parent_this_process_opened(tmp_path: Path) -> None:
    """The parent this very process opened is its own live sweep's, never a killed one's,
    whatever folder it names: it is left as it is (the owner pid alone cannot say so: a
    killed sweep's pid may be this process's again)."""
    client, exp_id = _sqlite_store(tmp_path)
    (tmp_path / "own").mkdir()
    own = open_parent(client, exp_id, tmp_path / "own", {"sweep_key": "k",
                                                          **owner_tags()})
    (tmp_path / "next").mkdir()
    assert take_over_parent(client, exp_id, tmp_path / "next", "k") is None
    assert not (tmp_path / "next" / PARENT_ID_FILE).exists()
    run = client.get_run(own)
    assert run.info.status == "RUNNING" and "resumed_sweep_dirs" not in run.data.tags


def _kill_when_job_starts(args: tuple[str, ...], sweep_dir: Path, job: int,
                          timeout_s: float = 300) -> None:
    """Run ``run.py ARGS`` and SIGKILL its Python process as soon as Hydra has made job
    ``job``'s folder (the jobs before it are done and logged); fails when the sweep ends
    first or the job does not start within ``timeout_s``."""
    log = sweep_dir.parent / "killed.log"
    with log.open("w") as out:
        p = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, stdout=out,
                             stderr=subprocess.STDOUT, env={**os.environ,
                                                            "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout_s
        try:
            while not (sweep_dir / str(job)).is_dir():
                assert p.poll() is None, f"exited {p.returncode}: {log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"job {job} never started"
                time.sleep(0.05)
            p.send_signal(signal.SIGKILL)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.slow
def test_resume_with_the_same_sweep_dir_continues_the_killed_sweeps_parent(
        tmp_path: Path, model_dir: str) -> None:
    """A 2x2 sweep with an explicit ``hydra.sweep.dir`` is SIGKILLed when job 2 starts;
    the same command with ``resume=true`` (the same folder) takes the killed sweep's parent
    over: one parent, FINISHED, one FINISHED child per job (jobs 0-1 the originals),
    nothing left RUNNING."""
    sweep_dir = tmp_path / "sweep"
    args = ("-m", "backend=hf_kv,hf", "decoding=greedy,topp", f"hydra.sweep.dir={sweep_dir}",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={CACHE_DIR}",
            "workload.num_prompts=2", "workload.max_new_tokens=8", "workload.warmup=0",
            "scoring.perplexity=false")
    _kill_when_job_starts(args, sweep_dir, job=2)
    assert not (sweep_dir / "2" / "results.json").exists()  # killed mid-sweep
    client, exp_id = _store(tmp_path)
    (killed,) = _parents(client, exp_id)
    pid = killed.info.run_id
    assert killed.info.status == "RUNNING"  # as the kill left it
    first = {job_number(r): r.info.run_id for r in _children(client, exp_id, pid)}
    assert sorted(first) == [0, 1]

    p = run_cli(*args, "resume=true")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("skipped:") == 2  # jobs 0 and 1
    parents = _parents(client, exp_id)
    assert [(r.info.run_id, r.info.status) for r in parents] == [(pid, "FINISHED")], \
        [(r.info.run_id, r.info.status, r.data.tags.get("sweep_dir")) for r in parents]
    assert (sweep_dir / PARENT_ID_FILE).read_text() == pid
    kids = {job_number(k): k for k in _children(client, exp_id, pid)}
    assert sorted(kids) == [0, 1, 2, 3]
    assert {j: k.info.status for j, k in kids.items()} == dict.fromkeys(range(4), "FINISHED")
    assert {j: kids[j].info.run_id for j in (0, 1)} == first  # not linked again
    running = [r.info.run_name for r in client.search_runs([exp_id])
               if r.info.status == "RUNNING"]
    assert running == []
    # the finished jobs' own files are kept, not replaced by SKIPPED stubs
    kept = json.loads((sweep_dir / "0" / "results.json").read_text())
    assert kept["status"] == "FINISHED" and kept["requests"], kept["status"]
    # hf (sdpa) against its baseline hf_kv (eager) is a gate sweep: every metric its jobs,
    # the gate and the parent logged is defined in the metric catalog (docs/metrics.md)
    from pipeline.metrics.catalog import logged_metric_keys, uncovered

    keys = logged_metric_keys(client, [k.info.run_id for k in kids.values()])
    assert any(k.startswith("gate.job") for k in keys) and "jobs_total" in keys, sorted(keys)
    assert uncovered(keys) == []
