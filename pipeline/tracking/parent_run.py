"""A sweep's MLflow parent run: opening it, the file in the sweep folder through which
jobs in other processes attach to it, and taking it over on ``resume=true`` (its owner
tags, the check that its sweep is no longer running, the key that makes two sweeps one)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.tracking.job_runs import log_metrics

PARENT_ID_FILE = "mlflow_parent_run_id"
#: on a sweep's parent run: the host and pid of the sweep process that owns it (written at
#: sweep start and on take-over), so ``resume=true`` can tell a killed sweep from a live one
OWNER_HOST_TAG = "infersweep.owner_host"
OWNER_PID_TAG = "infersweep.owner_pid"


#: the parent runs :func:`open_parent` created in this process: a live sweep's (this one's),
#: never a killed one's, so :func:`take_over_parent` leaves them alone. By run id, not by
#: owner pid: a killed sweep's pid may be this process's again (pid 1 in a container)
_OPENED_HERE: set[str] = set()


def open_parent(client: Any, exp_id: str, sweep_dir: Path, tags: Mapping[str, str]) -> str:
    """Create a sweep's parent run (tag ``kind=sweep``, its folder in ``sweep_dir``) and
    write its id to ``<sweep_dir>/mlflow_parent_run_id`` for the jobs to find."""
    run = client.create_run(exp_id, run_name=f"sweep-{sweep_dir.name}", tags={
        "sweep_dir": str(sweep_dir.resolve()), "kind": "sweep", **tags})
    _OPENED_HERE.add(str(run.info.run_id))
    (sweep_dir / PARENT_ID_FILE).write_text(run.info.run_id)
    return str(run.info.run_id)


class SweepStillOwned(ConfigError):
    """``resume=true`` found the sweep's parent run owned by a sweep that may still run;
    ``run.py`` exits 2 on it, like on any input it refuses."""


def owner_tags() -> dict[str, str]:
    """The parent-run tags naming this process as the sweep's owner."""
    return {OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(os.getpid())}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks, sends
    nothing). A heuristic: the kernel reuses pids, so a long-dead sweep's pid may now be
    another process's, and an unreaped zombie still counts as alive."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    except OSError:
        return False
    return True


def check_owner(run: Any, force: bool = False) -> None:
    """Refuse to take over a parent run whose owning sweep may still be running: its owner
    pid is alive on this host, or it ran on another host (whose processes cannot be
    checked from here). ``force`` (``tracking.force_takeover=true``) skips the check. A
    parent without owner tags (a sweep from before they existed) is taken over as before.
    Raises :class:`SweepStillOwned`."""
    tags = run.data.tags
    host, pid = tags.get(OWNER_HOST_TAG), tags.get(OWNER_PID_TAG)
    if force or not host or not pid or not pid.isdigit():
        return
    rid = run.info.run_id
    if host == socket.gethostname():
        # our own pid can only be a reused one: this process did not start that sweep
        if int(pid) != os.getpid() and pid_alive(int(pid)):
            raise SweepStillOwned(
                f"resume=true: the sweep's MLflow parent run {rid} belongs to process {pid} "
                f"on this host, which is still alive; let that sweep finish or stop it "
                f"(kill {pid}) and rerun; if pid {pid} is not that sweep (pids are reused), "
                f"rerun with tracking.force_takeover=true")
        return
    raise SweepStillOwned(
        f"resume=true: the sweep's MLflow parent run {rid} belongs to process {pid} on host "
        f"{host}, which cannot be checked from {socket.gethostname()}; if that sweep is no "
        f"longer running, rerun with tracking.force_takeover=true")


#: overrides that say how to resume, not what the sweep runs (left out of :func:`sweep_key`)
RESUME_KEYS = ("resume=", "tracking.force_takeover=")


def sweep_key(overrides: list[str]) -> str:
    """What makes two sweeps the same sweep: their overrides, in a fixed order and without
    :data:`RESUME_KEYS` (a resumed sweep adds ``resume=true``, perhaps
    ``tracking.force_takeover=true``, to the killed one's command)."""
    return " ".join(sorted(o for o in overrides
                           if not o.lstrip("+~").startswith(RESUME_KEYS)))


def take_over_parent(client: Any, exp_id: str, sweep_dir: Path, key: str,
                     force: bool = False) -> str | None:
    """With ``resume=true``: a parent run left RUNNING by a killed sweep with the same
    :func:`sweep_key` becomes this sweep's parent (its id written to
    ``<sweep_dir>/mlflow_parent_run_id``, its owner tags now naming this process), whatever
    folder this sweep uses: a new one or the killed sweep's own (``hydra.sweep.dir``).
    The one that folder's id file names is taken when it is a candidate (its job folders'
    runs are its children), else the newest; the other ones left RUNNING are marked KILLED.
    Parents this process opened itself are never candidates. None when there is none.
    Raises :class:`SweepStillOwned`, before changing anything, when one of them may still
    belong to a live sweep (:func:`check_owner`; ``force`` skips that check)."""
    runs = client.search_runs(
        [exp_id], filter_string="tags.kind = 'sweep' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"], max_results=100)
    same = [r for r in runs if r.data.tags.get("sweep_key") == key
            and r.info.run_id not in _OPENED_HERE]
    if not same:
        return None
    for candidate in same:  # all of them: the others would be marked KILLED
        check_owner(candidate, force)
    in_folder = read_parent_id(sweep_dir)
    run = next((r for r in same if r.info.run_id == in_folder), same[0])
    for old in same:
        if old is not run:
            client.set_terminated(old.info.run_id, "KILLED")
    # one entry per resume, the killed sweep's own folder included when resumed into it
    log_metrics(client, run.info.run_id, tags={**owner_tags(), "resumed_sweep_dirs": " ".join(
        filter(None, [run.data.tags.get("resumed_sweep_dirs"), str(sweep_dir.resolve())]))})
    (sweep_dir / PARENT_ID_FILE).write_text(run.info.run_id)
    return str(run.info.run_id)


def read_parent_id(sweep_dir: Path) -> str | None:
    """The sweep's parent run id, written by :func:`open_parent` at sweep start."""
    f = sweep_dir / PARENT_ID_FILE
    return f.read_text().strip() if f.is_file() else None
