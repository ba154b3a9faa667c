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


_CHECK_SCRIPT = """
import json, sys
from hydra import compose, initialize_config_dir
from pipeline.config import register_configs
from pipeline.experiment import check_inputs
register_configs()
out = []
with initialize_config_dir(config_dir=sys.argv[2], version_base="1.3"):
    for overrides, _ in json.loads(sys.argv[1]):
        try:
            check_inputs(compose(config_name="config", overrides=overrides))
            out.append(None)
        except Exception as e:
            out.append(str(e))
print(json.dumps({"messages": out, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}))
"""


def assert_refused_early(cases: list[tuple[list[str], str]]) -> None:
    """Each ``(overrides, needle)`` is refused by ``check_inputs`` with a one-line message
    containing ``needle``, and all of them together import neither torch nor transformers
    (one fresh interpreter checks every case)."""
    import json

    p = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT, json.dumps(cases),
                        str(ROOT / "conf")], cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    for (overrides, needle), msg in zip(cases, report["messages"], strict=True):
        assert msg is not None, f"{overrides} was accepted"
        assert needle in msg, (overrides, msg)
        assert "\n" not in msg
    assert not report["torch"] and not report["transformers"]
