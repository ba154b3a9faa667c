"""Failures are isolated and recorded, sweeps resume, nothing measured is lost, bad input
is refused before any model loads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CACHE_DIR, ROOT, assert_refused_early, run_cli

TINY = ("workload.num_prompts=2", "workload.max_new_tokens=4", "workload.warmup=0",
        f"paths.cache_dir={CACHE_DIR}")


def _results(out: Path) -> dict[int, dict]:
    found = {}
    for f in out.glob("multirun/*/*/results.json"):
        r = json.loads(f.read_text())
        found[r["job_num"]] = r
    return found


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens


# --- the catalogue: each bad input, its message, and no model (not even torch) loaded ---

def _catalogue(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    (tmp / "nofield.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    (tmp / "broken.jsonl").write_text('{"prompt": "a"\n')
    (tmp / "blank.txt").write_text("\n\n")
    (tmp / "big.txt").write_text("x" * 200 + "\n")
    (tmp / "prompts.xml").write_text("a\n")
    (tmp / "empty.txt").write_text("")
    f = "workload=file"
    return [
        (["decoding.temperature=-1"], "decoding.temperature=-1.0 is invalid: must be >= 0.0"),
        (["decoding.top_p=1.5"], "decoding.top_p=1.5 is invalid: must be <= 1.0"),
        (["decoding.top_p=0"], "decoding.top_p=0.0 is invalid: must be > 0.0"),
        (["decoding.top_k=-3"], "decoding.top_k=-3 is invalid: must be >= 0"),
        (["decoding.num_beams=0"], "decoding.num_beams=0 is invalid: must be >= 1"),
        (["decoding.repetition_penalty=0"], "decoding.repetition_penalty=0.0 is invalid"),
        (["decoding=temperature", "decoding.temperature=0"], "must be > 0 when do_sample"),
        (["workload.max_new_tokens=0"], "workload.max_new_tokens=0 is invalid: must be >= 1"),
        (["workload.batch_size=0"], "workload.batch_size=0 is invalid"),
        (["workload.repeats=0"], "workload.repeats=0 is invalid"),
        (["workload.concurrency=0"], "workload.concurrency=0 is invalid"),
        (["workload.arrival=uniform"], "allowed values are poisson, gamma"),
        (["model.dtype=int3"], "model.dtype='int3' is invalid: allowed values are float32"),
        (["model.device=tpu"], "model.device='tpu' is invalid"),
        (["backend.attn_implementation=magic"], "backend.attn_implementation='magic'"),
        (["backend.num_threads=0"], "backend.num_threads=0 is invalid"),
        (["backend=vllm", "decoding=combined"],
         "backend vllm: decoding.no_repeat_ngram_size=3 is not supported"),
        (["decoding.length_penalty=2"], "backend hf: decoding.length_penalty"),
        ([f, "workload.prompts_file=/no/such.txt"], "no such file"),
        ([f, f"workload.prompts_file={tmp}/prompts.xml"],
         "must end in .txt, .jsonl, .csv or .parquet, or be a dataset folder"),
        ([f, "workload.prompts_file=/dev/null"], "'/dev/null' is invalid: is not a regular file"),
        ([f, f"workload.prompts_file={tmp}/empty.txt"], "empty.txt' is invalid: is empty"),
        (["workload.max_new_tokens=100000"],
         "workload.max_new_tokens=100000 is invalid: 1 input token (at least) + 100000 output "
         "tokens = 100001 tokens exceeds the model's context of 8192 tokens"),
        # not converted yet: the context comes from the GGUF header, no tensor read
        (["workload.max_new_tokens=100000", f"paths.cache_dir={tmp}/fresh_cache"],
         "8192 tokens (llama.context_length in SmolLM2-135M-Instruct.Q4_1.gguf)"),
        (["workload=synthetic", "workload.input_tokens=8190", "workload.max_new_tokens=32"],
         "8190 input tokens + 32 output tokens = 8222 tokens exceeds the model's context"),
        (["backend=vllm", "workload=synthetic", "workload.input_tokens=2040"],
         "exceeds backend.max_model_len=2048 (the model's context is 8192)"),
        (["workload=synthetic", "workload.output_dist=uniform", "workload.output_min=4",
          "workload.output_max=64"], "for backend hf: it cannot give each request its own"),
        (["workload=synthetic", "workload.shared_prefix_tokens=600"],
         "workload.shared_prefix_tokens=600 is invalid: must be below the shortest input"),
        (["workload.shared_prefix_tokens=10"], "shared prefixes need workload.source=synthetic"),
        (["workload=synthetic", "workload.input_dist=normal", "workload.input_std=10"],
         "workload.input_min=None is invalid: a value is required"),
        ([f, f"workload.prompts_file={tmp}/bad.txt"], "not UTF-8 (line 2)"),
        ([f, f"workload.prompts_file={tmp}/nofield.jsonl"], "line 2: needs a string field"),
        ([f, f"workload.prompts_file={tmp}/broken.jsonl"], "line 1: not valid JSON"),
        ([f, f"workload.prompts_file={tmp}/blank.txt"], "no prompts in it"),
        ([f, f"workload.prompts_file={tmp}/big.txt", "workload.max_prompt_chars=100"],
         "line 1: prompt of 200 characters exceeds workload.max_prompt_chars=100"),
        (["model=hf", "model.path=./no/such/model"], "model.path='./no/such/model'"),
        (["seed=-1"], "seed=-1 is invalid"),
    ]


def test_bad_input_catalogue_fails_early_without_loading_anything(tmp_path: Path) -> None:
    cases = _catalogue(tmp_path)
    assert len(cases) >= 15
    assert_refused_early(cases)


def test_dry_run_validates_a_whole_sweep_without_models(tmp_path: Path) -> None:
    p = run_cli("-m", "dry_run=true", "decoding=greedy,topp,beam", "backend=hf,vllm",
                f"paths.output_dir={tmp_path}", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("valid: ") == 6
    assert not (tmp_path / "mlflow").exists()  # nothing tracked
    p = run_cli("-m", "dry_run=true", "decoding=greedy,combined", "backend=vllm",
                f"paths.output_dir={tmp_path}", timeout=120)
    assert p.returncode == 1 and "no_repeat_ngram_size" in p.stdout + p.stderr


@pytest.mark.slow
def test_one_invalid_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    p = run_cli("-m", "decoding=temperature", "decoding.temperature=0.7,-1,1.0",
                f"paths.output_dir={tmp_path}", *TINY)
    assert p.returncode == 1
    res = _results(tmp_path)
    assert [res[i]["status"] for i in range(3)] == ["FINISHED", "FAILED", "FINISHED"]
    assert "decoding.temperature=-1.0 is invalid" in res[1]["error"]
    assert "1 failed" in p.stdout and "FAILED job 1" in p.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("infersweep").experiment_id])
    by_status = sorted(r.info.status for r in runs if r.data.tags.get("mlflow.parentRunId"))
    assert by_status == ["FAILED", "FINISHED", "FINISHED"]
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert parent.info.status == "FAILED" and parent.data.metrics["jobs_failed"] == 1


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_jobs(tmp_path: Path) -> None:
    args = [sys.executable, "run.py", "-m", "decoding=greedy,topk,topp",
            f"paths.output_dir={tmp_path}", *TINY]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not list(tmp_path.glob("multirun/*/0/mlflow_run_id")):
            assert proc.poll() is None, "sweep ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = _results(tmp_path)
    assert first[0]["status"] == "FINISHED" and 2 not in first

    time.sleep(1.1)  # a new timestamped sweep folder
    p = run_cli(*args[2:], "resume=true")
    assert p.returncode == 0, p.stderr[-2000:]
    sweeps = sorted(tmp_path.glob("multirun/*"))
    again = {json.loads(f.read_text())["job_num"]: json.loads(f.read_text())
             for f in sweeps[-1].glob("*/results.json")}
    assert again[0]["status"] == "SKIPPED"
    assert again[0]["resumed_from"] == (sweeps[0] / "0" / "mlflow_run_id").read_text()
    assert again[1]["status"] == again[2]["status"] == "FINISHED"
    assert again[0]["config_hash"] == first[0]["config_hash"]


@pytest.mark.slow
def test_unreachable_tracking_keeps_results_and_sync_logs_them_later(tmp_path: Path) -> None:
    port = _closed_port()
    p = run_cli(f"tracking.uri=http://127.0.0.1:{port}", f"paths.output_dir={tmp_path}", *TINY,
                timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]  # the measurement itself succeeded
    assert "python -m pipeline.tracking.sync" in p.stderr and "unreachable" in p.stderr
    (job,) = [f.parent for f in tmp_path.glob("runs/*/results.json")]
    r = json.loads((job / "results.json").read_text())
    assert r["status"] == "FINISHED" and r["metrics"]["output_tokens_per_s"] > 0
    assert not (job / "mlflow_run_id").exists()

    store = f"sqlite:///{tmp_path}/later.db"
    s = subprocess.run([sys.executable, "-m", "pipeline.tracking.sync", str(job), "--tracking-uri",
                        store], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("infersweep").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["output_tokens_per_s"] == pytest.approx(
        r["metrics"]["output_tokens_per_s"])
    # every metric a real plain job logs is defined in the metric catalog (docs/metrics.md)
    from pipeline.metrics.catalog import logged_metric_keys, uncovered

    assert uncovered(logged_metric_keys(client, [run.info.run_id])) == []
    # a second sync logs nothing twice
    s2 = subprocess.run([sys.executable, "-m", "pipeline.tracking.sync", str(job), "--tracking-uri",
                         store], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "0 run(s) logged" in s2.stdout


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def preset_dry_runs(tmp_path_factory: pytest.TempPathFactory,
                    model_dir: str) -> dict[str, subprocess.CompletedProcess]:
    """Every experiment preset's dry run as a user types it, two at a time: each is one
    mostly single-threaded process, and the machine has two cores."""
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("presets")
    # a preset that measures an HF folder of the user's gets the packaged model's folder
    needs = {"gguf_quant": [f"model.path={model_dir}"]}

    def one(name: str) -> tuple[str, subprocess.CompletedProcess]:
        return name, run_cli("-m", f"+experiment={name}", "dry_run=true",
                             f"paths.output_dir={base / name}", *needs.get(name, []),
                             timeout=300)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, EXPERIMENTS))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_validates_as_a_sweep(
        name: str, preset_dry_runs: dict[str, subprocess.CompletedProcess]) -> None:
    p = preset_dry_runs[name]
    assert p.returncode == 0, p.stdout[-1500:] + p.stderr[-1500:]
    # each preset sweeps at least two jobs, every one valid ("invalid: ..." lines of
    # failed jobs would contain "valid: ": count whole lines)
    assert sum(ln.startswith("valid: ") for ln in p.stdout.splitlines()) >= 2
    assert "FAILED" not in p.stdout, p.stdout[-1500:]


def test_the_gguf_quant_preset_needs_an_hf_folder(tmp_path: Path) -> None:
    """The packaged model is already a GGUF (no unquantized source to measure the loss
    from): without model.path every job of the preset is refused, naming the key, and the
    sweep exits 1 as any sweep whose jobs failed."""
    p = run_cli("-m", "+experiment=gguf_quant", "dry_run=true",
                f"paths.output_dir={tmp_path}", timeout=180)
    assert p.returncode == 1, p.stdout[-1500:] + p.stderr[-1500:]
    assert p.stderr.count("model.path=None is invalid") == 4, p.stderr[-1500:]
    assert not any(ln.startswith("valid: ") for ln in p.stdout.splitlines())
