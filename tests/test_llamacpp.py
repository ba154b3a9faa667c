"""backend=llamacpp: llama.cpp's server (xllamacpp) on the packaged GGUF, on 127.0.0.1.

One real server for the module (4 slots, 1024-token context) serves the streaming tests;
the refusals run through run.py (exit code 2) before anything starts; a plain run.py job
starts its own server and must leave none behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import DecodingConfig
from pipeline.records import Request
from tests.conftest import CACHE_DIR, run_cli

pytest.importorskip("xllamacpp")

SERVER_MODULE = "pipeline.backends.llamacpp.server_process"


def llamacpp_procs(port: int | None = None) -> list[Any]:
    """Live llama.cpp server children (of any process), or the one on ``port``."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if SERVER_MODULE not in cmd or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if port is None or f'"port": {port},' in cmd:
            out.append(p)
    return out


def _gone(port: int, within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while llamacpp_procs(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not llamacpp_procs(port)


@pytest.fixture(scope="module")
def llama(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One llama.cpp server for the module, loaded through backend=llamacpp; after the
    module it is stopped as at the end of a sweep, and its process must be gone."""
    from pipeline.backends.llamacpp.backend import LlamaCppBackend
    from pipeline.backends.llamacpp.config import LlamaCppBackendConfig
    from pipeline.models import preset

    cfg = LlamaCppBackendConfig(n_ctx=1024, n_parallel=4,
                                log_dir=str(tmp_path_factory.mktemp("srv")))
    b = LlamaCppBackend(model_dir, preset("smollm2-135m"), cfg, seed=0)
    b.load()
    port = b.server.port
    yield b
    b.close()
    assert LlamaCppBackend.cached_engines() == 1  # kept for the next job of a sweep
    LlamaCppBackend.shutdown_cached()
    assert _gone(port), "the llama.cpp server outlived shutdown_cached()"


@pytest.fixture(scope="module")
def requests_(llama: Any) -> list[Request]:
    from pipeline.workload import make_requests

    prompts = ["Why is the sky blue?", "Write a haiku about rain.",
               "Name three fruits.", "What is 2 + 2?"]
    return make_requests(prompts, llama.tokenizer, True)


@pytest.mark.slow
def test_streams_records_with_per_token_times_and_exact_lengths(
        llama: Any, requests_: list[Request]) -> None:
    n = 12
    recs = llama.serve(requests_, DecodingConfig(), n, True, [0.0] * len(requests_), 4, 120.0)
    assert [r.index for r in recs] == list(range(len(requests_)))
    for r, q in zip(recs, requests_, strict=True):
        assert r.ok, r.error
        # fixed_length: exactly n tokens each (ignore_eos), counted by the server (usage)
        assert r.output_tokens == n, (r.output_tokens, r.extra)
        assert r.extra["output_tokens_source"] == "usage"
        assert r.prompt_tokens == len(q.prompt_token_ids)  # the same token ids were sent
        times = r.token_times or []
        assert len(times) == n and times == sorted(times)  # one chunk per token, in order
        assert r.t_first_token == times[0] and r.t_start < times[0] <= r.t_end
        # llama.cpp's own endpoint streams each token's id (never re-tokenized text)
        assert len(r.output_token_ids) == n
    applied = llama.applied_settings()
    assert applied["api"] == "completion"
    assert applied["gguf_ftype"] == "Q4_1" and applied["prompt_format"] == "token_ids"
    assert applied["server_slots"] == 4
    assert llama.extra_metrics()["kv_cache_tokens"] == 1024


@pytest.mark.slow
def test_per_request_lengths_are_exact(llama: Any, requests_: list[Request]) -> None:
    import dataclasses

    reqs = [dataclasses.replace(q, max_new_tokens=k) for q, k in zip(requests_, (1, 3, 5, 7),
                                                                      strict=True)]
    recs = llama.generate(reqs, DecodingConfig(), 9, True)
    assert [r.output_tokens for r in recs] == [1, 3, 5, 7]


@pytest.mark.slow
def test_sampling_is_mapped_and_seeded(llama: Any, requests_: list[Request]) -> None:
    d = DecodingConfig(name="s", do_sample=True, temperature=1.5, top_k=50, top_p=0.95,
                       repetition_penalty=1.1)
    body = llama._payload(requests_[0], {"temperature": 1.5, "repetition_penalty": 1.1})
    # llama.cpp's names, its other samplers off, and HF's order (temperature before top-p)
    assert body["repeat_penalty"] == 1.1 and "repetition_penalty" not in body
    assert body["min_p"] == 0.0 and body["samplers"].index("temperature") < \
        body["samplers"].index("top_p")
    one = requests_[:1]

    def texts(dec: DecodingConfig) -> list[str]:
        # one at a time: the sequences batched together change llama.cpp's numerics
        recs = llama.serve(one, dec, 8, True, [0.0] * len(one), 1, 120.0)
        return [r.text for r in recs]

    a, b = texts(d), texts(d)
    assert a == b  # the run's seed goes with every request
    greedy = texts(DecodingConfig())
    assert a != greedy  # and temperature 1.5 actually samples


@pytest.mark.slow
@pytest.mark.parametrize("overrides,needle", [
    (["decoding=beam"], "decoding.num_beams=4 is not supported; llama.cpp's server has no "
                        "beam search"),
    (["decoding.no_repeat_ngram_size=3"], "decoding.no_repeat_ngram_size=3 is not supported"),
])
def test_refused_before_start_with_exit_code_2(overrides: list[str], needle: str,
                                               tmp_path: Path) -> None:
    before = {p.pid for p in llamacpp_procs()}
    p = run_cli("backend=llamacpp", *overrides, f"paths.output_dir={tmp_path}", timeout=120)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert needle in p.stdout + p.stderr
    assert not (tmp_path / "servers").exists()  # no server was started
    assert {p.pid for p in llamacpp_procs()} <= before


def test_hf_folder_is_converted_at_load_and_what_cannot_convert_is_refused(
        model_dir: str, tmp_path: Path) -> None:
    """An HF folder is accepted (converted at load, never in the checks: no GGUF is
    written here); a non-llama folder, chat on a converted GGUF, K-quants and a type for
    a GGUF used as it is are refused before anything starts."""
    import shutil

    from pipeline.job_checks import check_inputs
    from tests.conftest import assert_refused_early, compose_config

    hf = ["backend=llamacpp", "model=hf", f"model.path={model_dir}"]
    spec, _ = check_inputs(compose_config(*hf, f"paths.cache_dir={tmp_path}"))
    assert spec.backend.gguf_type is None and not (tmp_path / "gguf").exists()
    other = tmp_path / "gpt2"
    other.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(model_dir) / f, other / f)
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                   "model_type": "gpt2"}))
    assert_refused_early([
        (["backend=llamacpp", "model=hf", f"model.path={other}"],
         "its architecture GPT2LMHeadModel is not converted to GGUF here"),
        ([*hf, "backend.api=chat"],
         "backend.api='chat' is invalid for backend=llamacpp on an HF folder converted"),
        ([*hf, "backend.gguf_type=Q4_K_M"], "K-quants such as Q4_K_M need llama.cpp's"),
        (["backend=llamacpp", "backend.gguf_type=Q8_0"],
         "backend.gguf_type='Q8_0' is invalid with the packaged model's GGUF"),
    ])


@pytest.mark.slow
def test_run_py_job_end_to_end_leaves_no_server(tmp_path: Path) -> None:
    p = run_cli("backend=llamacpp", "workload.num_prompts=2", "workload.max_new_tokens=4",
                "workload.fixed_length=true", "workload.warmup=0", "scoring.perplexity=false",
                "tracking.enabled=false", f"paths.output_dir={tmp_path}", timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads(next(tmp_path.glob("runs/*/results.json")).read_text())
    assert results["status"] == "FINISHED"
    logs = list((tmp_path / "servers").glob("llamacpp-*.log"))
    assert len(logs) == 1 and next(tmp_path.glob("runs/*/server.log")).stat().st_size > 0
    port = int(logs[0].stem.rsplit("-", 1)[1])
    assert _gone(port, within_s=5.0), "run.py exited but its llama.cpp server lives on"


def test_llamacpp_native_stream_events_read_like_openai_chunks() -> None:
    """llama.cpp's own /completion stream (events as the server sent them to a probe of
    xllamacpp 2026.10.11549): text, token ids, its stop event's counts and stop type."""
    from pipeline.serving.stream import StreamRequest, StreamState, on_event, stream_record

    st = StreamState()
    events = [{"index": 0, "content": "_", "tokens": [79], "stop": False},
              {"index": 0, "content": "c", "tokens": [83], "stop": False},
              {"index": 0, "content": "", "tokens": [], "stop": True, "stop_type": "limit",
               "tokens_predicted": 2, "tokens_evaluated": 4}]
    for i, ev in enumerate(events):
        on_event(ev, st, "completions", float(i))
    req = StreamRequest(index=0, prompt="p", url="u", body={}, prompt_tokens=99)
    r = stream_record(req, st, 0.0, 3.0, None)
    assert r.text == "_c" and r.output_token_ids == [79, 83] and r.prompt_tokens == 4
    assert r.token_times == [0.0, 1.0] and r.extra["finish_reason"] == "length"
    assert r.extra["output_tokens_source"] == "usage"
    # without return_tokens the ids are unknown: none kept, the count is the server's
    st = StreamState()
    on_event({"content": "x", "stop": False}, st, "completions", 0.0)
    on_event({"content": "", "stop": True, "stop_type": "eos", "tokens_predicted": 1,
              "tokens_evaluated": 4}, st, "completions", 1.0)
    r = stream_record(req, st, 0.0, 2.0, None)
    assert r.output_token_ids == [] and r.output_tokens == 1
    assert r.extra["finish_reason"] == "stop"


@pytest.mark.slow
def test_gguf_quant_preset_end_to_end(model_dir: str, tmp_path: Path) -> None:
    """+experiment=gguf_quant on the packaged model's HF folder at tiny settings: hf and
    llama.cpp on its F16, Q8_0 and Q4_0 conversions (kept in the repo's cache, so later
    runs skip converting). Every llama.cpp job is gated against the hf job, without KL
    (llama.cpp cannot score sequences), and the F16 conversion generates hf's greedy tokens
    (measured: all 8 tokens of both prompts identical; asserted: the first 4)."""
    import mlflow

    out = tmp_path / "outputs"
    p = run_cli("-m", "+experiment=gguf_quant", "model=hf", f"model.path={model_dir}",
                "workload.num_prompts=2", "workload.max_new_tokens=8", "workload.warmup=0",
                f"paths.output_dir={out}", f"paths.cache_dir={CACHE_DIR}", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sweep = next(out.glob("multirun/*"))
    results = {n: json.loads((sweep / str(n) / "results.json").read_text()) for n in range(4)}
    assert [r["status"] for r in results.values()] == ["FINISHED"] * 4
    types = {n: r["applied"].get("gguf_type") for n, r in results.items()}
    assert types == {0: None, 1: "F16", 2: "Q8_0", 3: "Q4_0"}
    for n in (1, 2, 3):  # the server ran the converted file of that type
        applied = results[n]["applied"]
        assert applied["gguf_ftype"].startswith(types[n]) and applied["gguf_origin"] == \
            "converted"
        assert Path(applied["gguf_file"]).parent == CACHE_DIR / "gguf"
    gate = json.loads((sweep / "gate.json").read_text())
    pairs = {pp["optimized"]["job"]: pp for pp in gate["pairs"]}
    assert sorted(pairs) == [1, 2, 3]
    for n, pp in pairs.items():
        assert pp["baseline"]["job"] == 0 and pp["optimizations"]["gguf_type"] == types[n]
        assert pp["verdict"] in ("equivalent", "numerics", "degraded", "unverified")
        assert pp["mean_kl"] is None and pp["kl_positions"] == 0  # no KL: not available
        assert pp["ppl_delta"] is not None  # perplexity is the fallback it judges by
    hf_ids = [r["output_token_ids"] for r in results[0]["requests"]]
    f16_ids = [r["output_token_ids"] for r in results[1]["requests"]]
    assert len(hf_ids) == 2 and all(a[:4] == b[:4] for a, b in zip(hf_ids, f16_ids,
                                                                     strict=True))
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs(client.search_experiments()[0].experiment_id)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    for n in (1, 2, 3):
        assert f"gate.job{n}.verdict_code" in parent.data.metrics
        assert f"gate.job{n}.mean_kl" not in parent.data.metrics
        assert parent.data.tags[f"gate.job{n}.verdict"] == pairs[n]["verdict"]
