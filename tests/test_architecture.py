"""The shape of the code: no import cycles, a backend plugs in with one module and one
yaml, and inputs a new user gets wrong are refused before anything loads."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tests.conftest import CACHE_DIR, ROOT, assert_refused_early, run_cli

PIPELINE = ROOT / "pipeline"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Pipeline modules ``path`` imports anywhere, inside functions included (a deferred
    import closes a cycle as surely as a top-level one, only later); imports under
    ``TYPE_CHECKING`` never run and are left out."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != name}


def test_imports_are_read_inside_functions_too() -> None:
    """The cycle check below sees a function-level import (it once read module level only,
    and 55 deferred imports closed cycles it could not see)."""
    src = PIPELINE / "job_measure.py"
    assert "pipeline.serving.runner" in _imports(src, {"pipeline.serving.runner"})


def test_no_import_cycle_in_pipeline() -> None:
    files = sorted(PIPELINE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, modules) for f in files}
    # a package's __init__ runs before any of its submodules: an edge to each of them
    for m in modules:
        parent = m.rpartition(".")[0]
        if parent in graph and parent != m:
            graph[m].add(parent)
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                # a package importing its own submodule is how packages work
                if not all(b.startswith(a + ".") or a.startswith(b + ".")
                           for a, b in zip(cycle, cycle[1:], strict=False)):
                    pytest.fail("import cycle: " + " -> ".join(cycle))
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_no_pipeline_module_over_400_lines() -> None:
    """A module that long mixes concerns; split it along them (each module's docstring names
    its one concern)."""
    long = {str(f.relative_to(ROOT)): n for f in PIPELINE.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 400}
    assert not long, long


def test_every_pipeline_module_names_its_concern() -> None:
    """Each module opens with a docstring saying what it holds."""
    bare = [str(f.relative_to(ROOT)) for f in PIPELINE.rglob("*.py")
            if f.read_text().strip() and not ast.get_docstring(ast.parse(f.read_text()))]
    assert not bare, bare


def test_only_backends_name_a_backend() -> None:
    """Nothing outside pipeline/backends/ imports a particular backend or dispatches on a
    backend's name: those answers come from the backend classes."""
    patterns = [re.compile(r"pipeline\.backends\.(hf|vllm|openai)\b"),
                re.compile(r"backend\.name\s*(==|!=|in\b)"),
                re.compile(r"spec\.backend\.(compile|attn_implementation|tensor_parallel)")]
    offenders = []
    for f in PIPELINE.rglob("*.py"):
        if "backends" in f.relative_to(PIPELINE).parts:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            offenders += [f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
                          for pat in patterns if pat.search(line)]
    assert not offenders, offenders


@pytest.mark.slow
def test_a_backend_plugs_in_with_one_module_and_one_yaml(tmp_path: Path, model_dir: str
                                                         ) -> None:
    conf = ROOT / "tests" / "conf"
    p = run_cli("backend=toy", f"hydra.searchpath=[file://{conf}]",
                "workload.num_prompts=3", "workload.batch_size=2", "workload.max_new_tokens=5",
                "scoring.perplexity=false", f"paths.output_dir={tmp_path}",
                f"paths.cache_dir={CACHE_DIR}", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("runs/*/results.json")).read_text())
    assert res["status"] == "FINISHED"
    assert res["config"]["backend"]["impl"] == "tests.toy_backend:ToyBackend"
    assert res["applied"] == {"echo_offset": 2, "loaded": True, "prompt_rendering": "chat_template"}
    assert len(res["requests"]) == 3
    for r in res["requests"]:
        assert r["output_tokens"] == 5 and r["error"] is None
    assert res["metrics"]["output_tokens_per_s"] > 0
    # the toy's own check runs before anything loads, like any backend's
    p = run_cli("backend=toy", f"hydra.searchpath=[file://{conf}]", "decoding=beam",
                f"paths.output_dir={tmp_path / 'beam'}", timeout=120)
    assert p.returncode == 2 and "backend toy: decoding.num_beams" in p.stderr
    p = run_cli("backend=toy", f"hydra.searchpath=[file://{conf}]", "+backend.nosuch=1",
                f"paths.output_dir={tmp_path / 'bad'}", timeout=120)
    assert p.returncode == 2 and "backend.nosuch=1 is invalid: unknown key" in p.stderr
    assert "echo_offset" in p.stderr


NEW_USER_CASES = [
    (["+decoding.bogus_key=1"], "decoding.bogus_key=1 is invalid: unknown key; allowed keys "
     "are do_sample"),
    (["+backend.bogus=1"], "backend.bogus=1 is invalid: unknown key; allowed keys are "
     "attn_implementation"),
    (["+workload.bogus=1"], "workload.bogus=1 is invalid: unknown key"),
    (["+bogus=1"], "bogus=1 is invalid: unknown key"),
    (["model.path=/some/dir"], "model.path='/some/dir' is invalid: model=smollm2-135m is the "
     "packaged model and takes no path; to run your own weights use model=hf "
     "model.path=/some/dir"),
    (["decoding.top_p=0.5"], "decoding.top_p=0.5 is invalid: only applies when sampling"),
    (["decoding.temperature=0.3"], "decoding.temperature=0.3 is invalid: only applies when "
     "sampling"),
    (["backend.use_cache=maybe"], "backend.use_cache is invalid"),
    (["scoring.reference_metrics=[nosuch]"], "scoring.reference_metrics entry 'nosuch' is "
     "invalid: not a shipped metric"),
    (["backend.impl=nosuch.module:X"], "backend.impl='nosuch.module:X' is invalid: cannot "
     "import it"),
]


def test_new_user_mistakes_are_refused_before_anything_loads() -> None:
    assert_refused_early(NEW_USER_CASES)


def _cuda() -> bool:
    from pipeline.devices import cuda_present

    return cuda_present()


@pytest.mark.skipif(_cuda(), reason="this machine has a GPU: model.device=cuda is valid here "
                    "(test_cuda_on_a_gpu_machine_is_accepted checks that)")
def test_cuda_without_cuda_exits_2_before_anything(tmp_path: Path) -> None:
    p = run_cli("model.device=cuda", f"paths.output_dir={tmp_path}", timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "model.device='cuda' is invalid: no CUDA device" in p.stderr
    assert not (tmp_path / "mlflow").exists()  # no MLflow run was made


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_cuda_on_a_gpu_machine_is_accepted(tmp_path: Path) -> None:
    # the same command on a GPU machine: validated and planned (dry run), not refused
    p = run_cli("model.device=cuda", "dry_run=true", "tracking.enabled=false",
                f"paths.output_dir={tmp_path}", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "is invalid" not in p.stderr
