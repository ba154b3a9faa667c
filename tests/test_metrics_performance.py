"""Performance metrics on hand-made timelines; expected values worked out by hand."""

from __future__ import annotations

import math

import pytest

from pipeline.metrics.performance import (
    batch_phase_metrics,
    e2el,
    goodput,
    itl,
    latency_metrics,
    mean_ci95,
    peak_concurrency,
    summarize,
    throughput_metrics,
    tpot,
    ttft,
)
from pipeline.records import RequestRecord

STATS = ("mean", "std", "p50", "p90", "p99")


def rec(
    t_start: float,
    t_first: float | None,
    t_end: float,
    n_out: int,
    token_times: list[float] | None = None,
    error: str | None = None,
    prompt_tokens: int = 3,
) -> RequestRecord:
    return RequestRecord(
        index=0,
        prompt="p",
        text="t" * n_out,
        prompt_tokens=prompt_tokens,
        output_token_ids=list(range(n_out)),
        t_start=t_start,
        t_first_token=t_first,
        t_end=t_end,
        token_times=token_times,
        error=error,
    )


# r1: TTFT 100 ms, TPOT (0.5-0.1)/4 = 100 ms, ITL 4 x 100 ms, E2EL 500 ms
R1 = rec(0.0, 0.1, 0.5, 5, token_times=[0.1, 0.2, 0.3, 0.4, 0.5], prompt_tokens=3)
# r2: TTFT 300 ms, TPOT (0.5-0.3)/1 = 200 ms, ITL 1 x 200 ms, E2EL 500 ms
R2 = rec(1.0, 1.3, 1.5, 2, token_times=[1.3, 1.5], prompt_tokens=4)
# failed: must be ignored by latency (its 9 s E2EL would move every E2EL stat)
FAILED = rec(2.0, None, 11.0, 0, error="boom", prompt_tokens=6)


def test_summarize_hand_values() -> None:
    # [1,2,3,4]: mean 2.5; pop. var (2.25+0.25+0.25+2.25)/4 = 1.25;
    # linear percentile rank = 3*q: p50 -> 1.5 -> 2.5, p90 -> 2.7 -> 3.7, p99 -> 2.97 -> 3.97
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s == pytest.approx(
        {"mean": 2.5, "std": math.sqrt(1.25), "p50": 2.5, "p90": 3.7, "p99": 3.97}
    )


def test_summarize_empty_is_empty_dict() -> None:
    assert summarize([]) == {}


def test_single_request_timings() -> None:
    # start 10, first 10.5, end 12.5, 5 tokens 0.5 s apart:
    # TTFT 0.5, E2EL 2.5, TPOT (2.5-0.5)/4 = 0.5, ITL [0.5]*4 (binary-exact values)
    r = rec(10.0, 10.5, 12.5, 5, token_times=[10.5, 11.0, 11.5, 12.0, 12.5])
    assert ttft(r) == 0.5
    assert e2el(r) == 2.5
    assert tpot(r) == 0.5
    assert itl(r) == [0.5, 0.5, 0.5, 0.5]


def test_single_request_edge_cases() -> None:
    one_token = rec(0.0, 0.25, 0.25, 1, token_times=[0.25])
    assert tpot(one_token) is None  # N_out = 1: no decode phase
    assert itl(one_token) == []  # one token time, no gap
    no_first = rec(0.0, None, 1.0, 0, error="x")
    assert ttft(no_first) is None
    assert tpot(no_first) is None
    assert itl(rec(0.0, 0.25, 1.0, 3)) == []  # backend gave no token_times


def test_latency_metrics_hand_values() -> None:
    m = latency_metrics([R1, R2, FAILED])
    assert set(m) == {f"{f}_ms_{s}" for f in ("ttft", "tpot", "itl", "e2el") for s in STATS}
    # TTFT [100, 300]: mean 200, pop std 100, rank = q: p90 100+0.9*200 = 280, p99 298
    assert m["ttft_ms_mean"] == pytest.approx(200.0)
    assert m["ttft_ms_std"] == pytest.approx(100.0)
    assert m["ttft_ms_p50"] == pytest.approx(200.0)
    assert m["ttft_ms_p90"] == pytest.approx(280.0)
    assert m["ttft_ms_p99"] == pytest.approx(298.0)
    # TPOT [100, 200]: mean 150, std 50
    assert m["tpot_ms_mean"] == pytest.approx(150.0)
    assert m["tpot_ms_std"] == pytest.approx(50.0)
    # ITL pooled [100,100,100,100,200]: mean 600/5 = 120 (not the per-request 150),
    # pop var (4*20^2 + 80^2)/5 = 1600 -> std 40, p50 100
    assert m["itl_ms_mean"] == pytest.approx(120.0)
    assert m["itl_ms_std"] == pytest.approx(40.0)
    assert m["itl_ms_p50"] == pytest.approx(100.0)
    # E2EL [500, 500]; the failed 9000 ms is excluded
    assert m["e2el_ms_mean"] == pytest.approx(500.0)
    assert m["e2el_ms_p99"] == pytest.approx(500.0)
    assert m["e2el_ms_std"] == pytest.approx(0.0, abs=1e-9)


def test_latency_metrics_omits_empty_families() -> None:
    # single-token outputs without token times: no TPOT and no ITL family at all
    m = latency_metrics([rec(0.0, 0.25, 0.25, 1), rec(1.0, 1.5, 1.5, 1)])
    assert {k.split("_ms_")[0] for k in m} == {"ttft", "e2el"}
    assert m["ttft_ms_mean"] == pytest.approx(375.0)  # (250 + 500) / 2
    assert latency_metrics([FAILED]) == {}
    assert latency_metrics([]) == {}


def test_throughput_metrics_hand_values() -> None:
    m = throughput_metrics([R1, R2, FAILED], wall_s=2.0)
    # ok tokens 5 + 2 = 7 over 2 s; 2 ok requests over 2 s; prompts 3 + 4 (failed excluded)
    assert m == pytest.approx(
        {
            "output_tokens_per_s": 3.5,
            "requests_per_s": 1.0,
            "total_output_tokens": 7,
            "total_prompt_tokens": 7,
            "num_requests": 3,
            "num_failed": 1,
            "error_rate": 1 / 3,
        }
    )


def test_throughput_metrics_rejects_bad_wall() -> None:
    for wall in (0.0, -1.0):
        with pytest.raises(ValueError, match="wall_s"):
            throughput_metrics([R1], wall_s=wall)
    assert throughput_metrics([], wall_s=1.0)["error_rate"] == 0.0


def test_batch_phase_metrics_hand_values() -> None:
    records = [
        # batch at t=0: first token 0.2 -> prefill 0.2; decode (5-1)+(3-1) = 6 tok over 1.2-0.2
        rec(0.0, 0.2, 1.2, 5),
        rec(0.0, 0.3, 0.8, 3),
        rec(0.0, None, 0.1, 0, error="oom"),  # failed: ignored
        # batch at t=2: prefill 0.4; decode (1-1)+(4-1) = 3 tok over 3.4-2.4 = 1.0
        rec(2.0, 2.4, 2.4, 1),
        rec(2.0, 2.5, 3.4, 4),
    ]
    m = batch_phase_metrics(records)
    # prefill mean (0.2+0.4)/2 = 0.3; decode (6+3)/(1.0+1.0) = 4.5 tok/s
    assert m == pytest.approx({"prefill_s_mean": 0.3, "decode_tokens_per_s": 4.5})


def test_batch_phase_metrics_skips_zero_decode_span() -> None:
    # batch at t=5 has one single-token request: decode span 5.1-5.1 = 0, skipped for decode,
    # but its prefill 0.1 still counts: prefill mean (0.2 + 0.1)/2 = 0.15, decode 2/1.0
    records = [rec(0.0, 0.2, 1.2, 3), rec(5.0, 5.1, 5.1, 1)]
    m = batch_phase_metrics(records)
    assert m == pytest.approx({"prefill_s_mean": 0.15, "decode_tokens_per_s": 2.0})
    only_zero = batch_phase_metrics([rec(5.0, 5.1, 5.1, 1)])
    assert only_zero == pytest.approx({"prefill_s_mean": 0.1})
    assert batch_phase_metrics([]) == {}


# c: TTFT 50 ms, no TPOT (one token), E2EL 50 ms
C = rec(3.0, 3.05, 3.05, 1)


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        ({"ttft_ms": 200}, 2),  # R1 (100) and C (50) pass; R2 (300) fails
        ({"tpot_ms": 150}, 2),  # R1 (100) passes, R2 (200) fails, C has no TPOT -> passes
        ({"ttft_ms": 200, "e2el_ms": 100}, 1),  # only C: R1's E2EL 500 > 100
        ({"e2el_ms": 10_000}, 3),  # every ok request; FAILED never counts
    ],
)
def test_goodput_hand_values(slo: dict[str, float], good: int) -> None:
    m = goodput([R1, R2, C, FAILED], wall_s=2.0, slo=slo)
    # rate good / 2 s; fraction good / 4 records
    assert m == pytest.approx({"goodput_requests_per_s": good / 2, "goodput_fraction": good / 4})


def test_goodput_threshold_is_inclusive() -> None:
    # TTFT exactly 0.5 s = 500 ms meets a 500 ms SLO
    m = goodput([rec(0.0, 0.5, 1.0, 2)], wall_s=1.0, slo={"ttft_ms": 500})
    assert m["goodput_fraction"] == 1.0


def test_goodput_validation_and_empty_slo() -> None:
    with pytest.raises(ValueError, match=r"itl_ms.*ttft_ms, tpot_ms, e2el_ms"):
        goodput([R1], wall_s=1.0, slo={"itl_ms": 5})
    assert goodput([R1], wall_s=1.0, slo={}) == {}
    with pytest.raises(ValueError, match="wall_s"):
        goodput([R1], wall_s=0.0, slo={"ttft_ms": 1})


def test_mean_ci95_small_sample() -> None:
    # [1,2,3]: mean 2, s = 1 (ddof 1), df 2 -> t 4.303; half = 4.303 / sqrt(3)
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.303 / math.sqrt(3))


def test_mean_ci95_table_edge_and_normal_tail() -> None:
    # n = 31 (df 30, last table row): 15 zeros, 15 twos, one 1 -> mean 1, sum sq dev 30,
    # s^2 = 30/30 = 1 -> half = 2.042 / sqrt(31)
    mean, half = mean_ci95([0.0] * 15 + [2.0] * 15 + [1.0])
    assert mean == pytest.approx(1.0)
    assert half == pytest.approx(2.042 / math.sqrt(31))
    # n = 32 (df 31, normal): 16 zeros, 16 twos -> s^2 = 32/31; half = 1.96*sqrt(32/31)/sqrt(32)
    mean, half = mean_ci95([0.0] * 16 + [2.0] * 16)
    assert mean == pytest.approx(1.0)
    assert half == pytest.approx(1.96 / math.sqrt(31))


def test_mean_ci95_degenerate() -> None:
    assert mean_ci95([7.5]) == (7.5, 0.0)  # one repeat: no interval
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci95([])


def test_peak_concurrency() -> None:
    # [0,2) [1,3) [2,4) [2.5,3.5): at 2.5 the last three are in flight (the first ended at 2)
    # -> peak 3; the failed request still occupied the server, so it counts
    records = [
        rec(0.0, None, 2.0, 0),
        rec(1.0, None, 3.0, 0),
        rec(2.0, None, 4.0, 0),
        rec(2.5, None, 3.5, 0, error="counted anyway"),
    ]
    assert peak_concurrency(records) == 3
    # back-to-back [0,1) [1,2): the end at 1 is processed before the start at 1 -> 1, not 2
    assert peak_concurrency([rec(0.0, None, 1.0, 0), rec(1.0, None, 2.0, 0)]) == 1
    # identical intervals all overlap
    assert peak_concurrency([rec(0.0, None, 1.0, 0)] * 3) == 3
    assert peak_concurrency([]) == 0
