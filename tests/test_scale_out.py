"""Scale-out: sweeps on the joblib and Ray launchers log to a real `mlflow server`, every job
a child of the sweep's one parent run; the per-GPU lock serializes jobs across processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from tests.conftest import CACHE_DIR, ROOT, run_cli

# The smallest sweep that still has 4 jobs in 2 processes: 2 prompts, 4 new tokens, no
# warm-up, no perplexity (the scorer load would double each job's time).
TINY = ("decoding=greedy,topk", "workload.batch_size=1,2", "workload.num_prompts=2",
        "workload.max_new_tokens=4", "workload.warmup=0", "scoring.perplexity=false",
        f"paths.cache_dir={CACHE_DIR}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:  # is_running() also checks the create time, so a reused pid is not "alive"
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _stop_group(proc: subprocess.Popen, procs: list[psutil.Process]) -> None:
    """SIGTERM the server's process group (its own session), SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    _, left = psutil.wait_procs(_alive(procs), timeout=10)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real MLflow tracking server on 127.0.0.1: SQLite backend, artifacts proxied by the
    server (--serve-artifacts is the default; --artifacts-destination is where it keeps
    them), one worker, no job runner (a huey consumer nobody here uses)."""
    base = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe), "server", "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
           "--artifacts-destination", str(base / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(base / "server.log", "w")  # noqa: SIM115 - open for the fixture's lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    procs: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240  # ~30-45 s on 2 busy cores
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(base / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("mlflow server not up after 240 s: "
                                + (base / "server.log").read_text()[-2000:])
                time.sleep(1)
        procs = _tree(proc.pid)
        yield uri, base
    finally:
        procs = procs or _tree(proc.pid)
        _stop_group(proc, procs)
        log.close()
    assert not _alive(procs), f"mlflow server processes left: {_alive(procs)}"


def _check_sweep(uri: str, experiment: str, server_dir: Path) -> None:
    """4 FINISHED children, all linked to the one FINISHED parent; artifacts uploaded
    through the server into its artifacts destination."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["jobs_total"] == 4
    assert len(children) == 4, [r.info.run_name for r in runs]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    combos = {(c.data.tags["decoding"], c.data.params["workload.batch_size"]) for c in children}
    assert combos == {("greedy", "1"), ("greedy", "2"), ("topk", "1"), ("topk", "2")}
    for c in children:
        arts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"results.json", "generations.json"} <= arts
        stored = server_dir / "artifacts" / exp.experiment_id / c.info.run_id
        assert (stored / "artifacts" / "results.json").is_file()


@pytest.mark.slow
def test_joblib_sweep_logs_children_to_mlflow_server(
        mlflow_server: tuple[str, Path], model_dir: str, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    uri, server_dir = mlflow_server
    p = run_cli("-m", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                f"paths.output_dir={tmp_path}", f"tracking.uri={uri}",
                "tracking.experiment=scale-joblib", timeout=420)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in p.stdout + p.stderr
    _check_sweep(uri, "scale-joblib", server_dir)


@pytest.mark.slow
def test_ray_sweep_logs_children_to_mlflow_server(
        mlflow_server: tuple[str, Path], model_dir: str, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    uri, server_dir = mlflow_server
    # A short temp dir: Ray puts its unix sockets under it (108-byte path limit), and its
    # processes carry it on their command lines, which is how leftovers are found below.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        # The launcher starts a 2-CPU Ray instance in the sweep process (ray.init) and
        # ray.shutdown at that process's exit stops it.
        p = run_cli("-m", *TINY, "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
                    "+hydra.launcher.ray.init.include_dashboard=false",
                    "+hydra.launcher.ray.init._node_ip_address=127.0.0.1",
                    f"+hydra.launcher.ray.init._temp_dir={ray_tmp}",
                    f"paths.output_dir={tmp_path}", f"tracking.uri={uri}",
                    "tracking.experiment=scale-ray", timeout=420)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "(_run_job pid=" in p.stdout + p.stderr  # the jobs ran in Ray workers
        _check_sweep(uri, "scale-ray", server_dir)
    finally:
        left = _ray_processes(ray_tmp, wait_s=30)
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)  # Ray's session logs and sockets
    assert not left, f"Ray processes left after the sweep: {left}"


def _ray_processes(ray_tmp: str, wait_s: float) -> list[psutil.Process]:
    """Live processes of the Ray instance under ``ray_tmp`` (waits up to ``wait_s`` for
    them to go: ray.shutdown at exit stops them, not always before the driver is gone)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(ray_tmp in a for a in proc.info["cmdline"] or ()) \
                        and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(1)


# --- GPU placement: the lock, exercised on CPU by naming the GPU ids and the lock folder ---

HOLDER = textwrap.dedent("""
    import sys, time
    from pipeline.placement import gpu_slot
    lock_dir, gpu, hold_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with gpu_slot(None, lock_dir=lock_dir, gpus=[gpu], poll_s=0.02):
        t0 = time.time()
        print("locked", flush=True)
        time.sleep(hold_s)
        t1 = time.time()
    print(t0, t1, flush=True)
""")


def _holder(lock_dir: Path, gpu: str, hold_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), gpu, str(hold_s)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interval(p: subprocess.Popen) -> tuple[float, float, str]:
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    t0, t1 = map(float, out.split()[-2:])
    return t0, t1, err


def test_gpu_lock_serializes_jobs_on_one_gpu(tmp_path: Path) -> None:
    a = _holder(tmp_path, "0", 1.5)
    assert a.stdout is not None and a.stdout.readline().strip() == "locked"
    b = _holder(tmp_path, "0", 0.2)  # same GPU: must wait for a
    c = _holder(tmp_path, "1", 0.2)  # another GPU: runs at once
    a0, a1, _ = _interval(a)
    b0, b1, b_err = _interval(b)
    c0, c1, _ = _interval(c)
    assert b0 >= a1, "two jobs held GPU 0 at once"
    assert "waiting for GPU lock" in b_err and "gpu-0.lock" in b_err
    assert c0 < a1, "a job on GPU 1 waited for GPU 0"


def test_gpu_lock_is_freed_when_its_holder_is_killed(tmp_path: Path) -> None:
    a = _holder(tmp_path, "0", 60)
    assert a.stdout is not None and a.stdout.readline().strip() == "locked"
    a.kill()  # the kernel drops a flock with its process: no stale lock
    a.communicate(timeout=30)
    b = _holder(tmp_path, "0", 0.1)
    _interval(b)


def test_gpu_slot_reenters_and_releases(tmp_path: Path) -> None:
    from pipeline import placement

    # keep_engines=False: an engine another test module left cached must not keep the lock
    with placement.gpu_slot(None, lock_dir=tmp_path, gpus=["0"], keep_engines=False) as ids:
        assert ids == ["0"]
        with placement.gpu_slot(None, lock_dir=tmp_path, gpus=["0"]):  # same process
            assert placement.held_locks() == [str(tmp_path / "gpu-0.lock")]
        assert placement.held_locks() == [str(tmp_path / "gpu-0.lock")]
    assert placement.held_locks() == []


IMPLS = {"hf": "pipeline.backends.hf:HFBackend",
         "vllm": "pipeline.backends.vllm.engine:VLLMBackend",
         "vllm_server": "pipeline.backends.vllm.server:VLLMServerBackend",
         "openai": "pipeline.backends.openai:OpenAIBackend"}


def _spec(device: str, backend: str = "hf", tp: int = 1, perplexity: bool = True,
          cache_dir: str = "/tmp/cache") -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(device=device),
        backend=SimpleNamespace(name=backend, impl=IMPLS[backend], tensor_parallel_size=tp),
        scoring=SimpleNamespace(perplexity=perplexity),
        paths=SimpleNamespace(cache_dir=cache_dir),
    )


def test_job_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.placement import job_gpus, lock_dir_for

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # as Ray / SLURM set it
    assert job_gpus(_spec("cuda")) == ["3"]
    assert job_gpus(_spec("cuda", backend="vllm", tp=2)) == ["3", "5"]
    assert job_gpus(_spec("cuda", backend="openai", perplexity=False)) == []
    assert job_gpus(_spec("cuda", backend="openai")) == ["3"]  # the scorer is local
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b")
    assert job_gpus(_spec("cuda")) == ["GPU-1a2b"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert job_gpus(_spec("cuda", backend="vllm_server", tp=2)) == ["0", "1"]
    assert lock_dir_for(_spec("cpu")).parent == Path("/tmp/cache/locks")


def test_cpu_jobs_take_no_lock_and_import_no_torch() -> None:
    code = textwrap.dedent("""
        import os, sys
        from types import SimpleNamespace as N
        from pipeline.placement import gpu_slot, job_gpus
        spec = N(model=N(device="cpu"),
                 backend=N(name="hf", impl="pipeline.backends.hf:HFBackend"),
                 scoring=N(perplexity=True), paths=N(cache_dir="/nonexistent"))
        with gpu_slot(spec) as ids:
            assert ids == []
        os.environ["CUDA_VISIBLE_DEVICES"] = ""   # auto with every GPU hidden
        spec.model.device = "auto"
        assert job_gpus(spec) == []
        assert "torch" not in sys.modules
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr


def test_ray_gpu_preset_requests_a_gpu_per_job() -> None:
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    p = run_cli("hydra/launcher=ray_gpu", "hydra.launcher.ray.init.address=auto",
                "--cfg", "hydra", "-p", "hydra.launcher", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    from omegaconf import OmegaConf

    launcher = OmegaConf.create(p.stdout.split("\n", 1)[1])  # drop "# @package" line
    assert launcher._target_.endswith("RayLauncher")
    assert launcher.ray.remote.num_gpus == 1
    assert launcher.ray.init.address == "auto"
    assert launcher.ray.init.object_store_memory is None  # lets ray.init join a cluster
