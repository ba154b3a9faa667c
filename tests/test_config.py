"""Config composition and validation: every preset composes; bad values fail early."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import register_configs, validate
from pipeline.errors import ConfigError
from tests.conftest import ROOT, compose_config, run_cli

register_configs()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("name", _options("decoding"))
def test_every_decoding_preset_validates(name: str) -> None:
    spec = validate(compose_config(f"decoding={name}"))
    assert spec.decoding.name == name


@pytest.mark.parametrize("name", _options("workload"))
def test_every_workload_preset_validates(name: str, tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("hello there\n")
    extra = [f"workload.prompts_file={f}"] if name == "file" else []
    if name in ("trace", "conversation"):  # serving workloads: offline backends are refused
        extra = ["backend=vllm_server"]
    spec = validate(compose_config(f"workload={name}", *extra))
    assert spec.workload.name == name


def test_defaults_and_sweepable_values() -> None:
    spec = validate(compose_config())
    assert (spec.model.name, spec.backend.name, spec.decoding.name, spec.workload.name) == (
        "smollm2-135m", "hf", "greedy", "quick")
    spec = validate(compose_config("decoding=beam", "decoding.num_beams=8",
                                    "decoding.repetition_penalty=1.2"))
    assert spec.decoding.num_beams == 8 and spec.decoding.repetition_penalty == 1.2


def test_combined_and_use_case_presets_hold_the_documented_values() -> None:
    c = validate(compose_config("decoding=combined")).decoding
    assert (c.temperature, c.top_p, c.repetition_penalty, c.no_repeat_ngram_size) == (
        0.7, 0.9, 1.2, 3)
    t = validate(compose_config("decoding=translation")).decoding
    assert (t.num_beams, t.temperature) == (4, 0.3)
    code = validate(compose_config("decoding=code")).decoding
    assert (code.temperature, code.top_p, code.top_k) == (0.3, 0.9, 50)


def test_unknown_key_is_refused_at_composition() -> None:
    with pytest.raises(Exception, match="nosuchkey"):
        compose_config("decoding.nosuchkey=1")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("decoding.temperature=-1", "decoding.temperature=-1.0"),
        ("decoding.top_p=1.5", "decoding.top_p=1.5"),
        ("decoding.top_k=-3", "decoding.top_k=-3"),
        ("decoding.num_beams=0", "decoding.num_beams=0"),
        ("workload.max_new_tokens=0", "workload.max_new_tokens=0"),
        ("model.dtype=float8", "allowed values are float32"),
        ("backend.attn_implementation=magic", "allowed values are eager"),
        ("workload.batch_size=0", "workload.batch_size=0"),
    ],
)
def test_bad_values_name_key_value_and_rule(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        validate(compose_config(override))


# The catalogue, end to end through run.py: one line on stderr, exit 2, no model.
CLI_CASES = [
    ("decoding.temperature=-1", "decoding.temperature"),
    ("decoding.top_p=1.5", "decoding.top_p"),
    ("decoding.top_k=-3", "decoding.top_k"),
    ("decoding.num_beams=0", "decoding.num_beams"),
    ("workload.max_new_tokens=0", "workload.max_new_tokens"),
    ("workload.prompts_file=/nonexistent/prompts.txt", "no such file"),
    ("model=hf model.path=./no/such/model", "model.path"),
    # Hydra's own "not in struct" / type refusals, in the project's one line
    ("backend=hf backend.max_model_len=64", "backend.max_model_len=64 is invalid: unknown key"),
    ("model.nosuch=1", "model.nosuch=1 is invalid: unknown key; allowed keys are"),
    ("tracking.force_takeover=maybe", "tracking.force_takeover=maybe is invalid"),
    ("-m backend=hf,vllm backend.enforce_eager=false", "(with backend=hf)"),
    ("model.use_chat_template=sometimes", "model.use_chat_template"),
]


@pytest.mark.parametrize(("override", "needle"), CLI_CASES)
def test_cli_rejects_bad_input_in_one_line(override: str, needle: str, tmp_path: Path) -> None:
    p = run_cli(*override.split(), f"paths.output_dir={tmp_path}", timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert "Loading weights" not in p.stdout + p.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_cli_rejects_empty_prompts_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("\n  \n")
    p = run_cli("workload=file", f"workload.prompts_file={f}", f"paths.output_dir={tmp_path}")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "no prompts in it" in p.stderr


def test_cli_rejects_unknown_decoding_name(tmp_path: Path) -> None:
    p = run_cli("-m", "decoding=greedy,nosuchdecoding", f"paths.output_dir={tmp_path}")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "error: decoding='nosuchdecoding' is invalid: allowed values are beam, chatbot, code, "
        "combined, creative_writing, factual_qa, greedy, summarization, temperature, topk, "
        "topp, translation")
    assert not list(tmp_path.rglob("results.json"))
