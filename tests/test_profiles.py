"""Load profiles (workload.profile): planning, timing conventions, saturation, SLO search.

Saturation and stopping are checked against a *stub* server with a known capacity
(``tests/stub_engine.py``), because a real server cannot be made to have an analytic one:
a continuous-batching engine whose step lasts ``a + b * n`` with ``n`` requests active.
Here a = 20 ms, b = 10 ms, T = 8 tokens: capacity λ_max = 1 / (T b) = 12.5 req/s. The SLO
search against the analytic SLO rate, through run.py with the serving preset's own
defaults, is ``tests/test_profile_capacity.py``. Every load test sends only to 127.0.0.1,
a bounded number of requests, and ends itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config, DecodingConfig, ModelConfig, WorkloadConfig
from pipeline.errors import ConfigError
from pipeline.metrics import performance
from pipeline.records import RequestRecord
from pipeline.workload.profiles import SaturationRule, SloSearch, sweep_rates
from tests.conftest import (
    CACHE_DIR,
    assert_blocks_follow_hash_ids,
    compose_config,
    trace_prompts_by_line,
)
from tests.stub_engine import capacity, stub_server

A_S, B_S, T_TOKENS = 0.020, 0.010, 8
CAPACITY = capacity(B_S, T_TOKENS)  # 12.5 req/s


@pytest.fixture(scope="module")
def stub() -> Iterator[str]:
    with stub_server(A_S, B_S) as url:
        yield url


def _backend(url: str, model_dir: str) -> Any:
    from pipeline.backends.openai import OpenAIBackend, OpenAIBackendConfig

    b = OpenAIBackend(model_dir, ModelConfig(), OpenAIBackendConfig(base_url=url), seed=0)
    b.load()
    return b


def _spec(**w: Any) -> Config:
    from pipeline.backends.openai import OpenAIBackendConfig

    base: dict[str, Any] = dict(prompts=["hi", "hello", "hey"], max_new_tokens=T_TOKENS,
                                warmup=0, arrival="gamma", burstiness=1000.0,
                                point_requests=24, point_grace_s=3.0,
                                max_dispatch_lag_ms=1000.0, request_timeout_s=30.0)
    return Config(model=ModelConfig(), backend=OpenAIBackendConfig(), decoding=DecodingConfig(),
                  workload=WorkloadConfig(**{**base, **w}))


def _run(url: str, model_dir: str, spec: Config) -> tuple[list, dict, list]:
    from pipeline.measure.timing import PhaseTimer
    from pipeline.serving.runner import run_profile
    from pipeline.workload import make_requests

    b = _backend(url, model_dir)
    reqs = make_requests(spec.workload.prompts, b.tokenizer, True)
    points: list[dict] = []
    records, metrics = run_profile(b, spec, reqs, PhaseTimer(), points)
    return records, metrics, points


# ------------------------------------------------------------------ against the stub


def test_over_capacity_point_is_stopped_as_saturated(stub: str, model_dir: str) -> None:
    spec = _spec(profile="ramp", ramp_start_rate=CAPACITY * 2, ramp_end_rate=CAPACITY * 2,
                 sweep_points=1, point_requests=None, point_duration_s=5.0)
    records, m, points = _run(stub, model_dir, spec)
    (p,) = points
    assert p["saturated"], p["stop_reason"]
    assert p["stop_reason"].startswith("saturated")  # the live rule ended it
    assert p["requests_sent"] < p["requests_scheduled"]  # ended early
    # a ratio, not a timing: what it achieved fell short of what was offered, and its
    # capacity is the achieved rate
    assert p["achieved_rate"] < 0.9 * p["offered_rate_realized"]
    assert p["achieved_rate"] <= p["completion_rate"]
    assert m["saturation_rate"] == pytest.approx(CAPACITY * 2)
    assert all(r.extra["point"] == 0 for r in records)


def test_sweep_rates_follow_the_measured_ends(stub: str, model_dir: str) -> None:
    spec = _spec(profile="sweep", sweep_points=2, point_requests=12)
    _, m, points = _run(stub, model_dir, spec)
    sync, mx = points[0]["achieved_rate"], points[1]["achieved_rate"]
    assert [p["offered_rate"] for p in points[2:]] == pytest.approx(sweep_rates(sync, mx, 2))
    assert mx > sync  # the stub batches: all at once beats one at a time
    assert all(p["valid"] for p in points), [p["invalid_reasons"] for p in points]
    assert m["sync_requests_per_s"] == sync and m["max_throughput_requests_per_s"] == mx
    for p in points:
        assert p["token_count_mismatches"] == 0 and p["errors"] == 0
        assert "ttft_sched_ms_p99" in p and "dispatch_lag_ms_p99" in p


def test_point_duration_stops_dispatch_at_the_deadline(stub: str, model_dir: str) -> None:
    spec = _spec(profile="ramp", ramp_start_rate=2.0, ramp_end_rate=2.0, sweep_points=1,
                 point_requests=None, point_duration_s=1.5)
    _, _, (p,) = _run(stub, model_dir, spec)
    assert p["stop_reason"].startswith("duration") and not p["saturated"]
    assert p["requests_scheduled"] == 4 and 3 <= p["requests_sent"] <= 4  # 0, .5, 1, (1.5)
    assert p["errors"] == 0 and p["valid"], p["invalid_reasons"]


def test_prometheus_text_is_read_and_differenced() -> None:
    from pipeline.serving.engine_metrics import EngineSampler, parse_prometheus

    text = ('# HELP vllm:kv_cache_usage_perc KV-cache usage.\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
            'vllm:num_preemptions_total{engine="0"} 3.0\n'
            'vllm:prefix_cache_queries_total{engine="0"} 100\n'
            'vllm:prefix_cache_hits_total{engine="0"} 40\n')
    s = parse_prometheus(text)
    assert s["vllm:kv_cache_usage_perc"] == 0.25 and s["vllm:num_preemptions_total"] == 3.0
    e = EngineSampler(None)
    e.before = s
    e.after = {**s, "vllm:num_preemptions_total": 5.0, "vllm:prefix_cache_queries_total": 200,
               "vllm:prefix_cache_hits_total": 90}
    e.peaks = {"kv_cache_usage": 0.5}
    m = e.metrics()
    assert m["engine_preemptions"] == 2.0 and m["engine_kv_cache_usage_max"] == 0.5
    assert m["engine_prefix_cache_hit_rate"] == pytest.approx(50 / 100)
    assert EngineSampler(None).metrics() == {}  # no /metrics: no engine figures


# ------------------------------------------------------------------ pure planning


def test_slo_search_brackets_then_bisects() -> None:
    s = SloSearch(start=10.0, tolerance=0.05, budget=20)
    truth = 3.3
    while (r := s.next_rate()) is not None:
        s.record(r, r <= truth)
    assert s.lo is not None and s.hi is not None
    assert s.lo <= truth < s.hi and (s.hi - s.lo) / s.lo <= 0.05
    assert s.tried <= 10
    up = SloSearch(start=1.0, tolerance=0.1, budget=3)  # passes: doubles, within budget
    while (r := up.next_rate()) is not None:
        up.record(r, True)
    assert up.answer == 4.0 and up.tried == 3


def test_sweep_rates_exclude_sync_and_include_max() -> None:
    assert sweep_rates(1.0, 5.0, 4) == [2.0, 3.0, 4.0, 5.0]
    assert sweep_rates(2.0, 1.0, 2) == [2.0, 2.0]  # no batching gain: flat


class _L:
    def __init__(self, due: float, t_start: float | None, t_first: float | None,
                 t_end: float | None) -> None:
        self.due, self.t_start, self.t_first_token, self.t_end = due, t_start, t_first, t_end


def test_saturation_rule_needs_both_signs_twice() -> None:
    rule = SaturationRule(offered_rate=10.0)
    # 40 requests sent at 10/s over 4 s; only the first 10 finished; TTFT grows
    live = [_L(i / 10, i / 10, i / 10 + 0.05 + 0.05 * i if i < 20 else None,
               i / 10 + 0.5 if i < 10 else None) for i in range(40)]
    assert rule(live, 4.0) is None  # the first hit is not enough
    assert rule(live, 4.25) is not None and rule.last.startswith("saturated")
    # the same completion shortfall with a flat TTFT is not saturation
    flat = [_L(i / 10, i / 10, i / 10 + 0.05, i / 10 + 0.5 if i < 10 else None)
            for i in range(40)]
    rule2 = SaturationRule(offered_rate=10.0)
    assert rule2(flat, 4.0) is None and rule2(flat, 4.25) is None
    # keeping up (every request done 0.5 s after its send) is not saturation either
    ok = [_L(i / 10, i / 10, i / 10 + 0.05 * i, i / 10 + 0.5) for i in range(36)]
    rule3 = SaturationRule(offered_rate=10.0)
    assert rule3(ok, 4.0) is None and rule3(ok, 4.25) is None


# ------------------------------------------------------------------ timing conventions


def _rec(due: float, lag: float, queue: float, ttft: float, e2el: float, n: int,
         gaps: list[float] | None = None) -> RequestRecord:
    start = due + lag + queue
    times = [start + ttft]
    for g in gaps or []:
        times.append(times[-1] + g)
    return RequestRecord(index=0, prompt="p", text="", prompt_tokens=1, output_token_ids=[],
                         t_start=start, t_first_token=start + ttft, t_end=start + e2el,
                         token_times=times, n_output_tokens=n,
                         extra={"t_scheduled": due, "dispatch_lag_s": lag,
                                "client_queue_s": queue})


def test_timing_fields_on_hand_made_timelines() -> None:
    # A: scheduled at 0, sent 10 ms late, TTFT 100 ms, E2EL 400 ms, 4 tokens (gaps 100)
    # B: scheduled at 1, sent on time after 50 ms in the client queue, TTFT 200, E2EL 300,
    #    2 tokens (gap 100)
    a = _rec(0.0, 0.010, 0.0, 0.100, 0.400, 4, [0.1, 0.1, 0.1])
    b = _rec(1.0, 0.0, 0.050, 0.200, 0.300, 2, [0.1])
    lat = performance.latency_metrics([a, b])
    assert lat["ttft_ms_mean"] == pytest.approx(150.0)  # vLLM's: from the actual send
    sch = performance.schedule_metrics([a, b])
    # MLPerf's: from the scheduled send, so lag and client queueing are included
    assert sch["ttft_sched_ms_mean"] == pytest.approx((110 + 250) / 2)
    assert sch["e2el_sched_ms_mean"] == pytest.approx((410 + 350) / 2)
    assert sch["dispatch_lag_ms_p50"] == pytest.approx(5.0)  # queueing is not lag
    assert sch["dispatch_lag_ms_p99"] == pytest.approx(9.9)
    w = performance.weighted_means([a, b])
    # request-weighted TPOT: mean(300/3, 100/1) = 100; token-weighted: 400/4 = 100
    assert lat["tpot_ms_mean"] == pytest.approx(100.0)
    assert w["tpot_ms_token_weighted_mean"] == pytest.approx((300 + 100) / (3 + 1))
    c = _rec(2.0, 0.0, 0.0, 0.1, 0.1 + 0.9, 10, [0.1] * 9)  # a long request: TPOT 100
    d = _rec(3.0, 0.0, 0.0, 0.1, 0.1 + 0.5, 2, [0.5])       # a short slow one: TPOT 500
    lat2 = performance.latency_metrics([c, d])
    w2 = performance.weighted_means([c, d])
    assert lat2["tpot_ms_mean"] == pytest.approx(300.0)  # each request weighs the same
    assert w2["tpot_ms_token_weighted_mean"] == pytest.approx(1400 / 10)  # each token
    assert w2["itl_ms_request_weighted_mean"] == pytest.approx(300.0)
    assert lat2["itl_ms_mean"] == pytest.approx(1400 / 10)  # pooled gaps: token-weighted


def test_slo_percentiles_count_failures_as_late() -> None:
    ok = [_rec(float(i), 0, 0, 0.1, 0.5, 5, [0.1] * 4) for i in range(9)]
    bad = _rec(9.0, 0, 0, 0.1, 0.5, 5)
    bad.error = "HTTP 500"
    out = performance.slo_percentiles([*ok, bad], {"ttft_ms": 150.0}, 90)
    assert out["slo_ttft_ms_p90"] == pytest.approx(100.0) and out["slo_met"] == 1.0
    out = performance.slo_percentiles([*ok, bad], {"ttft_ms": 150.0}, 95)
    assert out["slo_met"] == 0.0  # the 10th request (failed) is inside the 95th percentile


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_offline_backends_refuse_profiles_before_loading(backend: str, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    p = run_cli(f"backend={backend}", "workload=serving", "workload.profile=sweep",
                f"paths.output_dir={tmp_path}",
                timeout=120)
    assert p.returncode == 2, p.stderr[-800:]
    assert f"workload.profile='sweep' is invalid: backend {backend} is offline" in p.stderr
    assert not list(tmp_path.rglob("results.json"))  # nothing ran, nothing was recorded


def test_profile_keys_are_validated() -> None:
    from pipeline.config import validate_workload

    with pytest.raises(ConfigError, match="slo_search needs at least one"):
        validate_workload(WorkloadConfig(prompts=["x"], profile="slo_search"))
    with pytest.raises(ConfigError, match="workload.ramp_end_rate"):
        validate_workload(WorkloadConfig(prompts=["x"], profile="ramp"))
    with pytest.raises(ConfigError, match="workload.profile='zigzag'"):
        validate_workload(WorkloadConfig(prompts=["x"], profile="zigzag"))


# ------------------------------------------------------------------ report


def _pt(i: int, kind: str, offered: float | None, achieved: float, ttft99: float,
        **kw: Any) -> dict[str, Any]:
    return {"index": i, "kind": kind, "offered_rate": offered, "achieved_rate": achieved,
            "requests_sent": 8, "requests_completed": 8, "ttft_ms_p50": ttft99 / 2,
            "ttft_ms_p99": ttft99, "itl_ms_p50": 10.0, "itl_ms_p99": 20.0,
            "e2el_ms_p50": 100.0, "e2el_ms_p99": 200.0, "goodput_requests_per_s": achieved,
            "valid": True, "saturated": False, "invalid_reasons": [], **kw}


def test_report_marks_the_knee_saturation_and_invalid_points() -> None:
    from pipeline.report import serving

    pts = [_pt(0, "sync", None, 1.0, 50), _pt(1, "max", None, 5.0, 900),
           _pt(2, "rate", 2.0, 1.95, 60), _pt(3, "rate", 3.0, 2.9, 80),
           _pt(4, "rate", 4.0, 3.0, 400, saturated=True),
           _pt(5, "rate", 3.5, 3.4, 90, valid=False, invalid_reasons=["client_cpu: 99%"])]
    assert serving.knee(pts)["index"] == 3  # kept up, valid, not saturated, fastest
    assert serving.knee(pts[:1] + [pts[4]])["index"] == 0  # none kept up: the sync point
    cs = [{"label": "0: sweep", "index": 0, "points": pts,
           "slo": {"slo_ttft_ms": 500.0, "slo_tpot_ms": None, "slo_e2el_ms": None}}]
    png = serving.figure(cs)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    t = serving.table(cs)
    assert t.loc[3, "flags"] == "knee" and "saturated" in t.loc[4, "flags"]
    assert t.loc[5, "flags"].startswith("INVALID: client_cpu")


# ------------------------------------------------------------------ a real vLLM server


@pytest.mark.slow
@pytest.mark.vllm
def test_sweep_on_a_real_vllm_server(server: Any) -> None:
    """Three points (sync, max, one rate) of 4 requests, 8 tokens, on the module's server
    (tests/conftest.py's fixture: one server, stopped and checked gone at the end)."""
    from pipeline.backends.vllm.config import VLLMServerBackendConfig
    from pipeline.measure.timing import PhaseTimer
    from pipeline.serving.runner import run_profile
    from pipeline.workload import make_requests

    spec = Config(model=ModelConfig(), backend=VLLMServerBackendConfig(),
                  decoding=DecodingConfig(),
                  workload=WorkloadConfig(prompts=["Why is the sky blue?", "Name a fruit."],
                                          max_new_tokens=8, fixed_length=True, warmup=1,
                                          profile="sweep", sweep_points=1, point_requests=4,
                                          slo_ttft_ms=60000.0, request_timeout_s=120.0))
    reqs = make_requests(spec.workload.prompts, server.tokenizer, True)
    points: list[dict] = []
    records, m = run_profile(server, spec, reqs, PhaseTimer(), points)
    assert [p["kind"] for p in points] == ["sync", "max", "rate"]
    assert points[2]["offered_rate"] == pytest.approx(points[1]["achieved_rate"])
    assert len(records) == 12 and all(r.ok and r.output_tokens == 8 for r in records)
    for p in points:
        # vLLM sends token ids: the client's count is exact and must equal usage
        assert p["token_count_mismatches"] == 0 and p["errors"] == 0
        assert p["ttft_sched_ms_p50"] >= p["ttft_ms_p50"] - 1e-6  # scheduled <= sent
        # /metrics was read: the sampler's closing sample at least (a missing endpoint
        # leaves no engine keys at all)
        assert p["engine_metrics_samples"] >= 1 and "engine_kv_cache_usage_max" in p
    assert points[0]["peak_concurrency"] == 1 and points[1]["peak_concurrency"] == 4
    assert m["points_run"] == 3
    # the one rate point is offered the max point's throughput: it sits at capacity, so
    # whether it keeps up is the machine's noise (the capacity answer itself is checked
    # against a stub of known capacity in test_profile_capacity.py); the answer must be
    # that point's achieved rate when it passed, and nothing when it did not
    rate = points[2]
    passed = rate["slo_met"] and not rate["saturated"] and rate["valid"]
    assert m["max_rate_under_slo"] == (rate["achieved_rate"] if passed else 0.0)


#: a trace for a 512-token context: one block a line (hash id 10 opens lines 1, 2 and 4 cut
#: at three lengths, 11 lines 3 and 5), line 6 without hash_ids; lines 1-2 at one time
SIX = [
    {"timestamp": 0, "input_length": 300, "output_length": 4, "hash_ids": [10]},
    {"timestamp": 0, "input_length": 120, "output_length": 3, "hash_ids": [10]},
    {"timestamp": 150, "input_length": 480, "output_length": 2, "hash_ids": [11]},
    {"timestamp": 300, "input_length": 200, "output_length": 5, "hash_ids": [10]},
    {"timestamp": 450, "input_length": 64, "output_length": 3, "hash_ids": [11]},
    {"timestamp": 600, "input_length": 90, "output_length": 2},
]


@pytest.mark.slow
@pytest.mark.vllm
def test_replay_on_a_real_vllm_server(tmp_path: Path, server: Any,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's own path (check_inputs, prepare_requests, measure) replays a trace on the
    module's real vLLM server, the one the sweep above runs on (512-token context, prefix
    caching off): times exact, every length exact by vLLM's own usage, and the prompt token
    ids vLLM echoes (``return_token_ids``) share exactly the trace's blocks."""
    from pipeline.job_checks import check_inputs
    from pipeline.job_measure import measure
    from pipeline.measure.timing import PhaseTimer
    from pipeline.serving import stream
    from pipeline.workload.prepare import prepare_requests

    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(row) + "\n" for row in SIX))
    spec, prompts = check_inputs(compose_config(
        "backend=vllm_server", "backend.max_model_len=512", "workload=trace",
        f"workload.trace_file={f}", "workload.trace_speedup=2", "scoring.perplexity=false",
        f"paths.cache_dir={CACHE_DIR}"))
    requests = prepare_requests(spec, prompts).requests
    # the server's view: vLLM sends the prompt's token ids in a request's first chunk
    echoed: list[list[int]] = []
    on_event = stream.on_event

    def spy(ev: dict[str, Any], *args: Any) -> None:
        for ch in ev.get("choices") or []:
            if ch.get("prompt_token_ids") is not None:
                echoed.append(list(ch["prompt_token_ids"]))
        on_event(ev, *args)

    monkeypatch.setattr(stream, "on_event", spy)
    points: list[dict[str, Any]] = []
    recs, metrics = measure(server, spec, requests, PhaseTimer(), points)
    recs.sort(key=lambda r: r.index)
    assert [r.error for r in recs] == [None] * len(SIX)
    assert [q["kind"] for q in points] == ["trace"] and metrics["num_requests"] == len(SIX)
    # times: t0 + the trace's offsets, bit for bit (see the stub test)
    t0 = recs[0].extra["t_scheduled"]
    assert [r.extra["t_scheduled"] for r in recs] == [
        t0 + (row["timestamp"] - SIX[0]["timestamp"]) / 1000 / 2.0 for row in SIX]
    # lengths, counted by vLLM (usage) and by the output ids it returned
    assert [r.prompt_tokens for r in recs] == [row["input_length"] for row in SIX]
    assert [r.output_tokens for r in recs] == [row["output_length"] for row in SIX]
    assert [len(r.output_token_ids) for r in recs] == [row["output_length"] for row in SIX]
    assert [r.extra["shared_blocks"] for r in recs] == [0, 1, 0, 1, 1, 0]
    # what vLLM tokens it received: the requests' ids exactly, blocks as the hash ids say
    seen = trace_prompts_by_line(SIX, echoed)
    assert seen == [list(q.prompt_token_ids) for q in requests]
    assert assert_blocks_follow_hash_ids(SIX, seen) == (3, 3)
