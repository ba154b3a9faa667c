"""Serving: the streaming client, backend=openai and backend=vllm_server.

Fast tests drive the client against a tiny in-process fake OpenAI server (aiohttp.web on
127.0.0.1). Slow tests start one real vLLM server on loopback (module-scoped; the CPU build
on this machine), run concurrent load through both backends, then break things: request
timeouts, an unreachable URL, a model path that cannot load, a server killed mid-run. Every
server this module starts is checked to be gone at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from pipeline.backends.openai import OpenAIBackendConfig, openai_body
from pipeline.config import DecodingConfig, ModelConfig
from pipeline.errors import ConfigError, UnsupportedDecoding
from pipeline.metrics import performance
from pipeline.records import Request
from pipeline.serving.client import StreamRequest, run_requests
from tests.conftest import (
    CACHE_DIR,
    run_cli,
    vllm_server_cfg,
    vllm_server_procs,
)

# ----------------------------------------------------------------------- openai_body (fast)


def test_openai_body_greedy_sends_every_field() -> None:
    body = openai_body(DecodingConfig(), 16, False, 7, "completions")
    assert body == {"n": 1, "max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 7}


def test_openai_body_vllm_extensions_fix_the_length() -> None:
    d = DecodingConfig(do_sample=True, temperature=0.7, top_k=40, top_p=0.9,
                       repetition_penalty=1.1)
    body = openai_body(d, 32, True, 0, "chat", extensions=True)
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.7, 0.9, 40)
    assert body["repetition_penalty"] == 1.1
    assert body["min_tokens"] == 32 and body["ignore_eos"] is True


@pytest.mark.parametrize(
    ("d", "fixed", "match"),
    [
        (DecodingConfig(num_beams=4), False, "num_beams"),
        (DecodingConfig(no_repeat_ngram_size=3), False, "no_repeat_ngram_size"),
        (DecodingConfig(length_penalty=0.5), False, "length_penalty"),
        (DecodingConfig(do_sample=True, temperature=0.7, top_k=50), False, "top_k"),
        (DecodingConfig(repetition_penalty=1.2), False, "repetition_penalty"),
        (DecodingConfig(), True, "fixed_length"),
    ],
)
def test_openai_body_refuses_what_plain_openai_servers_cannot_do(
    d: DecodingConfig, fixed: bool, match: str
) -> None:
    with pytest.raises(UnsupportedDecoding, match=f"backend openai: .*{match}"):
        openai_body(d, 8, fixed, 0, "completions")


def test_beam_search_is_refused_even_with_extensions() -> None:
    with pytest.raises(UnsupportedDecoding, match="backend vllm_server: decoding.num_beams"):
        openai_body(DecodingConfig(num_beams=2), 8, True, 0, "completions", extensions=True,
                    backend="vllm_server")


def test_config_refuses_a_key_in_place_of_an_env_var_name() -> None:
    from pipeline.backends.openai import OpenAIBackend

    with pytest.raises(ConfigError, match="backend.api_key_env"):
        OpenAIBackend.validate_settings(OpenAIBackendConfig(api_key_env="sk-live-1234"))
    with pytest.raises(ConfigError, match="backend.stream"):
        OpenAIBackend.validate_settings(OpenAIBackendConfig(stream=False))
    OpenAIBackend.validate_settings(OpenAIBackendConfig(api_key_env="MY_API_KEY"))


# ----------------------------------------------------------------------- fake server (fast)


class FakeServer:
    """An OpenAI-compatible completions endpoint whose behaviour is picked by the request's
    ``model`` field: ``ok``, ``nousage``, ``http500``, ``stall``, ``cut`` (dies mid-stream)."""

    def __init__(self, tokens: int = 5, gap_s: float = 0.01) -> None:
        self.tokens = tokens
        self.gap_s = gap_s
        self.in_flight = 0
        self.peak = 0
        self.seen: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _models(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"data": [{"id": "ok", "max_model_len": 256}]})

    async def _completions(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        self.seen.append(body)
        self.headers.append(dict(request.headers))
        mode = body["model"]
        if mode == "http500":
            return web.Response(status=500, text="boom")
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            if mode == "stall":
                await asyncio.sleep(30)
            for i in range(self.tokens):
                await asyncio.sleep(self.gap_s)
                if mode == "cut" and i == 2:
                    request.transport.abort()
                    return resp
                choice = {"index": 0, "text": f"t{i} ", "token_ids": [100 + i],
                          "finish_reason": "length" if i == self.tokens - 1 else None}
                await resp.write(_sse({"choices": [choice]}))
            if mode != "nousage":
                usage = {"prompt_tokens": 3, "completion_tokens": self.tokens}
                await resp.write(_sse({"choices": [], "usage": usage}))
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.in_flight -= 1


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _reqs(url: str, mode: str, n: int) -> list[StreamRequest]:
    return [StreamRequest(index=i, prompt=f"p{i}", url=f"{url}/completions",
                          body={"model": mode, "prompt": [1, 2, 3]}, prompt_tokens=3)
            for i in range(n)]


def test_client_records_tokens_usage_and_times() -> None:
    with FakeServer(tokens=5, gap_s=0.02) as srv:
        recs = run_requests(_reqs(srv.url, "ok", 3), [0.0] * 3, None, 10.0)
    for r in recs:
        assert r.ok, r.error
        assert r.output_tokens == 5 and r.output_token_ids == [100, 101, 102, 103, 104]
        assert r.text == "t0 t1 t2 t3 t4 " and r.prompt_tokens == 3
        assert len(r.token_times or []) == 5 and r.t_first_token == r.token_times[0]
        assert r.t_start < r.t_first_token <= r.t_end
        assert all(g >= 0.01 for g in performance.itl(r))
        assert r.extra["output_tokens_source"] == "usage"


def test_client_honours_concurrency_and_send_times() -> None:
    with FakeServer(tokens=4, gap_s=0.05) as srv:
        recs = run_requests(_reqs(srv.url, "ok", 6), [0.0] * 6, 2, 10.0)
        assert srv.peak == 2
    assert all(r.ok for r in recs) and performance.peak_concurrency(recs) == 2
    with FakeServer(tokens=1, gap_s=0.0) as srv:
        recs = run_requests(_reqs(srv.url, "ok", 3), [0.0, 0.3, 0.6], None, 10.0)
    starts = [r.t_start - recs[0].t_start for r in recs]
    assert starts[1] == pytest.approx(0.3, abs=0.1) and starts[2] == pytest.approx(0.6, abs=0.1)


def test_client_counts_chunks_when_the_server_sends_no_usage() -> None:
    with FakeServer(tokens=4) as srv:
        (r,) = run_requests(_reqs(srv.url, "nousage", 1), [0.0], None, 10.0)
    assert r.ok and r.output_tokens == 4 and r.extra["output_tokens_source"] == "token_ids"


@pytest.mark.parametrize(
    ("mode", "timeout", "match"),
    [
        ("http500", 10.0, "HTTP 500"),
        ("stall", 0.5, "timeout"),
        ("cut", 10.0, "connection lost|finish_reason"),
    ],
)
def test_client_turns_failures_into_error_records(mode: str, timeout: float, match: str) -> None:
    t0 = time.perf_counter()
    with FakeServer(tokens=5) as srv:
        recs = run_requests(_reqs(srv.url, mode, 2), [0.0, 0.0], None, timeout)
    assert time.perf_counter() - t0 < 10
    for r in recs:
        assert not r.ok and r.error is not None
        assert __import__("re").search(match, r.error), r.error


def test_client_reports_a_closed_port_as_errors() -> None:
    from pipeline.backends.vllm.server_process import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    recs = run_requests(_reqs(url, "ok", 2), [0.0, 0.0], 1, 5.0)
    assert [r.ok for r in recs] == [False, False]
    assert "cannot connect" in (recs[0].error or "")


def test_openai_backend_sends_the_key_from_the_env_and_never_stores_it(
    monkeypatch: pytest.MonkeyPatch, model_dir: str
) -> None:
    from pipeline.backends.openai import OpenAIBackend
    from pipeline.config import flatten

    secret = "sk-test-SECRET-value-0042"
    monkeypatch.setenv("INFERSWEEP_TEST_KEY", secret)
    with FakeServer(tokens=3) as srv:
        cfg = OpenAIBackendConfig(base_url=srv.url, model="ok", api_key_env="INFERSWEEP_TEST_KEY")
        b = OpenAIBackend(model_dir, ModelConfig(), cfg, seed=0)
        b.load()
        req = Request(index=0, prompt="hi", prompt_token_ids=(1, 2, 3))
        (r,) = b.serve([req], DecodingConfig(), 3, False, [0.0], 1, 10.0)
        assert r.ok and r.output_tokens == 3
        assert srv.headers[-1]["Authorization"] == f"Bearer {secret}"
        assert isinstance(srv.seen[-1]["prompt"], str)  # no extensions: text prompt
        assert "return_token_ids" not in srv.seen[-1] and "ignore_eos" not in srv.seen[-1]
        visible = json.dumps([flatten(cfg), b.applied_settings(), vars(b)], default=str)
        assert secret not in visible
    monkeypatch.delenv("INFERSWEEP_TEST_KEY")
    with pytest.raises(ConfigError, match="INFERSWEEP_TEST_KEY"):
        OpenAIBackend(model_dir, ModelConfig(), cfg, seed=0).load()


def test_openai_backend_fails_clearly_on_an_unreachable_url(model_dir: str) -> None:
    from pipeline.backends.openai import OpenAIBackend
    from pipeline.backends.vllm.server_process import free_port

    cfg = OpenAIBackendConfig(base_url=f"http://127.0.0.1:{free_port()}/v1",
                              connect_timeout_s=3.0)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="cannot reach the server"):
        OpenAIBackend(model_dir, ModelConfig(), cfg, seed=0).load()
    assert time.perf_counter() - t0 < 10


def test_all_requests_failing_fails_the_phase(model_dir: str) -> None:
    from pipeline.backends.openai import OpenAIBackend, ServingFailed

    with FakeServer() as srv:
        b = OpenAIBackend(model_dir, ModelConfig(),
                          OpenAIBackendConfig(base_url=srv.url, model="ok"), seed=0)
        b.load()
        b.served_model = "http500"
        req = Request(index=0, prompt="hi", prompt_token_ids=(1, 2))
        with pytest.raises(ServingFailed, match="all 2 requests failed; first error: HTTP 500"):
            b.serve([req, req], DecodingConfig(), 3, False, [0.0, 0.0], 2, 5.0)


# ----------------------------------------------------------------------- server life (fast)

# A stand-in for the vLLM server: answers /health (after HEALTHY_AFTER seconds, never if
# negative) and starts a grandchild, as vLLM starts its engine core, whose pid it writes;
# on SIGTERM it stops the grandchild and exits, as vLLM shuts its engine down.
FAKE_SERVER = r'''
import http.server, os, signal, subprocess, sys, time
port, delay, pidfile = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(pidfile, "w").write(str(child.pid))
def bye(*a):
    child.terminate(); child.wait(); os._exit(0)
signal.signal(signal.SIGTERM, bye)
t0 = time.time()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = delay >= 0 and time.time() - t0 >= delay
        self.send_response(200 if ok else 503); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _fake_server(tmp: Path, healthy_after: float) -> Any:
    from pipeline.backends.vllm.server_process import VLLMServer, free_port

    script = tmp / "fake_server.py"
    script.write_text(FAKE_SERVER)
    port = free_port()
    import sys

    cmd = [sys.executable, str(script), str(port), str(healthy_after), str(tmp / "child.pid")]
    return VLLMServer(key=("fake", port), env={}, cmd=cmd, log_path=tmp / "fake.log", port=port)


def _gone(pid: int, within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_server_stop_takes_its_whole_process_group(tmp_path: Path) -> None:
    from pipeline.backends.vllm.server import running_servers

    s = _fake_server(tmp_path, healthy_after=0.5)
    s.start(timeout_s=30)
    try:
        assert s.alive() and s in running_servers()
        child = int((tmp_path / "child.pid").read_text())
        assert psutil.pid_exists(child)
    finally:
        s.stop()
    assert not s.alive() and _gone(child) and s not in running_servers()
    assert (tmp_path / "fake.log").read_text().startswith("$ ")


def test_server_that_never_gets_healthy_is_stopped_at_the_timeout(tmp_path: Path) -> None:
    s = _fake_server(tmp_path, healthy_after=-1)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="did not become healthy within"):
        s.start(timeout_s=3)
    assert time.perf_counter() - t0 < 15
    child = int((tmp_path / "child.pid").read_text())
    assert s.proc is not None and s.proc.poll() is not None and _gone(child)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_pipeline_takes_its_server_down(tmp_path: Path, sig: int) -> None:
    """SIGKILL: the kernel's parent-death signal; SIGTERM: our handler; SIGINT (Ctrl-C):
    KeyboardInterrupt, then atexit."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path;"
        "import tests.test_serving as t; s = t._fake_server(Path(sys.argv[2]), 0.2);"
        "s.start(30); print(s.pid, flush=True); time.sleep(600)"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout is not None
        server_pid = int(p.stdout.readline())
        child = int((tmp_path / "child.pid").read_text())
        p.send_signal(sig)
        p.wait(30)
        assert _gone(server_pid) and _gone(child)
    finally:
        if p.poll() is None:
            p.kill()


# ----------------------------------------------------------------------- real vLLM server

@pytest.fixture(scope="module")
def requests_(server: Any) -> list[Request]:
    from pipeline.workload import make_requests

    prompts = ["Why is the sky blue?", "Write a haiku about rain.",
               "Name three fruits.", "What is 2 + 2?"] * 2
    return make_requests(prompts, server.tokenizer, True)


@pytest.mark.slow
def test_vllm_server_runs_concurrent_load(server: Any, requests_: list[Request]) -> None:
    recs = server.serve(requests_, DecodingConfig(), 12, True, [0.0] * len(requests_), 4, 120.0)
    assert [r.index for r in recs] == list(range(len(requests_)))
    for r, q in zip(recs, requests_, strict=True):
        assert r.ok, r.error
        assert r.output_tokens == 12 and len(r.output_token_ids) == 12  # ids from the server
        assert r.prompt_tokens == len(q.prompt_token_ids)  # usage agrees: same tokens sent
        assert len(r.token_times or []) == 12 and r.t_first_token is not None
    assert 2 <= performance.peak_concurrency(recs) <= 4
    lat = performance.latency_metrics(recs)
    assert lat["ttft_ms_mean"] > 0 and lat["tpot_ms_mean"] > 0 and "itl_ms_p99" in lat
    applied = server.applied_settings()
    assert applied["server_max_model_len"] == 512 and applied["prompt_format"] == "token_ids"
    assert server.extra_metrics()["kv_cache_tokens"] > 0


@pytest.mark.slow
def test_openai_backend_on_the_same_server(server: Any, requests_: list[Request],
                                           model_dir: str) -> None:
    from pipeline.backends.openai import OpenAIBackend

    # Extensions on (what a vLLM endpoint accepts): same token ids, so greedy outputs match.
    ext = OpenAIBackend(model_dir, ModelConfig(),
                        OpenAIBackendConfig(base_url=server.base_url, vllm_extensions=True), 0)
    ext.load()
    a = server.serve(requests_[:4], DecodingConfig(), 8, True, [0.0] * 4, 2, 120.0)
    b = ext.serve(requests_[:4], DecodingConfig(), 8, True, [0.0] * 4, 2, 120.0)
    assert [r.output_token_ids for r in a] == [r.output_token_ids for r in b]
    # Plain OpenAI (text prompts, chat API, no ids): counts come from usage alone.
    for api in ("completions", "chat"):
        plain = OpenAIBackend(model_dir, ModelConfig(),
                              OpenAIBackendConfig(base_url=server.base_url, api=api), 0)
        plain.load()
        recs = plain.serve(requests_[:4], DecodingConfig(), 8, False, [0.0] * 4, 4, 120.0)
        assert all(r.ok for r in recs), [r.error for r in recs]
        assert all(0 < r.output_tokens <= 8 and r.output_token_ids == [] for r in recs)
        assert all(r.extra["output_tokens_source"] == "usage" for r in recs)


@pytest.mark.slow
def test_openai_backend_checks_each_request_against_the_servers_context(
        server: Any, requests_: list[Request], model_dir: str) -> None:
    from dataclasses import replace

    from pipeline.backends.openai import OpenAIBackend

    ext = OpenAIBackend(model_dir, ModelConfig(),
                        OpenAIBackendConfig(base_url=server.base_url, vllm_extensions=True), 0)
    ext.load()
    # 500 prompt tokens with their own 8-token output fit the server's 512; the job's
    # 32 would not, and a request without its own length gets the job's
    ids = tuple(requests_[0].prompt_token_ids) * (500 // len(requests_[0].prompt_token_ids) + 1)
    long = replace(requests_[0], prompt_token_ids=ids[:500], max_new_tokens=8)
    (rec,) = ext.serve([long], DecodingConfig(), 32, True, [0.0], 1, 120.0)
    assert rec.ok and rec.prompt_tokens == 500 and rec.output_tokens == 8, rec.error
    with pytest.raises(ConfigError, match=r"500 prompt tokens \+ 32 output tokens = 532 "
                                          r"tokens exceeds backend openai's max_model_len "
                                          r"of 512"):
        ext.serve([replace(long, max_new_tokens=None)], DecodingConfig(), 32, True, [0.0], 1,
                  120.0)


@pytest.mark.slow
def test_jobs_with_the_same_settings_reuse_the_server(server: Any, model_dir: str) -> None:
    from pipeline.backends.vllm.server import VLLMServerBackend, running_servers

    again = VLLMServerBackend(model_dir, ModelConfig(), server.server_cfg, seed=0)
    again.load()
    try:
        assert again.server is server.server and again.extra_metrics()["server_reused"] == 1
        assert len(running_servers()) == 1
    finally:
        again.close()


@pytest.mark.slow
def test_request_timeouts_are_counted_and_fail_the_phase(server: Any,
                                                         requests_: list[Request]) -> None:
    from pipeline.backends.openai import ServingFailed

    t0 = time.perf_counter()
    with pytest.raises(ServingFailed, match="all 4 requests failed; first error: timeout") as e:
        server.serve(requests_[:4], DecodingConfig(), 64, True, [0.0] * 4, 2, 0.05)
    assert time.perf_counter() - t0 < 5
    assert len(e.value.records) == 4 and all("timeout" in (r.error or "")
                                             for r in e.value.records)
    assert server.server.alive()  # the server shrugs off abandoned requests


@pytest.mark.slow
def test_bad_model_path_fails_within_the_timeout_and_leaves_nothing(
    no_orphans: list[int], tmp_path: Path
) -> None:
    pytest.importorskip("vllm")
    from pipeline.backends.vllm import server as vs

    empty = tmp_path / "not_a_model"
    empty.mkdir()
    b = vs.VLLMServerBackend(str(empty), ModelConfig(), vllm_server_cfg(tmp_path), seed=0)
    before = set(no_orphans)
    with pytest.raises(RuntimeError, match="exited with code .* before it became healthy"):
        b.load()
    new = [pid for pid in no_orphans if pid not in before]
    assert new and not vllm_server_procs(new)
    assert b.server is None and not [s for s in vs.running_servers() if s.pid in new]


@pytest.mark.slow
def test_run_py_vllm_server_job_end_to_end(no_orphans: None, tmp_path: Path) -> None:
    p = run_cli("backend=vllm_server", "workload=serving", f"paths.output_dir={tmp_path}",
                f"paths.cache_dir={CACHE_DIR}", "backend.max_model_len=512",
                "backend.max_num_seqs=8", "workload.num_prompts=8", "workload.max_new_tokens=12",
                "workload.concurrency=4", "workload.slo_ttft_ms=60000",
                "workload.slo_tpot_ms=60000", "tracking.enabled=false",
                "scoring.perplexity=false")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (res_file,) = list(tmp_path.glob("runs/*/results.json"))
    res = json.loads(res_file.read_text())
    assert res["status"] == "FINISHED", res.get("error")
    m = res["metrics"]
    for key in ("ttft_ms_mean", "tpot_ms_mean", "itl_ms_p99", "e2el_ms_p90", "peak_concurrency",
                "goodput_requests_per_s", "error_rate", "output_tokens_per_s", "kv_cache_tokens",
                "server_start_s"):
        assert key in m, key
    assert m["error_rate"] == 0 and m["total_output_tokens"] == 8 * 12
    assert 1 <= m["peak_concurrency"] <= 4 and m["goodput_fraction"] == 1.0
    assert (res_file.parent / "server.log").stat().st_size > 0
    pid = res["applied"]["server_pid"]
    assert not vllm_server_procs([pid]), "the job's server outlived run.py"


@pytest.mark.slow
def test_run_py_unreachable_endpoint_fails_the_job(tmp_path: Path) -> None:
    from pipeline.backends.vllm.server_process import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    p = run_cli("backend=openai", f"backend.base_url={url}", "backend.connect_timeout_s=3",
                f"paths.output_dir={tmp_path}", f"paths.cache_dir={CACHE_DIR}",
                "tracking.enabled=false", timeout=300)
    (res_file,) = list(tmp_path.glob("runs/*/results.json"))
    res = json.loads(res_file.read_text())
    assert res["status"] == "FAILED"
    assert "cannot reach the server at" in res["error"] and url in res["error"]
    assert "cannot reach the server" in p.stdout + p.stderr


@pytest.mark.slow
def test_server_killed_mid_run_fails_the_phase_with_errors(
    server: Any, requests_: list[Request]
) -> None:
    """Last on purpose: it kills the module's server."""
    from pipeline.backends.openai import ServingFailed

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["records"] = server.serve(requests_, DecodingConfig(), 400, True,
                                              [0.0] * len(requests_), 2, 60.0)
        except Exception as e:
            outcome["error"] = e

    t = threading.Thread(target=run)
    t0 = time.perf_counter()
    t.start()
    time.sleep(3.0)
    os.killpg(server.server.pid, signal.SIGKILL)
    t.join(90)
    assert not t.is_alive() and time.perf_counter() - t0 < 90
    err = outcome.get("error")
    assert isinstance(err, ServingFailed), outcome
    assert "exited with code" in str(err) and "during the run" in str(err)
    assert err.records and all(not r.ok for r in err.records)
    assert not server.server.alive()
