"""One decoding spec, translated for each engine.

Every translation is explicit: each field of :class:`DecodingConfig` is either mapped or
refused with :class:`UnsupportedDecoding` naming the backend, the parameter and what to use
instead. Nothing is silently dropped, and no model default leaks in (e.g. a model's
``generation_config.top_k=50``), because every field is always passed.
"""

from __future__ import annotations

from typing import Any

from pipeline.backends.base import UnsupportedDecoding
from pipeline.config import DecodingConfig


def strategy(d: DecodingConfig) -> str:
    """``beam`` | ``sample`` | ``greedy`` (beam wins: HF's beam sampling is still beam)."""
    if d.num_beams > 1:
        return "beam"
    if d.do_sample and d.temperature > 0:
        return "sample"
    return "greedy"


def hf_generate_kwargs(d: DecodingConfig, max_new_tokens: int, fixed_length: bool) -> dict:
    """Keyword arguments for transformers' ``generate``."""
    sample = d.do_sample and d.temperature > 0
    kw: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "num_beams": d.num_beams,
        "repetition_penalty": d.repetition_penalty,
        "no_repeat_ngram_size": d.no_repeat_ngram_size,
    }
    if sample:
        # All three always passed (0 / 1.0 = off) so a model's own generation_config
        # defaults (often top_k=50) never leak in; greedy and beam ignore them.
        kw.update(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)
    if d.num_beams > 1:
        kw["length_penalty"] = d.length_penalty
        kw["early_stopping"] = True
    elif d.length_penalty != 1.0:
        raise UnsupportedDecoding(
            "backend hf: decoding.length_penalty only applies to beam search "
            "(set decoding.num_beams > 1 or leave length_penalty at 1.0)"
        )
    if fixed_length:
        kw["min_new_tokens"] = max_new_tokens
    return kw


def _refuse(backend: str, key: str, value: Any, instead: str) -> None:
    raise UnsupportedDecoding(
        f"backend {backend}: decoding.{key}={value!r} is not supported; {instead}"
    )


def check_vllm(d: DecodingConfig) -> None:
    """Raise before the engine loads if vLLM cannot honour ``d``."""
    if d.no_repeat_ngram_size:
        _refuse("vllm", "no_repeat_ngram_size", d.no_repeat_ngram_size,
                "use repetition_penalty, or backend=hf")
    if d.num_beams > 1:
        if d.do_sample:
            # vLLM's beam search ranks candidates by raw logprobs: temperature would not
            # turn it into HF-style beam sampling, so accepting it would drop do_sample.
            _refuse("vllm", "do_sample", d.do_sample,
                    "vLLM beam search is deterministic (no beam sampling); set "
                    "decoding.do_sample=false or use backend=hf")
        if d.repetition_penalty != 1.0:
            _refuse("vllm", "repetition_penalty", d.repetition_penalty,
                    "vLLM beam search has no repetition penalty; use backend=hf")
        if d.top_k or d.top_p < 1.0:
            _refuse("vllm", "top_k/top_p", (d.top_k, d.top_p),
                    "vLLM beam search does not filter; use backend=hf for beam sampling")
    elif d.length_penalty != 1.0:
        _refuse("vllm", "length_penalty", d.length_penalty, "it only applies to beam search")


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
