"""Entry point: ``python run.py`` runs one job, ``python run.py -m ...`` a sweep."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pipeline.config import ConfigError, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Hand the composed config to the experiment; config errors exit 2 in one line."""
    from pipeline.backends.base import UnsupportedDecoding
    from pipeline.experiment import run_job

    try:
        run_job(cfg)
    except (ConfigError, UnsupportedDecoding) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
