"""MLflow tracking: job runs and the store (:mod:`.mlflow`), the sweep's Hydra callback
(:mod:`.sweep`), logging job folders after the fact (:mod:`.sync`), terminal tables
(:mod:`.table`).

The names the jobs use are re-exported here. :mod:`.sweep` is not imported here: it needs
:mod:`pipeline.parity`, which needs :mod:`.mlflow`, and importing it from the package
would close that loop.
"""

from pipeline.tracking.mlflow import (
    PARENT_ID_FILE,
    RUN_ID_FILE,
    TrackingUnavailable,
    client_for,
    compare_url,
    default_store_uri,
    find_finished,
    log_job,
    log_metrics,
    read_parent_id,
    run_url,
    runs_url,
    sqlite_artifact_root,
    store_paths,
    tracking_uri,
    ui_command,
    ui_hint,
)
from pipeline.tracking.table import format_table

__all__ = [
    "PARENT_ID_FILE", "RUN_ID_FILE", "TrackingUnavailable", "client_for", "default_store_uri",
    "find_finished", "format_table", "log_job", "log_metrics", "read_parent_id", "store_paths",
    "tracking_uri", "ui_command", "ui_hint", "runs_url", "run_url", "compare_url",
    "sqlite_artifact_root",
]
