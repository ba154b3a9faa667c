"""Where the MLflow store is, and a client on it: the default SQLite store under
``<output_dir>/mlflow``, the store a sweep folder logged to, the experiment the runs go to.

The client API (not the fluent one) is used throughout: runs are addressed by id, so a job
in another process (joblib, ray, slurm) needs nothing but the store and a run id.

This module holds the one rule for where the default store is (:func:`default_store_uri`);
the jobs, the sweep callback, ``sync`` and the report all ask it.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: MLflow 3 picks an experiment's landing page from this tag: without it the UI opens on
#: the GenAI "Overview" (traces) page; with ``custom_model_development`` on the runs table
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def store_dir(output_dir: str | Path) -> Path:
    """The default store's folder, ``<output_dir>/mlflow`` (absolute)."""
    return Path(output_dir).expanduser().resolve() / "mlflow"


def default_store_uri(output_dir: str | Path) -> str:
    """The default store: SQLite at ``<output_dir>/mlflow/mlflow.db``, absolute, so jobs
    started from other working directories find the same file."""
    return f"sqlite:///{store_dir(output_dir) / 'mlflow.db'}"


def store_paths(output_dir: str | Path) -> tuple[str, str]:
    """Default store URI and artifact root under ``output_dir`` (the folder is created)."""
    base = store_dir(output_dir)
    base.mkdir(parents=True, exist_ok=True)
    return default_store_uri(output_dir), (base / "artifacts").as_uri()


def sqlite_artifact_root(uri: str) -> str | None:
    """For a SQLite store, ``<db folder>/artifacts`` as a file URI (the folder is not
    created: MLflow makes it on the first artifact); None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):]
    if not db or db == ":memory:":
        return None
    return (Path(db).expanduser().resolve().parent / "artifacts").as_uri()


def tracking_uri(cfg: Any) -> str:
    """``tracking.uri`` if set, else the default SQLite store (its folder is created:
    SQLite makes the file, not the folder)."""
    return cfg.tracking.uri or store_paths(cfg.paths.output_dir)[0]


def store_for_sweep_dir(sweep_dir: Path) -> str | None:
    """The store a sweep folder logged to: its ``tracking.uri`` (from Hydra's
    ``multirun.yaml``) when set, else the default store of its output dir
    (``<output_dir>/multirun/<time>``) when that file exists."""
    multirun = sweep_dir / "multirun.yaml"
    if multirun.is_file():
        from omegaconf import OmegaConf

        try:
            uri = OmegaConf.select(OmegaConf.load(multirun), "tracking.uri")
        except Exception:  # an unreadable file only loses the hint
            uri = None
        if uri:
            return str(uri)
    output_dir = sweep_dir.expanduser().resolve().parent.parent
    return default_store_uri(output_dir) if (store_dir(output_dir) / "mlflow.db").is_file() \
        else None


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer."""


def probe(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when a remote tracking server is down: MLflow's own client retries with
    back-off for minutes before giving up."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError) as e:
        raise TrackingUnavailable(f"MLflow server {uri} is unreachable ({e})") from e


def client_for(cfg: Any) -> tuple[Any, str]:
    """An MlflowClient on the configured store and the experiment id.

    A missing experiment is created with its artifacts beside the SQLite store
    (``<db folder>/artifacts``, never ``./mlruns`` of the working directory) and the tag
    ``mlflow.experimentKind=custom_model_development``, so MLflow 3's UI opens on its runs
    table; an existing experiment without that tag gets it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    probe(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        artifacts = sqlite_artifact_root(uri)
        try:
            return client, client.create_experiment(
                cfg.tracking.experiment, artifact_location=artifacts,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another job created it first
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return client, exp.experiment_id
