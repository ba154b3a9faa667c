"""Reference metrics (the shipped evaluate modules, against hand-worked values), the code
sandbox, the task sets and the wiring into records."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.metrics import code_exec, reference
from pipeline.records import Request, RequestRecord

TASKS = Path(reference.__file__).resolve().parents[1] / "workload" / "tasks"


def _compute(name: str, preds: list[str], refs: list[str], **kw) -> dict:
    return reference.load_metric(name).compute(predictions=preds, references=refs, **kw)


# --- normalization and the SQuAD metrics -------------------------------------------------

def test_squad_normalization_rules() -> None:
    mod = reference.load_metric("exact_match")
    norm = __import__(type(mod).__module__, fromlist=["normalize_answer"]).normalize_answer
    assert norm("The  Cat's hat!") == "cats hat"       # case, punctuation, article, spaces
    assert norm("An apple, a pear") == "apple pear"
    assert norm("theatre") == "theatre"                 # articles only as whole words
    assert norm("  ") == ""


def test_exact_match_hand_worked() -> None:
    r = _compute("exact_match", ["Paris.", "the Pacific Ocean", "An apple"],
                 ["paris", "Pacific ocean", "apple pie"])
    assert r["scores"] == [1.0, 1.0, 0.0]
    assert r["exact_match"] == pytest.approx(2 / 3)


def test_token_f1_hand_worked() -> None:
    # "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1 -> F = 6/7
    r = _compute("f1", ["the cat sat on the mat", "blue", ""], ["a cat on a mat", "red", "the"])
    assert r["scores"][0] == pytest.approx(6 / 7)
    assert r["scores"][1] == 0.0
    assert r["scores"][2] == 1.0  # both empty after normalization
    assert r["f1"] == pytest.approx((6 / 7 + 0 + 1) / 3)


def test_token_f1_counts_repeated_tokens_once_per_match() -> None:
    # pred "a a b" -> ["b"] after article removal; use non-articles: "x x y" vs "x y y"
    # common multiset {x:1, y:1} = 2; P = 2/3, R = 2/3 -> F = 2/3
    assert _compute("f1", ["x x y"], ["x y y"])["f1"] == pytest.approx(2 / 3)


# --- BLEU, chrF (sacrebleu) ----------------------------------------------------------------

def test_bleu_hand_worked() -> None:
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (BP = 1):
    # BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = 0.53728...
    r = _compute("bleu", ["the cat sat on the mat"], ["the cat sat on a mat"])
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25
    assert r["bleu"] == pytest.approx(expected, abs=1e-6)
    assert r["scores"][0] == pytest.approx(expected, abs=1e-6)
    assert _compute("bleu", ["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(100)


def test_chrf_bounds_and_corpus() -> None:
    import sacrebleu

    r = _compute("chrf", ["Le chat dort.", "xyz"], ["Le chat dort.", "abc"])
    assert r["scores"][0] == pytest.approx(100)
    assert r["scores"][1] == pytest.approx(0)
    preds, refs = ["Le chat dort sur le lit.", "Il pleut."], ["Le chat dort sur le canapé.",
                                                             "Il pleut à Londres."]
    assert _compute("chrf", preds, refs)["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(preds, [refs]).score)


# --- ROUGE-L (written here) -----------------------------------------------------------------

def _rouge_module():
    mod = reference.load_metric("rougeL")
    return __import__(type(mod).__module__, fromlist=["lcs_length"])


def test_rouge_l_parts() -> None:
    m = _rouge_module()
    assert m.tokenize("Hello, World! 42x") == ["hello", "world", "42x"]
    assert m.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example
    assert m.lcs_length([], ["a"]) == 0


def test_rouge_l_hand_worked() -> None:
    # LCS("the cat sat on the mat", "the cat on a mat") = the cat on mat = 4
    # P = 4/6, R = 4/5 -> F = 2PR/(P+R) = 8/11
    r = _compute("rougeL", ["the cat sat on the mat", "nothing here", "same words"],
                 ["the cat on a mat", "other text", "Same, words!"])
    assert r["scores"] == pytest.approx([8 / 11, 0.0, 1.0])
    assert r["rougeL"] == pytest.approx((8 / 11 + 1) / 3)


# --- the sandbox ----------------------------------------------------------------------------

def test_extract_code() -> None:
    fenced = "Here:\n```python\ndef f():\n    return 1\n```\nDone."
    assert code_exec.extract_code(fenced) == "def f():\n    return 1\n"
    assert code_exec.extract_code("```\nx = 1\n```") == "x = 1\n"
    assert code_exec.extract_code("```python\ny = 2\n") == "y = 2\n"  # unclosed fence
    assert code_exec.extract_code("def g():\n    pass") == "def g():\n    pass\n"


def test_sandbox_pass_and_fail() -> None:
    tests = "assert add(2, 3) == 5\n"
    ok, bad = code_exec.pass_at_1(["```python\ndef add(a, b):\n    return a + b\n```",
                                   "def add(a, b):\n    return a - b"], [tests, tests],
                                  timeout_s=10)
    assert ok.status == "passed" and ok.passed
    assert bad.status == "failed" and "AssertionError" in bad.detail


def test_sandbox_runs_in_another_process_and_folder() -> None:
    prog = (f"import os, sys\nassert os.getpid() != {os.getpid()}\n"
            f"assert os.getcwd() != {os.getcwd()!r}\n"
            "assert 'infersweep-sandbox-' in os.getcwd()\n")
    assert code_exec.run_sandboxed(prog, timeout_s=10).passed


def test_sandbox_infinite_loop_is_killed_by_the_timeout() -> None:
    t0 = time.monotonic()
    r = code_exec.run_sandboxed("while True:\n    pass\n", timeout_s=1.5)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t0 < 8


def test_sandbox_sleeping_loop_is_killed_by_the_wall_clock() -> None:
    # no CPU used: only the wall-clock timeout can stop it
    r = code_exec.run_sandboxed("import time\nwhile True:\n    time.sleep(0.1)\n", timeout_s=1)
    assert r.status == "timeout"


def test_sandbox_memory_hog_is_killed_by_the_limit() -> None:
    r = code_exec.run_sandboxed("x = bytearray(2 * 1024 ** 3)\n", timeout_s=10, memory_mb=256)
    assert r.status == "memory" and not r.passed
    grow = "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 ** 2))\n"
    assert code_exec.run_sandboxed(grow, timeout_s=10, memory_mb=256).status == "memory"


def test_sandbox_output_flood_does_not_fill_the_parent() -> None:
    # a program that floods stderr until it is killed must not make the pipeline hold
    # what it wrote (through a pipe that was gigabytes within a second); measured in a
    # fresh interpreter so its peak RSS is the sandbox call's alone
    import subprocess
    import sys

    prog = ("import sys\nb = 'x' * (1 << 20)\nwhile True:\n    sys.stderr.write(b)\n")
    # VmHWM: this interpreter's own peak (ru_maxrss would carry the forking parent's)
    driver = ("from pipeline.metrics import code_exec\n"
              f"r = code_exec.run_sandboxed({prog!r}, timeout_s=1.5)\n"
              "hwm = next(int(line.split()[1]) for line in open('/proc/self/status')"
              " if line.startswith('VmHWM:'))\n"
              "print(r.status, len(r.detail), hwm // 1024)\n")
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True,
                         timeout=60, check=True, cwd=Path(__file__).resolve().parents[1])
    status, detail_chars, peak_mib = out.stdout.split()
    assert status in ("failed", "timeout")  # the file-size limit or the clock ends it
    assert int(detail_chars) <= 2000
    assert int(peak_mib) < 256, f"parent peaked at {peak_mib} MiB"


def test_sandbox_sees_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERSWEEP_FAKE_SECRET", "s3cr3t-value")
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    prog = ("import os, sys\n"
            "bad = [k for k, v in os.environ.items() if 'SECRET' in k or k == 'HF_TOKEN'"
            " or 's3cr3t' in v]\n"
            "sys.exit(3 if bad else 0)\n")
    assert code_exec.run_sandboxed(prog, timeout_s=10).passed
    assert set(code_exec.minimal_env("/tmp/x")) == {"PATH", "LANG", "HOME", "TMPDIR",
                                                    "PYTHONDONTWRITEBYTECODE"}


def test_pass_at_1_module() -> None:
    r = _compute("pass_at_1", ["def f(x):\n    return x + 1", "def f(x):\n    return x",
                               "def f(x):\n    while True: pass"],
                 ["assert f(1) == 2"] * 3, timeout_s=4)  # roomy: a loaded machine
    assert r["scores"] == [1.0, 0.0, 0.0]
    assert r["statuses"] == ["passed", "failed", "timeout"]
    assert r["pass_at_1"] == pytest.approx(1 / 3)


# --- task sets ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,low,high", [("qa", 30, 50), ("math", 30, 50),
                                           ("translation", 30, 50), ("summarization", 30, 50),
                                           ("code", 30, 50)])
def test_task_sets_are_well_formed(name: str, low: int, high: int) -> None:
    rows = [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]
    assert low <= len(rows) <= high
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["prompt"].strip() and r["reference"].strip() for r in rows)


def test_math_answers_are_computed_right() -> None:
    import re

    for line in (TASKS / "math.jsonl").read_text().splitlines():
        r = json.loads(line)
        nums = [int(n) for n in re.findall(r"\d+", r["prompt"])]
        q = r["prompt"]
        if "more" in q:
            want = nums[0] + nums[1]
        elif "gave away" in q:
            want = nums[0] - nums[1]
        elif "shares" in q:
            want = nums[0] // nums[1]
        elif "already had" in q:
            want = nums[0] * nums[1] + nums[2]
        else:
            want = nums[0] * nums[1]
        assert r["reference"] == str(want), r["id"]


def test_code_task_solutions_pass_their_tests() -> None:
    rows = [json.loads(line) for line in (TASKS / "code.jsonl").read_text().splitlines()]
    results = code_exec.pass_at_1([r["solution"] for r in rows], [r["reference"] for r in rows])
    assert [r.status for r in results] == ["passed"] * len(rows)
    # and the bare prompt (signature + docstring, no body) does not pass
    assert not code_exec.run_sandboxed(
        code_exec.check_program(rows[0]["prompt"].split("\n\n", 1)[1], rows[0]["reference"])
    ).passed


# --- wiring ---------------------------------------------------------------------------------

class _Scoring:
    reference_metrics: list[str] | None = None
    task_reference_metrics = {"task_qa": ["exact_match", "f1"]}
    reference_first_line = True
    code_timeout_s = 5.0
    code_memory_mb = 256


def test_metric_keys_and_resolution() -> None:
    assert reference.metric_key("rougeL") == "ref_rougeL"
    assert reference.metric_key("/x/my-metric/") == "ref_my_metric"
    assert reference.metric_key("some/hub-id") == "ref_hub_id"
    s = _Scoring()
    assert reference.resolve_metrics(s, "task_qa") == ["exact_match", "f1"]
    assert reference.resolve_metrics(s, "quick") == []
    s.reference_metrics = []
    assert reference.resolve_metrics(s, "task_qa") == []
    s.reference_metrics = ["bleu", "a/bleu"]
    with pytest.raises(ConfigError, match="ref_bleu"):
        reference.resolve_metrics(s, "task_qa")


def test_first_line() -> None:
    assert reference.first_line("\n  Paris.\nIt is the capital.") == "Paris."
    assert reference.first_line("") == ""


def _record(i: int, text: str, error: str | None = None) -> RequestRecord:
    return RequestRecord(index=i, prompt="q", text=text, prompt_tokens=1,
                         output_token_ids=[1], t_start=0.0, t_first_token=0.1, t_end=0.2,
                         error=error)


def test_score_records_keeps_per_request_scores() -> None:
    reqs = [Request(0, "q0", (1,), reference="Paris"), Request(1, "q1", (1,), reference="Rome"),
            Request(2, "q2", (1,)), Request(3, "q3", (1,), reference="Oslo")]
    recs = [_record(0, "Paris.\nIt is in France."), _record(1, "Madrid"), _record(2, "x"),
            _record(3, "", error="boom")]
    out = reference.score_records(["exact_match", "f1"], recs, reqs, _Scoring())
    assert out == {"ref_exact_match": 0.5, "ref_f1": 0.5, "ref_scored_requests": 2.0}
    assert recs[0].extra["ref_scores"] == {"ref_exact_match": 1.0, "ref_f1": 1.0}
    assert recs[1].extra["ref_scores"] == {"ref_exact_match": 0.0, "ref_f1": 0.0}
    assert "ref_scores" not in recs[2].extra and "ref_scores" not in recs[3].extra


def test_any_evaluate_module_path_loads(tmp_path: Path) -> None:
    src = (reference.MODULES_DIR / "exact_match" / "exact_match.py").read_text()
    d = tmp_path / "my_metric"
    d.mkdir()
    (d / "my_metric.py").write_text(src.replace('"exact_match":', '"my_metric":'))
    corpus, per = reference.compute([str(d)], ["a", "b"], ["a", "c"])
    assert corpus == {"ref_my_metric": 0.5}
    assert per == {"ref_my_metric": [1.0, 0.0]}


def test_unloadable_metric_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="could not load"):
        reference.load_metric(str(tmp_path / "nope"))


def test_sandbox_cannot_fork() -> None:  # as root the child runs as nobody: limit holds
    r = code_exec.run_sandboxed("import os\nos.fork()\n", timeout_s=10)
    assert r.status == "failed" and "BlockingIOError" in r.detail


@pytest.mark.skipif(os.geteuid() != 0, reason="privileges are dropped only from root")
def test_sandbox_drops_root(tmp_path: Path) -> None:
    target = tmp_path / "owned_by_root"
    prog = (f"import os\nassert os.geteuid() != 0\n"
            f"open({str(target)!r}, 'w').write('x')\n")
    r = code_exec.run_sandboxed(prog, timeout_s=10)
    assert r.status == "failed" and not target.exists()


def test_interpreter_behind_a_private_folder_is_not_reachable() -> None:
    # a venv in a root-only folder: bin/python links to a world-executable system Python,
    # but user nobody cannot pass the folder to reach the link
    import shutil
    import tempfile

    target = os.path.realpath(shutil.which("sh") or "/bin/sh")
    assert code_exec._reachable_by_others(target)
    base = Path(tempfile.mkdtemp(prefix="infersweep-reach-"))  # pytest's tmp_path is 0700
    try:
        base.chmod(0o755)
        private = base / "private"
        (private / "bin").mkdir(parents=True)
        link = private / "bin" / "python"
        link.symlink_to(target)
        assert code_exec._reachable_by_others(str(link))
        private.chmod(0o700)
        assert not code_exec._reachable_by_others(str(link))
    finally:
        shutil.rmtree(base)
