"""Load profiles cannot overstate capacity (a point's capacity is what it achieved).

The end-to-end test drives ``run.py`` with the serving preset's own defaults against the
stub of ``tests/stub_engine.py``: it stands in for a server of known capacity, which a real
engine cannot give. The pure tests pin the point classification on hand-made timelines.
Every load test sends only to 127.0.0.1, a bounded number of requests, and ends itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import WorkloadConfig
from pipeline.errors import ConfigError
from pipeline.records import RequestRecord
from pipeline.serving import points as pts
from pipeline.workload.profiles import SaturationRule
from tests.conftest import CACHE_DIR, run_cli
from tests.stub_engine import capacity, slo_rate, stub_server

LIMITS = {"max_client_cpu_percent": 90.0, "max_dispatch_lag_ms": 50.0,
          "saturation_rate_ratio": 0.9}


def test_slo_search_through_run_py_finds_the_stubs_analytic_rate(
        tmp_path: Path, model_dir: str) -> None:
    """``slo_search`` with ``workload=serving``'s own defaults (its ``concurrency: 4``
    included, which once capped the open-loop points and made the search report 2,767
    req/s) finds the stub's analytic SLO rate.

    The stub stands in for a server of known capacity, which a real engine cannot give: a
    continuous-batching engine whose step lasts s = a + b n with n requests in flight,
    a = 5 ms, b = 1 ms, T = 32 output tokens. At a steady rate λ, Little's law gives
    n = λ T s, so s = a / (1 - λ T b) = TPOT(λ). The mean-TPOT SLO L = 25 ms (p50 here: the
    stub's steps are alike, so median and mean agree) holds while a / (1 - λ T b) <= L:

        λ* = (1 - a / L) / (T b) = (1 - 5/25) / (32 * 0.001) = 0.8 / 0.032 = 25 req/s,

    below the capacity λ_max = 1 / (T b) = 31.25 req/s. The search must land within 30% of
    λ* (points of 10 s: the p50 carries the ramp-up and Poisson bursts), and report an
    *achieved* rate: no point that fell short of its offered rate may pass.
    """
    a, b, tokens, slo_ms = 0.005, 0.001, 32, 25.0
    analytic = slo_rate(a, b, tokens, slo_ms / 1000)
    assert analytic == pytest.approx(25.0) and capacity(b, tokens) == pytest.approx(31.25)
    with stub_server(a, b) as url:
        p = run_cli("backend=openai", f"backend.base_url={url}", "workload=serving",
                    f"workload.max_new_tokens={tokens}", "workload.fixed_length=false",
                    "workload.profile=slo_search", f"workload.slo_tpot_ms={slo_ms:g}",
                    "workload.slo_percentile=50", f"paths.output_dir={tmp_path}",
                    f"paths.cache_dir={CACHE_DIR}", "scoring.perplexity=false",
                    timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (res_file,) = list(tmp_path.glob("runs/*/results.json"))
    res = json.loads(res_file.read_text())
    assert res["status"] == "FINISHED", res.get("error")
    # every metric the profile logged, its load.* point series included, is defined in the
    # metric catalog (docs/metrics.md)
    from mlflow.tracking import MlflowClient

    from pipeline.metrics.catalog import logged_metric_keys, uncovered
    from pipeline.tracking.store import default_store_uri

    keys = logged_metric_keys(MlflowClient(default_store_uri(tmp_path)),
                              [(res_file.parent / "mlflow_run_id").read_text().strip()])
    assert "load.achieved_rate" in keys and uncovered(keys) == [], sorted(keys)
    points, found = res["load_points"], res["metrics"]["max_rate_under_slo"]
    table = [(q["offered_rate"], q.get("offered_rate_realized"), q["achieved_rate"],
              q.get("slo_tpot_ms_p50"), q["saturated"], q["valid"]) for q in points]
    print(f"max_rate_under_slo {found:.2f} req/s (analytic {analytic:g}); points "
          "(offered, realized, achieved, TPOT p50 ms, saturated, valid):", table)
    assert found == pytest.approx(analytic, rel=0.3), table
    assert res["config"]["workload"]["concurrency"] == 4  # the preset's cap was there ...
    rated = [q for q in points if q["offered_rate"] is not None]
    assert rated and all(q["concurrency"] is None for q in rated)  # ... and not applied
    assert all(q["slo_dialect"] == "schedule" for q in rated)
    passing = [q for q in rated if pts.passes(q)]
    # the answer is a passing point's achieved rate, never more than it was offered
    assert found in [q["achieved_rate"] for q in passing]
    for q in passing:
        assert q["achieved_rate"] <= q["offered_rate_realized"]
        assert q["completion_rate"] >= 0.9 * q["offered_rate_realized"]
    # a load past the capacity was tried and did not pass
    assert any(q["offered_rate"] > capacity(b, tokens) and not pts.passes(q) for q in rated)


# ------------------------------------------------------------------ classification


def _rec(i: int, due: float, start: float, ttft: float, end: float,
         n: int = 4) -> RequestRecord:
    step = (end - start - ttft) / (n - 1)
    times = [start + ttft + step * j for j in range(n)]
    return RequestRecord(index=i, prompt="p", text="", prompt_tokens=1, output_token_ids=[],
                         t_start=start, t_first_token=times[0], t_end=end,
                         token_times=times, n_output_tokens=n,
                         extra={"t_scheduled": due, "dispatch_lag_s": 0.0,
                                "client_queue_s": start - due})


def _point(recs: list[RequestRecord], conc: int | None = None,
           slo: dict[str, float] | None = None, dialect: str = "schedule") -> dict[str, Any]:
    wall = max(r.t_end for r in recs)
    return pts.summarize_point(2, "rate", 10.0, conc, recs, wall, len(recs),
                               slo or {"tpot_ms": 1000.0}, 90, 5.0, LIMITS, None, None,
                               dialect)


def test_a_point_short_of_its_offered_rate_is_never_valid_and_unsaturated() -> None:
    # 20 requests scheduled at 10/s and sent on time, TTFT flat at 50 ms (no TTFT growth
    # at all), but the server completes one every 0.2 s: 5 req/s delivered
    server_short = [_rec(i, i / 10, i / 10, 0.05, 0.5 + 0.2 * i) for i in range(20)]
    p = _point(server_short)
    assert p["slo_met"] and p["saturated"] and p["valid"]
    assert p["saturation_reason"].startswith("saturated: achieved 5.00 req/s < 0.9 x")
    assert p["achieved_rate"] == pytest.approx(5.0)
    assert not pts.passes(p) and pts.capacity_under_slo([p]) == 0.0
    # the client itself sent only every 0.2 s (a concurrency cap): invalid, naming it
    client_short = [_rec(i, i / 10, 0.2 * i, 0.05, 0.2 * i + 0.3) for i in range(20)]
    c = _point(client_short, conc=4)
    assert not c["valid"] and not c["saturated"] and not pts.passes(c)
    assert c["invalid_reasons"][0].startswith("client_rate: achieved 5.00 req/s")
    assert "concurrency cap 4" in c["invalid_reasons"][0]
    # kept up: passes, and its capacity is what it achieved (the schedule's realized rate
    # at most, though the drain made completions look a little faster)
    kept = [_rec(i, i / 10, i / 10, 0.05, i / 10 + 0.5 - 0.01 * (i == 19)) for i in range(20)]
    k = _point(kept)
    assert k["completion_rate"] > k["offered_rate_realized"] == pytest.approx(10.0)
    assert pts.passes(k) and k["achieved_rate"] == pytest.approx(10.0)
    assert pts.summary_metrics([p, c, k], "sweep", None)[
        "max_rate_under_slo"] == pytest.approx(10.0)


@pytest.mark.parametrize(("offered", "sent", "done", "kind"), [
    (10.0, 10.0, 9.5, None), (10.0, 10.0, 8.0, "saturated"), (10.0, 8.5, 8.4, "client"),
    (10.0, 10.0, None, "saturated"), (None, None, 1.0, None)])
def test_rate_verdict(offered: float | None, sent: float | None, done: float | None,
                      kind: str | None) -> None:
    assert pts.rate_verdict(offered, sent, done, 0.9)[0] == kind


def test_slos_are_judged_from_the_schedule_by_default() -> None:
    """The issue's run: client-side queueing pushed TTFT from the schedule to 550 ms while
    TTFT from the send stayed at 19 ms. Judged from the schedule, the point fails its TTFT
    SLO; from the send it would pass; a closed-loop point is judged from the send."""
    queued = [_rec(i, i / 10, i / 10 + 0.5, 0.02, i / 10 + 0.9) for i in range(20)]
    slo = {"ttft_ms": 100.0}
    sched = _point(queued, slo=slo)
    assert sched["slo_dialect"] == "schedule" and not sched["slo_met"]
    assert sched["slo_ttft_ms_p90"] == pytest.approx(520.0)
    send = _point(queued, slo=slo, dialect="send")
    assert send["slo_dialect"] == "send" and send["slo_met"]
    sync = pts.summarize_point(0, "sync", None, 1, queued, 3.0, 20, slo, 90, 5.0, LIMITS)
    assert sync["slo_dialect"] == "send" and sync["slo_met"]


def test_live_rule_measures_ttft_from_the_schedule() -> None:
    """Coordinated omission: 20 requests on time, then the client falls behind (it sends
    the next ones only every 0.5 s) and TTFT *from the send* stays flat at 50 ms. From the
    schedule the unsent requests' wait grows: the rule fires."""

    class L:
        def __init__(self, due: float, start: float | None) -> None:
            self.due, self.t_start = due, start
            self.t_first_token = None if start is None else start + 0.05
            self.t_end = None if start is None else start + 0.3

    sends = {i: i / 10 for i in range(20)} | {20 + j: 2.0 + 0.5 * j for j in range(4)}
    live = [L(i / 10, sends.get(i)) for i in range(40)]
    rule = SaturationRule(offered_rate=10.0)
    assert rule(live, 4.0) is None and rule(live, 4.25) is not None
    assert "TTFT from the schedule" in (rule.last or "")


def test_unknown_slo_dialect_is_refused() -> None:
    from pipeline.config import validate_workload

    w = WorkloadConfig(prompts=["x"])
    validate_workload(w)  # the default, schedule
    w.slo_dialect = "wall"
    with pytest.raises(ConfigError, match="workload.slo_dialect='wall' is invalid: allowed "
                                          "values are schedule, send"):
        validate_workload(w)
