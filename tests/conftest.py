"""Shared fixtures: the repository root and the converted default model (real weights)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / "outputs" / "cache"


@pytest.fixture(scope="session")
def model_dir() -> str:
    """The packaged SmolLM2-135M, converted once into the repo's cache (as `make run` does)."""
    from pipeline.models import preset, resolve_model

    return resolve_model(preset("smollm2-135m"), CACHE_DIR)


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python run.py ARGS` from the repo root, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env=env,
    )
