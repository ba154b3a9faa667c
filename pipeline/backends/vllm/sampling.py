"""One :class:`~pipeline.config.DecodingConfig` in vLLM's terms (offline engine).

Every field is either mapped or refused with :class:`UnsupportedDecoding` naming the
backend, the parameter and what to use instead; every field is always passed, so no model
default (``generation_config``) leaks in. The server's mapping is the OpenAI request body
(``openai_body``), with vLLM's extensions on.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import DecodingConfig
from pipeline.errors import UnsupportedDecoding


def _refuse(key: str, value: Any, instead: str) -> None:
    raise UnsupportedDecoding.option("vllm", key, value, instead)


def check_vllm(d: DecodingConfig) -> None:
    """Raise before the engine loads if vLLM cannot honour ``d``."""
    if d.no_repeat_ngram_size:
        _refuse("no_repeat_ngram_size", d.no_repeat_ngram_size,
                "use repetition_penalty, or backend=hf")
    if d.num_beams > 1:
        if d.do_sample:
            # vLLM's beam search ranks candidates by raw logprobs: temperature would not
            # turn it into HF-style beam sampling, so accepting it would drop do_sample.
            _refuse("do_sample", d.do_sample,
                    "vLLM beam search is deterministic (no beam sampling); set "
                    "decoding.do_sample=false or use backend=hf")
        if d.repetition_penalty != 1.0:
            _refuse("repetition_penalty", d.repetition_penalty,
                    "vLLM beam search has no repetition penalty; use backend=hf")
        if d.top_k or d.top_p < 1.0:
            _refuse("top_k/top_p", (d.top_k, d.top_p),
                    "vLLM beam search does not filter; use backend=hf for beam sampling")
    elif d.length_penalty != 1.0:
        _refuse("length_penalty", d.length_penalty, "it only applies to beam search")


def vllm_params(d: DecodingConfig, max_new_tokens: int, fixed_length: bool, seed: int) -> Any:
    """``SamplingParams`` or, for beam search, ``BeamSearchParams``."""
    check_vllm(d)
    from vllm import SamplingParams
    from vllm.sampling_params import BeamSearchParams

    if d.num_beams > 1:
        return BeamSearchParams(
            beam_width=d.num_beams,
            max_tokens=max_new_tokens,
            ignore_eos=fixed_length,
            temperature=0.0,
            length_penalty=d.length_penalty,
        )
    sample = d.do_sample and d.temperature > 0
    return SamplingParams(
        n=1,
        temperature=d.temperature if sample else 0.0,
        top_k=d.top_k if sample and d.top_k else 0,
        top_p=d.top_p if sample else 1.0,
        repetition_penalty=d.repetition_penalty,
        seed=seed,
        max_tokens=max_new_tokens,
        min_tokens=max_new_tokens if fixed_length else 0,
        ignore_eos=fixed_length,
    )
