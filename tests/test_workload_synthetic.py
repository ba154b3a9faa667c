"""Synthetic prompts, shared prefixes and long-prompt handling under the real tokenizer of
the packaged model (exact counts are a property of one tokenizer, so no fake one)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import WorkloadConfig
from pipeline.errors import ConfigError
from pipeline.records import RequestRecord
from pipeline.workload import annotate_records, load_prompts, make_requests, render_prompt
from pipeline.workload.synthetic import common_prefix

pytestmark = pytest.mark.slow

DISTS = {
    "fixed": dict(input_tokens=300),
    "uniform": dict(input_dist="uniform", input_min=40, input_max=700),
    "normal": dict(input_dist="normal", input_tokens=300, input_std=120, input_min=40,
                   input_max=700),
    "lognormal": dict(input_dist="lognormal", input_tokens=300, input_std=150, input_min=40,
                      input_max=900),
}


@pytest.fixture(scope="module")
def tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _requests(tokenizer: Any, chat: bool, seed: int = 0, **kw: Any) -> list:
    w = WorkloadConfig(source="synthetic", num_prompts=kw.pop("num_prompts", 12), **kw)
    return make_requests(load_prompts(w), tokenizer, chat, w, seed)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
@pytest.mark.parametrize("dist", list(DISTS))
def test_rendered_lengths_are_exact(tokenizer: Any, chat: bool, dist: str) -> None:
    from pipeline.workload.lengths import sample_lengths

    kw = DISTS[dist]
    reqs = _requests(tokenizer, chat, **kw)
    w = WorkloadConfig(source="synthetic", **kw)
    targets = sample_lengths(w.input_dist, w.input_tokens, w.input_std, w.input_min,
                             w.input_max, 12, [0, 1])
    assert [len(r.prompt_token_ids) for r in reqs] == targets
    for r in reqs:  # the text itself renders to those ids: what every backend is fed
        assert tuple(render_prompt(tokenizer, r.prompt, chat)) == r.prompt_token_ids
        assert r.prompt.isascii() and len(r.prompt.split()) > 5  # prose, not token soup
    if dist != "fixed":
        assert len(set(targets)) > 3


def test_long_exact_prompt(tokenizer: Any) -> None:
    (r,) = _requests(tokenizer, True, input_tokens=4096, num_prompts=1)
    assert len(r.prompt_token_ids) == 4096


def test_seed_decides_the_text_and_lengths(tokenizer: Any) -> None:
    a = _requests(tokenizer, True, seed=0, **DISTS["uniform"])
    b = _requests(tokenizer, True, seed=0, **DISTS["uniform"])
    c = _requests(tokenizer, True, seed=1, **DISTS["uniform"])
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert [len(r.prompt_token_ids) for r in a] != [len(r.prompt_token_ids) for r in c]
    f0 = _requests(tokenizer, True, seed=0, input_tokens=128, num_prompts=4)
    f1 = _requests(tokenizer, True, seed=5, input_tokens=128, num_prompts=4)
    assert [r.prompt for r in f0] != [r.prompt for r in f1]
    assert len({r.prompt for r in f0}) == 4  # requests differ from each other too


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_shared_prefix_groups(tokenizer: Any, chat: bool) -> None:
    p, groups = 200, 3
    reqs = _requests(tokenizer, chat, input_tokens=400, shared_prefix_tokens=p,
                     prefix_groups=groups, num_prompts=10)
    assert [r.prefix_group for r in reqs] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [r.group_position for r in reqs] == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert all(len(r.prompt_token_ids) == 400 for r in reqs)
    for a in reqs:
        for b in reqs:
            if a is b:
                continue
            shared = common_prefix(a.prompt_token_ids, b.prompt_token_ids)
            if a.prefix_group == b.prefix_group:
                assert shared == p  # exactly P: the next token already differs
            else:
                assert shared < p
    # with a distribution of input lengths too
    mixed = _requests(tokenizer, chat, input_dist="uniform", input_min=250, input_max=500,
                      shared_prefix_tokens=p, prefix_groups=2, num_prompts=6)
    assert len({len(r.prompt_token_ids) for r in mixed}) > 1
    assert all(mixed[0].prompt_token_ids[:p] == r.prompt_token_ids[:p] for r in mixed[:3])


def test_group_lands_in_each_record(tokenizer: Any) -> None:
    reqs = _requests(tokenizer, True, input_tokens=100, shared_prefix_tokens=50,
                     prefix_groups=2, num_prompts=4)
    recs = [RequestRecord(index=r.index, prompt=r.prompt, text="", prompt_tokens=100,
                          output_token_ids=[], t_start=0.0, t_first_token=None, t_end=0.0)
            for r in reqs]
    annotate_records(recs, reqs)
    assert [(r.extra["prefix_group"], r.extra["group_position"]) for r in recs] == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    assert recs[3].extra["request_id"] == "synthetic 3"


def test_too_short_for_the_template_is_refused(tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="workload.input_tokens=10 is invalid: the rendering "
                                          "adds 30 tokens .*use at least 31"):
        _requests(tokenizer, True, input_tokens=10, num_prompts=1)
    with pytest.raises(ConfigError, match="chat template's header alone is 24 tokens"):
        _requests(tokenizer, True, input_tokens=100, shared_prefix_tokens=20, num_prompts=2)


def test_per_request_output_lengths(tokenizer: Any) -> None:
    kw = dict(output_dist="uniform", output_min=4, output_max=64)
    reqs = _requests(tokenizer, True, input_tokens=64, **kw)
    outs = [r.max_new_tokens for r in reqs]
    assert all(4 <= n <= 64 for n in outs) and len(set(outs)) > 3
    assert outs == [r.max_new_tokens for r in _requests(tokenizer, True, input_tokens=64, **kw)]
    assert {r.max_new_tokens for r in _requests(tokenizer, True, input_tokens=64)} == {None}


def test_max_input_tokens_truncates_or_refuses(tokenizer: Any) -> None:
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 20)
    w = WorkloadConfig(prompts=["Short one.", long], max_input_tokens=64, on_too_long="truncate")
    reqs = make_requests(load_prompts(w), tokenizer, True, w)
    assert len(reqs[0].prompt_token_ids) < 64 and reqs[0].truncated_from is None
    assert 60 <= len(reqs[1].prompt_token_ids) <= 64
    assert reqs[1].truncated_from > 64 and long.startswith(reqs[1].prompt)
    w = WorkloadConfig(prompts=["Short one.", long], max_input_tokens=64)
    with pytest.raises(ConfigError, match=r"workload.max_input_tokens=64 is exceeded by 1 "
                                          r"prompt\(s\): prompt 1 \(\d+ tokens\); use "
                                          r"workload.on_too_long=truncate"):
        make_requests(load_prompts(w), tokenizer, True, w)


def test_file_requests_keep_reference_and_id(tokenizer: Any, tmp_path) -> None:
    f = tmp_path / "qa.jsonl"
    f.write_text('{"prompt": "Two plus two?", "answer": "four", "id": "q7"}\n')
    w = WorkloadConfig(prompts_file=str(f), reference_field="answer", id_field="id")
    (r,) = make_requests(load_prompts(w), tokenizer, True, w)
    assert (r.reference, r.request_id) == ("four", "q7")
    assert r.prompt_token_ids == tuple(render_prompt(tokenizer, "Two plus two?", True))
