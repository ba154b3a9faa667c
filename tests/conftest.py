"""Shared fixtures and helpers: the repository root, the converted default model (real
weights), run.py as a user runs it, a finished plain job, composed configs, synthetic report
data and a real vLLM server. Test modules share through here, never by importing each other."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import psutil
    from omegaconf import DictConfig

    from pipeline.backends.vllm.config import VLLMServerBackendConfig
    from pipeline.report.collect import JobRun, SweepData

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
from pipeline.job_checks import check_inputs
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


# ----------------------------------------------------------------------- composing configs


def compose_config(*overrides: str) -> DictConfig:
    """``conf/config.yaml`` composed with ``overrides`` as run.py composes it (not validated)."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# ----------------------------------------------------------------------- a plain run.py job

#: the smallest job worth tracking: two prompts, four tokens, no warm-up, no scorer load
TINY = ("workload.num_prompts=2", "workload.max_new_tokens=4", "workload.warmup=0",
        "scoring.perplexity=false")


@pytest.fixture(scope="session")
def plain_job(tmp_path_factory: pytest.TempPathFactory, model_dir: str) -> Path:
    """The output folder (``<tmp>/outputs``) of one finished plain ``python run.py`` job (no
    ``-m``), tracked in that folder's own MLflow store. Shared by the session: add to it (a
    report), never change or remove what the job wrote."""
    out = tmp_path_factory.mktemp("plain_job") / "outputs"
    p = run_cli(f"paths.output_dir={out}", f"paths.cache_dir={CACHE_DIR}", *TINY)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


# ----------------------------------------------------------------------- synthetic report data


def job_run(n: int, decoding: str, temp: str, tps: float, e2el: float, **extra: Any
            ) -> JobRun:
    """Job ``n`` of a synthetic sweep as the report reads it from MLflow: three requests,
    figures derived from ``tps`` (tokens/s) and ``e2el`` (ms), ``extra`` metrics on top."""
    from pipeline.report.collect import JobRun

    metrics = {"output_tokens_per_s": tps, "e2el_ms_mean": e2el, "ttft_ms_mean": e2el / 4,
               "tpot_ms_mean": e2el / 10, "peak_rss_bytes": 2**30 * (1 + n / 10),
               "perplexity": 2.0 + n, "self_bleu": 0.1 * (3 - n), "distinct_2": 0.5 + n / 10,
               "rep_2": 0.05 * n, **extra}
    t0 = 100.0 + n
    requests = [{"t_start": t0, "t_first_token": t0 + e2el / 4000 * (1 + i / 10),
                 "t_end": t0 + e2el / 1000 * (1 + i / 10), "error": None} for i in range(3)]
    return JobRun(
        run_id=f"run{n}", name=f"{n}-hf-{decoding}-quick", job=n, status="FINISHED",
        start_time=1000 + n,
        tags={"decoding": decoding, "backend": "hf", "model": "m", "workload": "quick",
              "hydra_overrides": f"decoding={decoding} workload.num_prompts=3",
              "git_commit": "abc", "version.torch": "2.13.0", "hardware.cpu": "cpu"},
        params={"decoding.name": decoding, "decoding.temperature": temp, "seed": "0",
                "paths.output_dir": "/tmp/x"},
        metrics=metrics,
        results={"job_num": n, "requests": requests, "applied": {"dtype": "float32"},
                 "provenance": {"date": f"2026-01-0{n + 1}T00:00:00+00:00",
                                "hardware": {"cpu": "cpu", "cpu_count": 2}}},
    )


def sweep_data(jobs: list[JobRun]) -> SweepData:
    """A synthetic sweep of ``jobs`` under one finished parent run."""
    from pipeline.report.collect import SweepData

    return SweepData(
        tracking_uri="sqlite:////tmp/none.db", experiment_id="1", experiment_name="infersweep",
        parent_id="parent", parent_name="sweep-x", parent_status="FINISHED",
        parent_start_time=1_700_000_000_000,
        parent_tags={"kind": "sweep", "sweep_dir": "/o/multirun/2026-01-01_00-00-00",
                     "hydra_overrides": "decoding=greedy,topp workload.num_prompts=3",
                     "command": "run.py -m decoding=greedy,topp workload.num_prompts=3",
                     "git_commit": "abc-dirty"},
        jobs=jobs,
    )


# ----------------------------------------------------------------------- a real vLLM server

def vllm_server_procs(pids: list[int], mine: bool = False) -> list[psutil.Process]:
    """Live vLLM server processes among ``pids``, their descendants and, with ``mine``,
    all descendants of this process."""
    import psutil

    out = []
    cands = list(psutil.Process().children(recursive=True)) if mine else []
    for pid in pids:
        try:
            cands += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            continue
    for p in cands:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.cmdline())
            if "vllm.entrypoints.openai.api_server" in cmd or p.name().startswith("VLLM"):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def no_orphans() -> Iterator[list[int]]:
    """Record every server start; after the module, stop them and prove none survives.
    Yields the PIDs of the servers started so far in the module (a fixture, not a module
    global: pytest imports this file as ``conftest``, a test as ``tests.conftest``)."""
    from pipeline.backends.vllm import server as vs

    started: list[int] = []
    original = vs.VLLMServer.start

    def recording_start(self: Any, timeout_s: float) -> None:
        try:
            original(self, timeout_s)
        finally:
            if self.proc is not None:
                started.append(self.proc.pid)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vs.VLLMServer, "start", recording_start)
        yield started
    vs.VLLMServerBackend.shutdown_cached()
    deadline = time.monotonic() + 20
    while vllm_server_procs(started, mine=True) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = vllm_server_procs(started, mine=True)
    assert not left, [(p.pid, p.name()) for p in left]


def vllm_server_cfg(tmp: Path, **kw: Any) -> VLLMServerBackendConfig:
    """A small ``backend=vllm_server`` config (512-token context, 8 sequences) logging to
    ``tmp``, ``kw`` on top."""
    from pipeline.backends.vllm.config import VLLMServerBackendConfig

    base: dict[str, Any] = dict(max_model_len=512, max_num_seqs=8, log_dir=str(tmp),
                                cache_root=str(CACHE_DIR / "vllm"), startup_timeout_s=600.0)
    return VLLMServerBackendConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def server(no_orphans: list[int], model_dir: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Any]:
    """One vLLM server for the module, loaded through backend=vllm_server."""
    pytest.importorskip("vllm")
    from pipeline.backends.vllm.server import VLLMServerBackend
    from pipeline.config import ModelConfig

    b = VLLMServerBackend(model_dir, ModelConfig(),
                          vllm_server_cfg(tmp_path_factory.mktemp("srv")), seed=0)
    b.load()
    yield b
    b.close()
    VLLMServerBackend.shutdown_cached()


# ---------------------------------------------------------------- trace replay checks

def trace_prompts_by_line(rows: list[dict[str, Any]], prompts: list[list[int]]) -> list[list[int]]:
    """``prompts`` (in any order) put in the order of ``rows``: a prompt's length names its
    line (the lengths of ``rows`` all differ)."""
    lengths = [r["input_length"] for r in rows]
    assert len(set(lengths)) == len(lengths)
    assert sorted(map(len, prompts)) == sorted(lengths)  # every length exact, none twice
    by_len = {len(p): p for p in prompts}
    return [by_len[n] for n in lengths]


def assert_blocks_follow_hash_ids(rows: list[dict[str, Any]], prompts: list[list[int]]
                                   ) -> tuple[int, int]:
    """Lines that share hash id h at block j have the same ids in [512j, 512(j+1)), cut to
    each line's length; blocks of different ids (or of a line without hash_ids) differ.
    Returns (blocks found equal to an earlier line's, pairs of ids found different)."""
    occurrences: dict[Any, list[list[int]]] = {}
    for line, (row, ids) in enumerate(zip(rows, prompts, strict=True), start=1):
        assert all(isinstance(t, int) for t in ids)
        keys = row.get("hash_ids") or [f"line {line} block {j}"
                                       for j in range(-(-row["input_length"] // 512))]
        for j, h in enumerate(keys):
            occurrences.setdefault(h, []).append(ids[512 * j:512 * (j + 1)])
    shared = 0
    for blocks in occurrences.values():
        longest = max(blocks, key=len)
        for b in blocks:
            assert b == longest[:len(b)]  # the same tokens, cut where the line ends
        shared += len(blocks) - 1
    longest = {h: max(bs, key=len) for h, bs in occurrences.items()}
    compared = 0
    for h, a in longest.items():
        for g, b in longest.items():
            n = min(len(a), len(b))
            if str(h) < str(g) and n >= 8:  # a 1-token cut proves nothing either way
                assert a[:n] != b[:n], (h, g)
                compared += 1
    return shared, compared
