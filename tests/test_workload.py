"""Prompt loading: file formats, limits and the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, WorkloadConfig
from pipeline.workload import batches, load_prompts, read_prompts_file


def _w(**kw) -> WorkloadConfig:
    return WorkloadConfig(**kw)


def test_txt_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("first\n\n   \nsecond\n")
    assert load_prompts(_w(prompts_file=str(f))) == ["first", "second"]


def test_jsonl_reads_prompt_field(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": 3}\n')
    assert load_prompts(_w(prompts_file=str(f))) == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a"}\n{"text": "b"}\n', "line 2: needs a string field 'prompt'"),
        ('{"prompt": "a"}\nnot json\n', "line 2: not valid JSON"),
        ('{"prompt": 5}\n', "line 1: needs a string field 'prompt'"),
        ('{"prompt": "  "}\n', "line 1: empty prompt"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_prompts_file(f, 10_000, 1000)


def test_bad_encoding_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 \(line 3\)"):
        read_prompts_file(f, 10_000, 1000)


def test_size_limits(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("x" * 50 + "\n")
    with pytest.raises(ConfigError, match="exceeds workload.max_file_bytes=10"):
        read_prompts_file(f, 10, 1000)
    with pytest.raises(ConfigError, match="line 1: prompt of 50 characters exceeds"):
        read_prompts_file(f, 10_000, 20)


def test_num_prompts_cuts_and_cycles() -> None:
    assert load_prompts(_w(prompts=["a", "b", "c"], num_prompts=2)) == ["a", "b"]
    assert load_prompts(_w(prompts=["a", "b"], num_prompts=5)) == ["a", "b", "a", "b", "a"]


def test_batches_keep_order_and_remainder() -> None:
    assert batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
