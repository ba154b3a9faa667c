"""``resume=true`` on a real store and real ``run.py`` sweeps (the toy backend, so a job
costs seconds): a taken-over parent keeps one child per job, and a parent whose sweep may
still be running is not taken over."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ConfigError
from pipeline.tracking import mlflow as trk
from tests.conftest import CACHE_DIR, ROOT, run_cli
from tests.test_mlflow_usability import TINY

TOY = ("backend=toy", f"hydra.searchpath=[file://{ROOT / 'tests' / 'conf'}]")


def _common(tmp_path: Path) -> tuple[str, ...]:
    return (*TOY, f"paths.output_dir={tmp_path}", f"paths.cache_dir={CACHE_DIR}", *TINY)


def _store(tmp_path: Path) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trk.default_store_uri(tmp_path))
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
    assert parent.data.tags[trk.OWNER_HOST_TAG] == socket.gethostname()
    first_owner = int(parent.data.tags[trk.OWNER_PID_TAG])
    assert not trk.pid_alive(first_owner)  # that run.py has exited
    before = {trk.job_number(r): r for r in _children(client, exp_id, pid)}
    assert {j: r.info.status for j, r in before.items()} == {0: "FINISHED", 1: "FAILED"}
    client.update_run(pid, status="RUNNING")  # as a killed sweep leaves it

    p = run_cli(*args, "resume=true")
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    (again,) = _parents(client, exp_id)  # taken over, not a second parent
    assert again.info.run_id == pid
    assert again.data.tags[trk.OWNER_PID_TAG] != str(first_owner)  # the new owner
    kids = _children(client, exp_id, pid)
    assert sorted(trk.job_number(k) for k in kids) == [0, 1]  # one child per job
    after = {trk.job_number(k): k for k in kids}
    assert after[0].info.run_id == before[0].info.run_id  # skipped, not linked again
    rerun, old_id = after[1].info.run_id, before[1].info.run_id
    assert rerun != old_id
    old = client.get_run(old_id)  # deleted runs are still readable by id
    assert old.info.lifecycle_stage == "deleted"
    assert old.data.tags[trk.SUPERSEDED_TAG] == rerun
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
        client.set_tag(pid, trk.OWNER_PID_TAG, str(owner.pid))
        jobs = _results(tmp_path)
        p = run_cli(*args, "resume=true", timeout=300)
        assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
        err = p.stderr.strip().splitlines()[-1]
        assert err.startswith("error: resume=true:")
        assert pid in err and str(owner.pid) in err and "tracking.force_takeover=true" in err
        assert _results(tmp_path) == jobs  # no job ran
        kept = client.get_run(pid)
        assert kept.info.status == "RUNNING"
        assert kept.data.tags[trk.OWNER_PID_TAG] == str(owner.pid)
    finally:
        owner.kill()
        owner.wait()  # reaped: a zombie would still answer signal 0

    p = run_cli(*args, "resume=true", timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (again,) = _parents(client, exp_id)
    assert again.info.run_id == pid and again.info.status == "FINISHED"
    assert again.data.tags[trk.OWNER_PID_TAG] not in ("", str(owner.pid))
    assert len(_children(client, exp_id, pid)) == 1


def _parent_with_owner(tmp_path: Path, host: str | None, pid: int | None) -> tuple[Any, str,
                                                                                   str]:
    """A RUNNING sweep parent (key ``k``) on a real SQLite store, owned by ``host``/``pid``
    (no owner tags when None: a sweep from before they existed)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("resume")
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    owner = {} if host is None else {trk.OWNER_HOST_TAG: host, trk.OWNER_PID_TAG: str(pid)}
    parent = trk.open_parent(client, exp_id, old_dir, {"sweep_key": "k", **owner})
    return client, exp_id, parent


def test_resume_refuses_another_hosts_parent_unless_forced(tmp_path: Path) -> None:
    """Another host's pid cannot be checked: refused (naming host, pid, the override)
    until ``force`` (``tracking.force_takeover=true``); the forced take-over re-tags the
    parent with this process as owner."""
    client, exp_id, parent = _parent_with_owner(tmp_path, "elsewhere.example", 4242)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    with pytest.raises(trk.SweepStillOwned) as e:
        trk.take_over_parent(client, exp_id, new_dir, "k")
    msg = str(e.value)
    assert parent in msg and "4242" in msg and "elsewhere.example" in msg
    assert "tracking.force_takeover=true" in msg
    assert isinstance(e.value, ConfigError)  # run.py's exit 2 for refused input
    assert not (new_dir / trk.PARENT_ID_FILE).exists()
    assert trk.take_over_parent(client, exp_id, new_dir, "k", force=True) == parent
    tags = client.get_run(parent).data.tags
    assert (tags[trk.OWNER_HOST_TAG], tags[trk.OWNER_PID_TAG]) == \
        (socket.gethostname(), str(os.getpid()))


def test_resume_takes_over_a_parent_without_owner_tags(tmp_path: Path) -> None:
    """Parents of sweeps from before the owner tags are taken over as before."""
    client, exp_id, parent = _parent_with_owner(tmp_path, None, None)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    assert trk.take_over_parent(client, exp_id, new_dir, "k") == parent


def test_force_takeover_is_not_part_of_the_sweep_key() -> None:
    """``tracking.force_takeover=true`` added to a resume still finds the killed sweep."""
    assert trk.sweep_key(["decoding=greedy,beam"]) == trk.sweep_key(
        ["resume=true", "tracking.force_takeover=true", "decoding=greedy,beam"])
