"""Entry point: ``python run.py`` runs one job, ``python run.py -m ...`` a sweep."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from pipeline.config import check_group_choices, register_configs
from pipeline.errors import ConfigError, JobFailed
from pipeline.overrides import check_overrides

CONF_DIR = Path(__file__).resolve().parent / "conf"
register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    """Hand the composed config to the job; config errors exit 2 in one line. Returns the
    job's status, metrics and error (what a search sweeper reads from Hydra's
    ``JobReturn.return_value``; small, so that it crosses process boundaries cheaply)."""
    from pipeline.job import run_job

    try:
        result = run_job(cfg)
        return {"job_num": result.job_num, "status": result.status,
                "metrics": dict(result.metrics), "error": result.error}
    except ConfigError as e:  # UnsupportedDecoding included
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except JobFailed as e:
        print(f"error: job failed: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:], CONF_DIR)
        check_overrides(sys.argv[1:], CONF_DIR)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: the running job is recorded as FAILED; rerun with resume=true "
              "to skip finished jobs", file=sys.stderr)
        sys.exit(130)
