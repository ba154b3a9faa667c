"""workload.source=trace: a Mooncake-format trace replayed at its own times.

Parsing, the window/speedup/num_prompts selection and send times are hand-worked on a 5-line
trace; the token blocks are built in the packaged model's real tokenizer; every refusal is
checked before anything loads (one run through run.py for exit code 2); the shipped preset
composes and validates (its dry run as a sweep is tests/test_robustness.py's, which covers
every preset). Two replays end to end: through run.py against a loopback stub that records
what it received (send times exact, dispatch lag, the token ids and lengths it was sent),
and through the job's own path on a real vLLM server (send times, lengths by vLLM's usage,
the prompt ids vLLM echoes: in tests/test_profiles.py, beside the other test on that
module's server, so that no second server starts for it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import WorkloadConfig
from pipeline.errors import ConfigError
from pipeline.workload import load_prompts
from pipeline.workload.trace import (
    check_trace_context,
    read_trace,
    replay_plan,
    select,
    send_offsets,
    trace_requests,
)
from tests.conftest import (
    CACHE_DIR,
    ROOT,
    assert_blocks_follow_hash_ids,
    assert_refused_early,
    compose_config,
    run_cli,
    trace_prompts_by_line,
)

SHIPPED = ROOT / "pipeline/workload/traces/mooncake_sample.jsonl"

#: five lines: blocks 0 and 1 open lines 1-3 (line 3 cut inside block 1), line 4 repeats a
#: part of block 0 alone, line 5 has blocks of its own; lines 2 and 3 share one millisecond
FIVE = [
    {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]},
    {"timestamp": 1000, "input_length": 1024, "output_length": 6, "hash_ids": [0, 1]},
    {"timestamp": 1000, "input_length": 700, "output_length": 7, "hash_ids": [0, 1]},
    {"timestamp": 2500, "input_length": 300, "output_length": 8, "hash_ids": [0]},
    {"timestamp": 4000, "input_length": 520, "output_length": 9, "hash_ids": [2, 3]},
]


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _w(path: Path, **kw: Any) -> WorkloadConfig:
    return WorkloadConfig(name="trace", source="trace", profile="trace", trace_file=str(path),
                          **kw)


def test_window_speedup_and_num_prompts_give_hand_worked_send_times(tmp_path: Path) -> None:
    f = _write(tmp_path / "t.jsonl", FIVE)
    rows = read_trace(str(f), 10_000)
    assert [r.line for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2].hash_ids == (0, 1) and rows[2].timestamp_ms == 1000.0
    # the whole trace at 2x: timestamps / 2, in seconds
    assert send_offsets(select(rows, None, None), 2.0) == [0.0, 0.5, 0.5, 1.25, 2.0]
    # [1000, 4000): lines 2-4, shifted so that the first is sent at once; 4000 is out
    win = select(rows, [1000, 4000], None)
    assert [r.line for r in win] == [2, 3, 4]
    assert send_offsets(win, 0.5) == [0.0, 0.0, 3.0]
    # num_prompts: the first N of the window
    assert [r.line for r in select(rows, [1000, 4000], 2)] == [2, 3]
    plan = replay_plan(_w(f, trace_window=[1000.0, 4000.0], trace_speedup=4.0))
    assert plan.send_at == [0.0, 0.0, 0.375]
    assert plan.extra == [{"trace_line": 2, "hash_ids": 2, "shared_blocks": 0},
                          {"trace_line": 3, "hash_ids": 2, "shared_blocks": 2},
                          {"trace_line": 4, "hash_ids": 1, "shared_blocks": 1}]
    assert [p.request_id for p in load_prompts(_w(f, num_prompts=3))] == [
        "line 1", "line 2", "line 3"]
    # a plain CSV (the header is line 1): no hash_ids, every request's tokens its own
    c = tmp_path / "t.csv"
    c.write_text("timestamp,input_length,output_length\n0,100,4\n250.5,30,2\n")
    assert [(r.line, r.timestamp_ms, r.hash_ids) for r in read_trace(str(c), 10_000)] == [
        (2, 0.0, None), (3, 250.5, None)]


def test_same_hash_id_is_the_same_tokens_at_exact_lengths(tmp_path: Path,
                                                          model_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    f = _write(tmp_path / "t.jsonl", FIVE)
    reqs = trace_requests(_w(f), tok, seed=0)
    ids = [list(r.prompt_token_ids) for r in reqs]
    assert [len(x) for x in ids] == [600, 1024, 700, 300, 520]
    assert [r.max_new_tokens for r in reqs] == [5, 6, 7, 8, 9]
    assert [r.request_id for r in reqs] == [f"line {i}" for i in range(1, 6)]
    # lines 1-3 are blocks 0 and 1 cut at their lengths: prefixes of one sequence
    assert ids[0] == ids[1][:600] and ids[2] == ids[1][:700] and ids[3] == ids[1][:300]
    assert ids[1][:512] != ids[1][512:]  # two ids, two blocks
    # line 5's blocks are other tokens
    assert ids[4][:16] != ids[1][:16] and ids[4][512:] != ids[1][512:520]
    # the seed picks the text; the same seed the same tokens
    assert [list(r.prompt_token_ids) for r in trace_requests(_w(f), tok, seed=0)] == ids
    assert list(trace_requests(_w(f), tok, seed=1)[0].prompt_token_ids) != ids[0]
    # without hash_ids no two lines share a token run
    c = tmp_path / "t.csv"
    c.write_text("timestamp,input_length,output_length\n0,64,4\n10,64,4\n")
    a, b = trace_requests(_w(c), tok, seed=0)
    assert len(a.prompt_token_ids) == 64 and a.prompt_token_ids[:8] != b.prompt_token_ids[:8]


def test_a_request_over_the_context_is_refused_naming_its_line(tmp_path: Path) -> None:
    f = _write(tmp_path / "t.jsonl", FIVE)
    check_trace_context(_w(f), 1030, "the limit")  # 1024 + 6 fits exactly
    with pytest.raises(ConfigError, match=r"line 2: input_length=1024 \+ output_length=6 = "
                                          r"1030 tokens exceeds the limit"):
        check_trace_context(_w(f), 1029, "the limit")
    check_trace_context(_w(f, trace_window=[2000.0, 5000.0]), 1029, "the limit")


def _bad_traces(tmp_path: Path) -> list[tuple[str, str]]:
    """(file, needle) for each malformed trace."""
    cases = {
        "missing.jsonl": ([{"timestamp": 0, "input_length": 10, "output_length": 2},
                           {"timestamp": 5, "input_length": 10}],
                          "line 2: missing output_length"),
        "negative.jsonl": ([{"timestamp": 0, "input_length": -5, "output_length": 2}],
                           "line 1: input_length=-5 must be >= 1"),
        "fraction.jsonl": ([{"timestamp": 0, "input_length": 12.5, "output_length": 2}],
                           "line 1: input_length=12.5 is not an integer"),
        "unsorted.jsonl": ([FIVE[0], FIVE[1], {**FIVE[2], "timestamp": 999}],
                           "line 3: timestamp 999 is before line 2's 1000"),
        "short.jsonl": ([{**FIVE[0], "hash_ids": [0]}],
                        "input_length=600 is more than its 1 hash_ids blocks hold"),
        "extra_block.jsonl": ([{**FIVE[3], "hash_ids": [0, 1]}],
                              "2 hash_ids for input_length=300, which needs "
                              "ceil(300/512) = 1 blocks"),
        "notjson.jsonl": (["{oops"], "line 1: not valid JSON"),
    }
    out = []
    for name, (rows, needle) in cases.items():
        out.append((str(_write(tmp_path / name, rows)), needle))
    return out


def test_every_refusal_comes_before_anything_loads(tmp_path: Path) -> None:
    good = str(_write(tmp_path / "good.jsonl", FIVE))
    base = ["backend=vllm_server", "workload=trace"]
    cases = [([*base, f"workload.trace_file={f}"], needle) for f, needle in _bad_traces(tmp_path)]
    cases += [
        ([*base, "workload.trace_file=/nonexistent/t.jsonl"], "no such file"),
        ([*base, f"workload.trace_file={good}", "workload.max_file_bytes=10"],
         "above workload.max_file_bytes=10"),
        ([*base, f"workload.trace_file={good}", "workload.trace_speedup=0"],
         "workload.trace_speedup=0.0 is invalid: must be a number > 0"),
        ([*base, f"workload.trace_file={good}", "workload.trace_window=[4000,1000]"],
         "workload.trace_window=[4000.0, 1000.0] is invalid"),
        ([*base, f"workload.trace_file={good}", "workload.trace_window=[9000,20000]"],
         "has a timestamp in it (its timestamps run from 0 to 4000 ms)"),
        ([*base, f"workload.trace_file={good}", "workload.profile=sweep"],
         "workload.profile='sweep' is invalid with workload.source=trace"),
        ([*base, f"workload.trace_file={good}", "workload.request_rate=2"],
         "workload.request_rate=2.0 is invalid with workload.source=trace"),
        (["backend=hf", "workload=trace", f"workload.trace_file={good}"],
         "workload.source='trace' is invalid for backend hf: it is offline"),
        ([*base, f"workload.trace_file={good}", "backend.api=chat"],
         "backend.api='chat' is invalid with workload.source=trace"),
        (["workload=serving", "backend=vllm_server", "workload.profile=trace"],
         "workload.profile='trace' is invalid: needs workload.source=trace"),
        # 1024 + 6 tokens of line 2 against a 1000-token server context
        ([*base, f"workload.trace_file={good}", "backend.max_model_len=1000"],
         "line 2: input_length=1024 + output_length=6 = 1030 tokens exceeds "
         "backend.max_model_len=1000"),
    ]
    assert_refused_early(cases)


@pytest.mark.slow
def test_a_bad_trace_exits_2_through_run_py(tmp_path: Path) -> None:
    (bad, needle), *_ = _bad_traces(tmp_path)
    p = run_cli("backend=vllm_server", "workload=trace", f"workload.trace_file={bad}",
                f"paths.output_dir={tmp_path / 'out'}", timeout=120)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"error: workload.trace_file={bad!r} is invalid: {needle}" in p.stderr + p.stdout
    assert not (tmp_path / "out" / "servers").exists()


def test_the_shipped_sample_is_what_its_script_writes() -> None:
    spec = importlib.util.spec_from_file_location("make_sample_trace",
                                                  ROOT / "benchmarks/make_sample_trace.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.make_trace()
    assert SHIPPED.read_text() == mod.render(rows)
    assert len(rows) == 40 and 15_000 <= rows[-1]["timestamp"] <= 25_000
    assert all(64 <= r["input_length"] <= 1024 and 8 <= r["output_length"] <= 64 for r in rows)
    share = mod.reusable_tokens(rows) / sum(r["input_length"] for r in rows)
    assert 0.4 <= share <= 0.6, share
    assert len(read_trace(str(SHIPPED), 10**6)) == 40  # and the pipeline reads it


def test_preset_composes_validates_and_replays_the_sample_head() -> None:
    # (the dry run of the preset's sweep through run.py is tests/test_robustness.py's, which
    # runs every preset of conf/experiment/)
    from pipeline.config import validate

    spec = validate(compose_config("+experiment=trace_replay"))
    w = spec.workload
    assert (spec.backend.name, w.source, w.profile, w.warmup) == ("vllm_server", "trace",
                                                                 "trace", 0)
    assert w.trace_file == "pipeline/workload/traces/mooncake_sample.jsonl" and w.fixed_length
    # the sample's first 16 requests at half speed: 10.8 s of trace in 21.6 s
    plan = replay_plan(w)
    assert len(plan.send_at) == 16 and plan.send_at[-1] == pytest.approx(21.562)
    assert [p.request_id for p in load_prompts(w)] == [f"line {i}" for i in range(1, 17)]
    rows = read_trace(w.trace_file, w.max_file_bytes)[:16]
    assert sum(r.input_length for r in rows) == 10_534
    assert sum(e["shared_blocks"] > 0 for e in plan.extra) == 10


def test_every_online_backend_takes_a_trace() -> None:
    # what the replays below do not run: llama.cpp (its token-id prompts and per-request
    # lengths are tests/test_llamacpp.py's; the send schedule is the shared client's)
    from pipeline.job_checks import check_inputs

    for backend in (["backend=llamacpp"], ["backend=vllm_server"],
                    ["backend=openai", "backend.vllm_extensions=true"]):
        spec, prompts = check_inputs(compose_config(*backend, "workload=trace"))
        assert spec.workload.source == "trace" and len(prompts) == 40


# ----------------------------------------------------------------------- replays, end to end

#: ten lines from 1000 ms, two at the same time, one at a fraction of a millisecond; each
#: hash id at one block position only (Mooncake's ids hash the whole prefix), shared by
#: lines cut at different lengths (line 7 ends one token into block 8); line 8 has no
#: hash_ids (blocks of its own). Every input length differs, so a prompt the server saw
#: names its line.
TEN = [
    {"timestamp": 1000, "input_length": 1300, "output_length": 4, "hash_ids": [1, 2, 3]},
    {"timestamp": 1000, "input_length": 700, "output_length": 3, "hash_ids": [1, 2]},
    {"timestamp": 1250, "input_length": 1536, "output_length": 5, "hash_ids": [1, 2, 4]},
    {"timestamp": 1337.5, "input_length": 300, "output_length": 2, "hash_ids": [5]},
    {"timestamp": 1800, "input_length": 1000, "output_length": 6, "hash_ids": [5, 6]},
    {"timestamp": 2200, "input_length": 512, "output_length": 1, "hash_ids": [1]},
    {"timestamp": 2600, "input_length": 1025, "output_length": 3, "hash_ids": [7, 2, 8]},
    {"timestamp": 3000, "input_length": 90, "output_length": 4},
    {"timestamp": 3500, "input_length": 1100, "output_length": 2, "hash_ids": [5, 6, 3]},
    {"timestamp": 4000, "input_length": 40, "output_length": 7, "hash_ids": [9]},
]


@pytest.mark.slow
def test_replay_on_a_stub_keeps_times_lengths_and_shared_blocks(tmp_path: Path) -> None:
    """The trace replayed through run.py (backend=openai, token-id prompts, exact lengths)
    against a loopback stub (tests/stub_engine.py, its own process) that records what it
    received. A stub, not a real engine, because only a server that does no work of its
    own (no prefill, no model on the same cores) shows the client's dispatch lag free of
    the server's load: on a real engine the lag would measure the engine as much as the
    client. The real engine's replay is the vLLM test below."""
    from tests.stub_engine import received, stub_server

    speedup = 2.0
    f = _write(tmp_path / "t.jsonl", TEN)
    with stub_server(0.002, 0.0005) as url:
        p = run_cli("backend=openai", f"backend.base_url={url}", "backend.vllm_extensions=true",
                    "backend.prompt_format=token_ids", "workload=trace",
                    f"workload.trace_file={f}", f"workload.trace_speedup={speedup}",
                    "scoring.perplexity=false", "tracking.enabled=false",
                    f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={CACHE_DIR}",
                    timeout=300)
        got = received(url)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(next((tmp_path / "out").glob("runs/*/results.json")).read_text())
    assert res["status"] == "FINISHED" and [q["kind"] for q in res["load_points"]] == ["trace"]
    recs = sorted(res["requests"], key=lambda r: r["index"])
    assert [r["error"] for r in recs] == [None] * len(TEN)
    assert [r["extra"]["trace_line"] for r in recs] == list(range(1, len(TEN) + 1))
    # (a) scheduled sends: the client stores t0 + offset as a float, and the first offset
    # is 0, so the first t_scheduled is t0 itself and t0 + offset must come out bit for bit
    # (a difference t_scheduled - t0 would carry t0's rounding, ~1e-10 s)
    ts0 = TEN[0]["timestamp"]
    offsets = [(r["timestamp"] - ts0) / 1000 / speedup for r in TEN]
    assert offsets[1] == 0.0 and offsets[3] == 0.16875 and offsets[-1] == 1.5
    t0 = recs[0]["extra"]["t_scheduled"]
    assert [r["extra"]["t_scheduled"] for r in recs] == [t0 + o for o in offsets]
    assert [r["extra"]["t_scheduled"] - t0 for r in recs] == pytest.approx(offsets, abs=1e-9)
    # (b) the client woke up on time: p99 dispatch lag within 20 ms, as the job logged it
    lags_ms = [r["extra"]["dispatch_lag_s"] * 1000 for r in recs]
    p99 = float(np.percentile(lags_ms, 99))
    print(f"dispatch lag ms: p99 {p99:.3f}, max {max(lags_ms):.3f}")
    assert p99 <= 20.0, lags_ms
    assert res["metrics"]["dispatch_lag_ms_p99"] == pytest.approx(p99)
    # (c) what the stub received: every prompt as token ids at its exact length, the
    # trace's blocks where its hash ids say, and never before its scheduled time (one
    # clock: CLOCK_MONOTONIC for both processes)
    assert len(got) == len(TEN) and all(isinstance(g["prompt"], list) for g in got)
    seen = trace_prompts_by_line(TEN, [g["prompt"] for g in got])
    # ids 1, 2 three repeats each, 5 two, 3 and 6 one; 36 pairs of the 10 blocks of 8+ tokens
    assert assert_blocks_follow_hash_ids(TEN, seen) == (10, 36)
    at = {len(g["prompt"]): g for g in got}
    for row, rec in zip(TEN, recs, strict=True):
        g = at[row["input_length"]]
        # (d) lengths: the stub was asked for exactly output_length (min_tokens too) ...
        assert (g["max_tokens"], g["min_tokens"], g["ignore_eos"]) == (
            row["output_length"], row["output_length"], True)
        assert g["arrival"] >= rec["extra"]["t_scheduled"]
    # ... and the records count exactly the trace's lengths (from the stub's usage)
    assert [r["prompt_tokens"] for r in recs] == [r["input_length"] for r in TEN]
    assert [r["output_tokens"] for r in recs] == [r["output_length"] for r in TEN]
    assert res["metrics"]["num_requests"] == len(TEN)
