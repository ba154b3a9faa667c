"""Prompt loading: file formats, limits and the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import WorkloadConfig
from pipeline.errors import ConfigError
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


# --- formats read through `datasets`, references and ids, path problems ---------------


def test_every_format_reads_prompts_references_and_ids(tmp_path: Path) -> None:
    import datasets
    import pandas as pd

    rows = {"question": ["What is two plus two?", "Name a colour."],
            "answer": ["four", "blue"], "qid": ["q1", "q2"]}
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("".join(
        f'{{"question": "{q}", "answer": "{a}", "qid": "{i}"}}\n\n'
        for q, a, i in zip(*rows.values(), strict=True)))
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"question": ["x"]}),
                          "test": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "dsdict"))
    kw = dict(prompt_field="question", reference_field="answer", id_field="qid")
    for name in ("p.csv", "p.parquet", "p.jsonl", "ds"):
        got = load_prompts(_w(prompts_file=str(tmp_path / name), **kw))
        assert got == rows["question"], name
        assert [p.reference for p in got] == ["four", "blue"], name
        assert [p.request_id for p in got] == ["q1", "q2"], name
    got = load_prompts(_w(prompts_file=str(tmp_path / "dsdict"), split="test", **kw))
    assert got == rows["question"]
    with pytest.raises(ConfigError, match="workload.split='nope' is invalid: .* holds splits"):
        load_prompts(_w(prompts_file=str(tmp_path / "dsdict"), split="nope", **kw))
    # without an id field a request is named by where it came from
    got = load_prompts(_w(prompts_file=str(tmp_path / "p.jsonl"), prompt_field="question"))
    assert [p.request_id for p in got] == ["line 1", "line 3"]
    got = load_prompts(_w(prompts_file=str(tmp_path / "p.csv"), prompt_field="question",
                          num_prompts=3))
    assert [p.request_id for p in got] == ["row 1", "row 2", "row 1#1"]


def test_txt_lines_are_prompts_read_through_datasets(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("first\r\n\nsecond\nthird")
    got = load_prompts(_w(prompts_file=str(f)))
    assert got == ["first", "second", "third"]
    assert [p.request_id for p in got] == ["line 1", "line 3", "line 4"]
    with pytest.raises(ConfigError, match="a .txt line is only a prompt"):
        load_prompts(_w(prompts_file=str(f), reference_field="answer"))


def test_table_errors_name_the_column_or_row(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("text,answer\nhello,x\n")
    with pytest.raises(ConfigError, match=r"workload.prompt_field='prompt' is invalid: no such "
                                          r"column .* \(columns: text, answer\)"):
        load_prompts(_w(prompts_file=str(f)))
    f.write_text("prompt,answer\nhello,x\n,y\n")
    with pytest.raises(ConfigError, match="row 2: empty prompt"):
        load_prompts(_w(prompts_file=str(f)))


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: "/dev/null", "is not a regular file"),
        (lambda d: _write(d / "e.jsonl", ""), "is empty"),
        (lambda d: str(d / "missing.txt"), "no such file"),
        (lambda d: _write(d / "p.xml", "a"), "must end in .txt, .jsonl, .csv or .parquet"),
        (lambda d: str(d), "is a folder but not a dataset saved with save_to_disk"),
    ],
)
def test_path_problems_are_refused_by_validation(tmp_path: Path, make, needle: str) -> None:
    from pipeline.config import validate_workload

    path = make(tmp_path)
    with pytest.raises(ConfigError, match=needle):
        validate_workload(_w(prompts_file=path))
    with pytest.raises(ConfigError, match=needle):
        read_prompts_file(path, 10_000, 1000)


# --- length distributions and validation of the synthetic keys -------------------------


def test_length_distributions_stay_in_bounds_and_follow_the_seed() -> None:
    import numpy as np

    from pipeline.workload.lengths import sample_lengths

    assert sample_lengths("fixed", 7, None, None, None, 3, [0]) == [7, 7, 7]
    for dist in ("uniform", "normal", "lognormal"):
        xs = sample_lengths(dist, 200, 60.0, 50, 400, 2000, [0, 1])
        assert min(xs) >= 50 and max(xs) <= 400, dist
        assert xs == sample_lengths(dist, 200, 60.0, 50, 400, 2000, [0, 1])
        assert xs != sample_lengths(dist, 200, 60.0, 50, 400, 2000, [1, 1])
        if dist != "uniform":  # the mean is the configured one (clipping barely bites)
            assert abs(np.mean(xs) - 200) < 8, dist
    assert abs(np.std(sample_lengths("lognormal", 200, 60.0, 1, 10_000, 5000, [2])) - 60) < 6


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(source="synthetic"), "workload.num_prompts=None is invalid"),
        (dict(source="synthetic", num_prompts=2, input_dist="uniform", input_min=10),
         "workload.input_max=None is invalid"),
        (dict(source="synthetic", num_prompts=2, input_dist="normal", input_min=10,
              input_max=20), "workload.input_std=None is invalid"),
        (dict(source="synthetic", num_prompts=2, input_dist="zipf"), "allowed values are fixed"),
        (dict(source="synthetic", num_prompts=2, shared_prefix_tokens=64, prefix_groups=3),
         "workload.prefix_groups=3 is invalid: must be <= workload.num_prompts=2"),
        (dict(source="synthetic", num_prompts=2, max_input_tokens=64),
         "workload.max_input_tokens=64 is invalid: is below the longest synthetic input"),
        (dict(prompts=["a"], prefix_groups=2), "shared prefixes need workload.source=synthetic"),
        (dict(prompts=["a"], on_too_long="drop"), "allowed values are truncate, refuse"),
        (dict(prompts=["a"], output_dist="uniform", output_min=9, output_max=3),
         "workload.output_max=3 is invalid: must be >= 9"),
    ],
)
def test_synthetic_keys_are_validated(kw: dict, needle: str) -> None:
    from pipeline.config import validate_workload

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        validate_workload(_w(**kw))


def test_synthetic_placeholders_count_before_any_tokenizer() -> None:
    got = load_prompts(_w(source="synthetic", num_prompts=3))
    assert len(got) == 3 and [p.request_id for p in got] == [f"synthetic {i}" for i in range(3)]


# --- the context limit, read from metadata only ----------------------------------------


def _spec(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_configs, validate
    from tests.conftest import ROOT

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return validate(compose(config_name="config", overrides=list(overrides)))


def test_context_limit_from_gguf_config_json_and_max_model_len(tmp_path: Path) -> None:
    from pipeline.workload.limits import check_context, context_limit

    fresh = f"paths.cache_dir={tmp_path / 'cache'}"  # no converted folder: the GGUF header
    limit, what = context_limit(_spec(tmp_path, fresh))
    assert limit == 8192 and "llama.context_length" in what
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"max_position_embeddings": 1024}')
    spec = _spec(tmp_path, "model=hf", f"model.path={model}", "workload=synthetic",
                 "workload.input_tokens=1000", "workload.max_new_tokens=24")
    assert context_limit(spec) == (1024, f"the model's context of 1024 tokens "
                                         f"(max_position_embeddings in {model}/config.json)")
    check_context(spec)  # 1000 + 24 fits exactly
    spec = _spec(tmp_path, "model=hf", f"model.path={model}", "workload=synthetic",
                 "workload.input_tokens=1000", "workload.max_new_tokens=25")
    with pytest.raises(ConfigError, match="1000 input tokens \\+ 25 output tokens = 1025"):
        check_context(spec)
    spec = _spec(tmp_path, "model=hf", f"model.path={model}", "backend=vllm",
                 "backend.max_model_len=512", "workload.max_new_tokens=600")
    with pytest.raises(ConfigError, match="exceeds backend.max_model_len=512 \\(the model's "
                                          "context is 1024\\)"):
        check_context(spec)


def test_output_max_of_a_distribution_is_what_must_fit(tmp_path: Path) -> None:
    from pipeline.workload.limits import length_needs

    spec = _spec(tmp_path, "workload=synthetic", "workload.input_dist=uniform",
                 "workload.input_min=64", "workload.input_max=900",
                 "workload.output_dist=normal", "workload.output_std=8",
                 "workload.output_min=4", "workload.output_max=77")
    assert length_needs(spec) == (("workload.input_max", 900, "input tokens"),
                                  ("workload.output_max", 77))


def test_memory_above_load() -> None:
    from pipeline.measure.memory import above_load, memory_now

    now = memory_now()
    assert now["rss_bytes"] > 0
    got = above_load({"rss_bytes": 100, "cuda_allocated_bytes": 10}, 150,
                     {"cuda_max_allocated_bytes": 40})
    assert got == {"peak_rss_above_load_bytes": 50.0,
                   "cuda_max_allocated_above_load_bytes": 30.0}
    assert above_load({"rss_bytes": 100}, 120, {}) == {"peak_rss_above_load_bytes": 20.0}
