"""Per-turn metrics of multi-turn conversations: the turn table on hand-worked records, its
MLflow curves (``turn.*``, step = turn) in a real SQLite store, and the report's section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from pipeline.metrics.catalog import logged_metric_keys, uncovered
from pipeline.metrics.turns import RATIO_KEY, last_turn_over_first, turn_table
from pipeline.records import JobResult, RequestRecord
from pipeline.report import conversation
from pipeline.report.build import write_report
from tests.conftest import job_run, sweep_data


def _req(i: int, conv: str, turn: int, t0: float, ttft_s: float | None, e2el_s: float,
         prompt: int, cached: int | None = None, error: str | None = None) -> dict[str, Any]:
    """One results.json request of conversation ``conv``'s turn ``turn``."""
    extra: dict[str, Any] = {"conversation_id": conv, "turn": turn}
    if cached is not None:
        extra["cached_prompt_tokens"] = cached
    return {"index": i, "prompt": f"{conv}{turn}", "text": "" if error else "ok",
            "prompt_tokens": prompt, "output_token_ids": [] if error else [1, 2],
            "output_tokens": 0 if error else 2, "t_start": t0,
            "t_first_token": None if ttft_s is None else t0 + ttft_s, "t_end": t0 + e2el_s,
            "token_times": None, "error": error, "extra": extra, "n_output_tokens": None}


def _records() -> list[dict[str, Any]]:
    """Two conversations (a, b) x three turns; b's third turn fails."""
    return [
        _req(0, "a", 1, 10.0, 0.1, 0.5, 20, cached=0),
        _req(1, "b", 1, 20.0, 0.3, 0.7, 24, cached=0),
        _req(2, "a", 2, 11.0, 0.2, 0.9, 60, cached=16),
        _req(3, "b", 2, 21.0, 0.6, 1.3, 70, cached=32),
        _req(4, "a", 3, 12.0, 0.5, 1.5, 110, cached=48),
        _req(5, "b", 3, 23.0, None, 2.0, 120, error="timeout"),  # no cached count
    ]


# Worked by hand (numpy's linear percentiles: p = lo + q * (hi - lo) over 2 values):
# turn 1: TTFT 100, 300 ms -> p50 200, p99 100 + .99 * 200 = 298, mean 200; E2EL 500, 700
#         -> p50 600; prompt (20 + 24) / 2 = 22, cached 0, uncached 22
# turn 2: TTFT 200, 600 -> p50 400, p99 200 + .99 * 400 = 596, mean 400; E2EL 900, 1300
#         -> p50 1100; prompt 65, cached (16 + 32) / 2 = 24, uncached (44 + 38) / 2 = 41
# turn 3: one ok request (b failed): TTFT 500 (p50 = p99 = mean), E2EL 1500, prompt 110,
#         cached 48, uncached 62; the failed one counts as an error and nowhere else
EXPECTED = [
    {"turn": 1, "requests": 2, "errors": 0, "ttft_ms_p50": 200, "ttft_ms_p99": 298,
     "ttft_ms_mean": 200, "e2el_ms_p50": 600, "prompt_tokens_mean": 22,
     "cached_prompt_tokens_mean": 0, "uncached_prompt_tokens_mean": 22},
    {"turn": 2, "requests": 2, "errors": 0, "ttft_ms_p50": 400, "ttft_ms_p99": 596,
     "ttft_ms_mean": 400, "e2el_ms_p50": 1100, "prompt_tokens_mean": 65,
     "cached_prompt_tokens_mean": 24, "uncached_prompt_tokens_mean": 41},
    {"turn": 3, "requests": 1, "errors": 1, "ttft_ms_p50": 500, "ttft_ms_p99": 500,
     "ttft_ms_mean": 500, "e2el_ms_p50": 1500, "prompt_tokens_mean": 110,
     "cached_prompt_tokens_mean": 48, "uncached_prompt_tokens_mean": 62},
]
#: turn 3's TTFT p50 / turn 1's: 500 / 200
RATIO = 2.5


def _as_record(d: dict[str, Any]) -> RequestRecord:
    keep = {k: v for k, v in d.items() if k != "output_tokens"}
    return RequestRecord(**keep)


def test_turn_table_hand_worked() -> None:
    """Records from results.json and RequestRecords give the same hand-worked rows, in turn
    order whatever the record order; the ratio is the last turn's p50 over turn 1's."""
    recs = _records()
    for given in (recs, list(reversed(recs)), [_as_record(r) for r in recs]):
        table = turn_table(given)
        assert [set(r) for r in table] == [set(e) for e in EXPECTED]
        assert table == [pytest.approx(e) for e in EXPECTED]
    assert last_turn_over_first(turn_table(recs)) == pytest.approx(RATIO)
    assert last_turn_over_first(turn_table(recs[:2])) is None  # one turn: nothing grew


def test_cached_columns_only_when_every_ok_request_has_them() -> None:
    """A turn with one successful request lacking the server's cached count has no cached
    columns (a mean over some requests would compare different requests across turns);
    the other turns keep theirs. Records without a turn are not a conversation."""
    recs = _records()
    del recs[3]["extra"]["cached_prompt_tokens"]  # b's turn 2
    rows = {r["turn"]: r for r in turn_table(recs)}
    assert "cached_prompt_tokens_mean" not in rows[2]
    assert "uncached_prompt_tokens_mean" not in rows[2]
    assert rows[2]["prompt_tokens_mean"] == 65
    assert rows[1]["uncached_prompt_tokens_mean"] == 22
    assert rows[3]["cached_prompt_tokens_mean"] == 48  # the failed request does not count
    for r in recs:
        del r["extra"]["turn"]
    assert turn_table(recs) == []
    assert turn_table([]) == []


def _cfg(tmp_path: Path) -> Any:
    return OmegaConf.create({
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "experiment": "turns", "log_generations": False},
        "paths": {"output_dir": str(tmp_path / "outputs")},
    })


def _result(requests: list[dict[str, Any]], job_num: int) -> JobResult:
    config = {g: {"name": n} for g, n in (("backend", "vllm_server"), ("model", "m"),
                                          ("decoding", "greedy"), ("workload", "chat"))}
    prov = {"overrides": [], "command": "run.py", "git_commit": "abc",
            "hardware": {"cpu": "test"}, "versions": {"mlflow": "x"}}
    return JobResult(status="FINISHED", job_num=job_num, config=config, config_hash="h",
                     provenance=prov, metrics={"time_generate_s": 3.0}, requests=requests)


def test_turn_curves_in_mlflow(tmp_path: Path) -> None:
    """Each turn row is logged as ``turn.<figure>`` at step = turn (read back from a real
    SQLite store), the ratio as a job metric, every key catalogued; a job without turns
    logs no ``turn.*`` key."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.job_runs import log_job

    cfg = _cfg(tmp_path)
    runs = []
    for n, reqs in enumerate((_records(), [{**r, "extra": {}} for r in _records()])):
        job_dir = tmp_path / f"job{n}"
        job_dir.mkdir()
        runs.append(log_job(cfg, _result(reqs, n), job_dir, None, {}))
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    for key in EXPECTED[0]:
        if key == "turn":
            continue
        hist = sorted(client.get_metric_history(runs[0], f"turn.{key}"), key=lambda m: m.step)
        assert [m.step for m in hist] == [1, 2, 3], key
        assert [m.value for m in hist] == pytest.approx([e[key] for e in EXPECTED]), key
    metrics = client.get_run(runs[0]).data.metrics
    assert metrics[RATIO_KEY] == pytest.approx(RATIO)
    keys = logged_metric_keys(client, runs)
    assert {k for k in keys if k.startswith("turn.")} == {f"turn.{k}" for k in EXPECTED[0]
                                                          if k != "turn"}
    assert uncovered(keys) == []
    plain = client.get_run(runs[1]).data.metrics
    assert not [k for k in plain if k.startswith("turn.") or k == RATIO_KEY]


def test_report_section_table_and_plot(tmp_path: Path) -> None:
    """A sweep with a conversation job gets the section after the latency sections: the
    plot file (in report.md and inlined in report.html), the job's hand-worked turn rows
    and ratio; the job without turns gets no table. A sweep without turns has none of it."""
    chat = job_run(0, "greedy", "1.0", 10.0, 1000.0)
    chat.results["requests"] = _records()
    other = job_run(1, "topp", "1.0", 12.0, 900.0)
    rep = write_report(sweep_data([chat, other]), tmp_path / "with", interactive=False)
    md = rep.markdown_text
    assert f"## {conversation.TITLE}" in md
    assert md.index("## Per-request latency") < md.index(f"## {conversation.TITLE}")
    assert (tmp_path / "with" / f"{conversation.IMAGE}.png").stat().st_size > 1000
    assert f"]({conversation.IMAGE}.png)" in md
    part = md[md.index(f"## {conversation.TITLE}"):]
    part = part[:part.index("\n## ")]
    assert "Job 0 greedy: TTFT p50 of the last turn / turn 1 = 2.50x" in part
    assert "Job 1" not in part
    assert "| 1 | 2 | 0 | 200 | 298 | 200 | 600 | 22.0 | 0.0 | 22.0 |" in part
    assert "| 2 | 2 | 0 | 400 | 596 | 400 | 1100 | 65.0 | 24.0 | 41.0 |" in part
    assert "| 3 | 1 | 1 | 500 | 500 | 500 | 1500 | 110.0 | 48.0 | 62.0 |" in part
    html = rep.html.read_text()
    assert conversation.TITLE in html and html.count("data:image/png;base64,") == \
        len(rep.images)
    plain = write_report(sweep_data([job_run(0, "greedy", "1.0", 10.0, 1000.0), other]),
                         tmp_path / "without", interactive=False)
    assert conversation.TITLE not in plain.markdown_text
    assert conversation.IMAGE not in plain.images
    assert not (tmp_path / "without" / f"{conversation.IMAGE}.png").exists()
