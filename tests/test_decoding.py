"""Decoding specs map onto engine arguments explicitly; unsupported ones are refused."""

from __future__ import annotations

import pytest

from pipeline.backends.hf import hf_generate_kwargs
from pipeline.backends.vllm.sampling import check_vllm
from pipeline.config import DecodingConfig
from pipeline.errors import UnsupportedDecoding


def test_greedy_passes_no_sampling_knobs() -> None:
    kw = hf_generate_kwargs(DecodingConfig(), 16, fixed_length=False)
    assert kw["do_sample"] is False and kw["num_beams"] == 1
    assert "temperature" not in kw and "top_k" not in kw and "min_new_tokens" not in kw


def test_sampling_passes_every_filter_so_model_defaults_cannot_leak() -> None:
    kw = hf_generate_kwargs(DecodingConfig(do_sample=True, temperature=0.7), 8, True)
    assert (kw["temperature"], kw["top_k"], kw["top_p"]) == (0.7, 0, 1.0)
    assert kw["min_new_tokens"] == kw["max_new_tokens"] == 8


def test_length_penalty_without_beams_is_refused_by_hf() -> None:
    with pytest.raises(UnsupportedDecoding, match="backend hf: decoding.length_penalty"):
        hf_generate_kwargs(DecodingConfig(length_penalty=2.0), 8, False)


@pytest.mark.parametrize(
    ("d", "param"),
    [
        (DecodingConfig(no_repeat_ngram_size=3), "no_repeat_ngram_size"),
        (DecodingConfig(num_beams=4, repetition_penalty=1.1), "repetition_penalty"),
        (DecodingConfig(num_beams=4, top_p=0.9), "top_k/top_p"),
    ],
)
def test_vllm_refuses_what_it_cannot_honour(d: DecodingConfig, param: str) -> None:
    with pytest.raises(UnsupportedDecoding, match=f"backend vllm: decoding.{param}"):
        check_vllm(d)
