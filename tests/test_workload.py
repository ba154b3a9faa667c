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


def test_arrivals_all_at_once_without_rate() -> None:
    from pipeline.workload import arrival_offsets

    assert arrival_offsets(3, None) == [0.0, 0.0, 0.0]


def test_arrivals_mean_rate_and_burstiness() -> None:
    import numpy as np

    from pipeline.workload import arrival_offsets

    t = arrival_offsets(4001, 10.0, "poisson", seed=1)
    assert t[0] == 0.0 and t == sorted(t)
    assert 0.9 < (len(t) - 1) / t[-1] / 10.0 < 1.1  # mean rate within 10% of 10 req/s
    assert arrival_offsets(50, 10.0, seed=3) == arrival_offsets(50, 10.0, seed=3)

    def cv(xs: list[float]) -> float:
        g = np.diff(xs)
        return float(np.std(g) / np.mean(g))

    # gamma shape < 1 is burstier (CV > 1), > 1 more regular (CV < 1); Poisson has CV 1
    assert cv(arrival_offsets(4001, 10.0, "gamma", 0.25, 1)) > 1.3
    assert cv(arrival_offsets(4001, 10.0, "gamma", 4.0, 1)) < 0.7
