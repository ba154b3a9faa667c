"""notebooks/colab.ipynb: committed without outputs, and executed end to end on the CPU at tiny
settings (a real sweep on a model folder, the real report, the real MLflow store), with a
kernel on this interpreter, so the notebook never rots."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

from tests.conftest import CACHE_DIR, ROOT

NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"
KERNEL = "infersweep-test"


def _read() -> nbformat.NotebookNode:
    """The committed notebook (read as text: a missing file is a plain FileNotFoundError)."""
    return nbformat.reads(NOTEBOOK.read_text(), as_version=4)


def _outputs_text(cell: nbformat.NotebookNode) -> str:
    """Everything a cell showed: streams, and the text/markdown of displays."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.extend(str(v) for k, v in out.data.items() if k.startswith("text/"))
    return "".join(parts)


def _cell(nb: nbformat.NotebookNode, cid: str) -> nbformat.NotebookNode:
    (cell,) = [c for c in nb.cells if c.get("id") == cid]
    return cell


def test_committed_notebook_is_valid_and_has_no_outputs() -> None:
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    # papermill (and the reader) find the parameters in the cell tagged so
    assert "parameters" in _cell(nb, "parameters").metadata.get("tags", [])
    # every use of google.colab sits under a guard, so the notebook runs outside Colab
    for c in code:
        for line in c.source.splitlines():
            if "google.colab" in line and "IN_COLAB =" not in line:
                assert line.startswith((" ", "#")), f"unguarded Colab line: {line!r}"


@pytest.fixture()
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec on this very interpreter (the venv with ipykernel), found through
    JUPYTER_PATH in a tmp folder, so a fresh clone in CI needs no `jupyter kernelspec
    install` and no user-wide Jupyter files are written."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "infersweep test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return KERNEL


@pytest.mark.slow
def test_notebook_runs_a_sweep_and_shows_its_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_env: str, model_dir: str
) -> None:
    from nbclient import NotebookClient

    out = tmp_path / "out"
    # the parameter cell reads these: the user's-own-model path (the converted packaged model
    # as a plain transformers folder), a 2-job sweep of 2 prompts x 4 tokens
    params = {"INFERSWEEP_MODEL_PATH": model_dir, "INFERSWEEP_DECODINGS": "greedy,topp",
              "INFERSWEEP_NUM_PROMPTS": "2", "INFERSWEEP_MAX_NEW_TOKENS": "4",
              "INFERSWEEP_EXTRA_OVERRIDES": "workload.warmup=0",
              "INFERSWEEP_OUTPUT_DIR": str(out), "INFERSWEEP_CACHE_DIR": str(CACHE_DIR),
              "INFERSWEEP_REPO_DIR": ""}
    for k, v in params.items():
        monkeypatch.setenv(k, v)
    nb = _read()
    # started in notebooks/, as a user's Jupyter would: the cell finds the checkout upwards.
    # timeout: per cell (the sweep is the longest); raises CellExecutionError on any error
    NotebookClient(nb, kernel_name=kernel_env, timeout=600, startup_timeout=120,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    setup = _outputs_text(_cell(nb, "setup"))
    assert f"python: {sys.executable}" in setup and "Colab: False" in setup
    for cid in ("install", "drive"):
        assert "not on Colab" in _outputs_text(_cell(nb, cid))
    (sweep,) = [d for d in (out / "multirun").iterdir() if not d.name.endswith("_plan")]
    assert "valid:" in _outputs_text(_cell(nb, "plan"))
    # the sweep ran on the folder given as MODEL_PATH, both jobs finished
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 2
    assert {r["status"] for r in results} == {"FINISHED"}
    assert {r["config"]["model"]["path"] for r in results} == {model_dir}
    # the report was built and shown inline: its markdown tables and its plots as images
    report_md = out / "reports" / sweep.name / "report.md"
    assert report_md.is_file()
    shown = _cell(nb, "report").outputs
    markdown = "".join(o.data.get("text/markdown", "") for o in shown
                       if o.output_type == "display_data")
    assert "| " in markdown and "greedy" in markdown and "topp" in markdown
    assert sum("image/png" in o.get("data", {}) for o in shown) == len(
        re.findall(r"^!\[.*\]\(.+\.png\)$", report_md.read_text(), flags=re.M))
    # outside Colab the UI cell prints the light command and the sweep's own pages
    ui = _outputs_text(_cell(nb, "mlflow_ui"))
    assert f"sqlite:///{out}/mlflow/mlflow.db --host 127.0.0.1 --port 5000 --workers 1" in ui
    links = [line for line in ui.splitlines() if line.startswith("http://127.0.0.1:5000/#/")]
    assert links and "runs?searchFilter=tags.mlflow.parentRunId" in links[0]  # the sweep's runs
    assert any("#/compare-runs?runs=" in link for link in links)
