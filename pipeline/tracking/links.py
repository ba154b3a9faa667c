"""Links into the MLflow UI: the ``mlflow ui`` command for a store and the URLs of an
experiment's runs table, one run's page and the compare page (MLflow 3's hash routes)."""

from __future__ import annotations

import json
import urllib.parse

#: the address ``mlflow ui`` serves on by default (see :func:`ui_command`)
LOCAL_UI = "http://127.0.0.1:5000"


def ui_command(uri: str) -> str:
    """A light, local MLflow UI command for this store (one worker, loopback only)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --workers 1"


def ui_base(uri: str) -> str:
    """The UI's address: the tracking server itself, or the local ``mlflow ui``'s."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


#: runs ordered by name: with MLflow's default order (start time) its UI nests the children
#: under their collapsed parent row, so a page filtered to them shows one row
FLAT_ORDER = "&orderByKey=" + urllib.parse.quote("tags.`mlflow.runName`") + "&orderByAsc=true"


def runs_url(uri: str, exp_id: str, parent_run_id: str | None = None, flat: bool = True
             ) -> str:
    """The experiment's runs table (MLflow 3's hash route ``#/experiments/<id>/runs``),
    filtered to a sweep's child runs when ``parent_run_id`` is given (listed flat, by name,
    unless ``flat=False``)."""
    url = f"{ui_base(uri)}/#/experiments/{exp_id}/runs"
    if parent_run_id:
        flt = f"tags.mlflow.parentRunId = '{parent_run_id}'"
        url += "?searchFilter=" + urllib.parse.quote(flt, safe="") + (FLAT_ORDER if flat
                                                                        else "")
    return url


def run_url(uri: str, exp_id: str, run_id: str) -> str:
    """One run's page (MLflow 3's hash route ``#/experiments/<id>/runs/<run id>``, its
    ``Routes.runPage``)."""
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs/{run_id}"


def compare_url(uri: str, exp_id: str, run_ids: list[str]) -> str:
    """MLflow's compare page for these runs (``#/compare-runs?runs=[..]&experiments=[..]``,
    the format of MLflow 3's ``Routes.getCompareRunPageRoute``)."""
    runs = urllib.parse.quote(json.dumps(sorted(set(run_ids)), separators=(",", ":")), safe="")
    exps = urllib.parse.quote(json.dumps([exp_id], separators=(",", ":")), safe="")
    return f"{ui_base(uri)}/#/compare-runs?runs={runs}&experiments={exps}"


def ui_hint(uri: str, exp_id: str | None = None, parent_run_id: str | None = None,
            run_ids: list[str] | None = None, run_id: str | None = None) -> str:
    """What to print after a run or sweep: the UI command, then (when the experiment is
    known) the run's own page (``run_id``, a plain run), the runs page (the sweep's, with
    ``parent_run_id``) and the compare page of the sweep's runs."""
    lines = [ui_command(uri)]
    if exp_id is not None:
        if run_id:
            lines.append(f"run:     {run_url(uri, exp_id, run_id)}")
        lines.append(f"runs:    {runs_url(uri, exp_id, parent_run_id)}")
        if run_ids and len(run_ids) > 1:
            lines.append(f"compare: {compare_url(uri, exp_id, run_ids)}")
    return "\n  ".join(lines)
