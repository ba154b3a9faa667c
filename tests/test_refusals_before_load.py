"""What a real run would refuse is refused before any weights load, dry runs included.

The requests are built (tokenizer from the model folder, chat template, exact lengths,
context) before ``backend.load()``; each case runs ``run.py ... dry_run=true`` on the real
packaged model, which a dry run may convert first (once, into the shared cache).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.workload.prepare import PreparedRequests
from tests.conftest import CACHE_DIR, ROOT, run_cli

pytestmark = pytest.mark.slow


def _refused(p, needle: str) -> None:
    assert p.returncode == 2, p.stdout[-1500:] + p.stderr[-1500:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip().startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], p.stderr[-2000:]
    assert "Loading weights" not in p.stdout + p.stderr


def _prepare(*overrides: str) -> PreparedRequests:
    """What ``run.py`` does before any model loads, in this process."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs
    from pipeline.job_checks import check_inputs
    from pipeline.workload.prepare import prepare_requests

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.cache_dir={CACHE_DIR}"])
    spec, prompts = check_inputs(cfg)
    return prepare_requests(spec, prompts)


@pytest.mark.parametrize(("overrides", "needle"), [
    # a prompt longer than the input limit (prompts.py refused it after loading)
    (["workload.max_input_tokens=20"], "workload.max_input_tokens=20 is exceeded by"),
    # vLLM's context smaller than a real prompt + its output (the engine refused it
    # mid-job); the lengths are known only from the rendered prompts (~45 tokens)
    (["backend=vllm", "backend.max_model_len=64", "workload.max_new_tokens=32"],
     "exceeds backend.max_model_len=64"),
    # a reference metric asked for on a workload without references (silently skipped)
    (["scoring.reference_metrics=[f1]"], "scoring.reference_metrics=['f1'] is invalid"),
])
def test_refused_before_loading(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        _prepare(*overrides)


def test_dry_run_refuses_what_the_run_would(tmp_path: Path) -> None:
    """The same checks through ``run.py ... dry_run=true``: one line, exit 2."""
    p = run_cli("workload.max_input_tokens=20", "dry_run=true", f"paths.output_dir={tmp_path}",
                timeout=300)
    _refused(p, "workload.max_input_tokens=20 is exceeded by")


@pytest.fixture(scope="module")
def plain_model(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged model's folder with its chat template removed, as many base models
    and fine-tune checkpoints come."""
    d = tmp_path_factory.mktemp("plain") / "model"
    shutil.copytree(model_dir, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = d / "tokenizer_config.json"
    tc = json.loads(cfg.read_text())
    tc.pop("chat_template", None)
    cfg.write_text(json.dumps(tc))
    return d


def test_chat_template_true_without_a_template_is_refused(plain_model: Path) -> None:
    with pytest.raises(ConfigError, match="model.use_chat_template=true is invalid"):
        _prepare("model=hf", f"model.path={plain_model}", "model.use_chat_template=true")


def test_plain_prompts_are_named_in_the_applied_settings(plain_model: Path,
                                                         tmp_path: Path) -> None:
    """``auto`` without a template runs plain prompts and says so; the job also carries
    its own end time when tracking is off (``python -m pipeline.tracking.sync`` reads it)."""
    p = run_cli("model=hf", f"model.path={plain_model}", "workload.num_prompts=1",
                "workload.max_new_tokens=4", "scoring.perplexity=false",
                "tracking.enabled=false", f"paths.output_dir={tmp_path}", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (results,) = tmp_path.rglob("results.json")
    r = json.loads(results.read_text())
    assert r["applied"]["prompt_rendering"] == "plain"
    assert r["ended_at"] is not None and r["ended_at"] >= r["started_at"]
    assert "prompt_rendering=plain" in p.stdout


def test_packaged_model_renders_with_its_template() -> None:
    assert _prepare().prompt_rendering == "chat_template"
