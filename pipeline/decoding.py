"""One decoding spec, translated for each engine.

Every translation is explicit: each field of :class:`DecodingConfig` is either mapped or
refused with :class:`UnsupportedDecoding` naming the backend, the parameter and what to use
instead. Nothing is silently dropped, and no model default leaks in (e.g. a model's
``generation_config.top_k=50``), because every field is always passed.
"""

from __future__ import annotations

from typing import Any

from pipeline.backends.base import UnsupportedDecoding
from pipeline.config import OPENAI_APIS, DecodingConfig


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


def openai_body(
    d: DecodingConfig, max_new_tokens: int, fixed_length: bool, seed: int, api: str,
    extensions: bool = False, backend: str = "openai",
) -> dict[str, Any]:
    """Sampling fields of an OpenAI-compatible request body (``/v1/completions`` or
    ``/v1/chat/completions``); the caller adds model, prompt and streaming fields.

    ``extensions`` says the server accepts vLLM's extra fields (``top_k``,
    ``repetition_penalty``, ``min_tokens``, ``ignore_eos``): vLLM and SGLang do, the
    OpenAI API and TGI do not. Without them those knobs are refused rather than dropped.
    Every field is always sent, so a server's defaults (e.g. taken from the model's
    ``generation_config``) never leak in.
    """
    if api not in OPENAI_APIS:
        raise ValueError(f"api must be one of {OPENAI_APIS}, got {api!r}")
    if d.num_beams > 1:
        _refuse(backend, "num_beams", d.num_beams,
                "OpenAI-compatible servers do not stream beam search; use backend=vllm or "
                "backend=hf for beam search")
    if d.no_repeat_ngram_size:
        _refuse(backend, "no_repeat_ngram_size", d.no_repeat_ngram_size,
                "the OpenAI API has no n-gram blocking; use repetition_penalty (vLLM servers) "
                "or backend=hf")
    if d.length_penalty != 1.0:
        _refuse(backend, "length_penalty", d.length_penalty, "it only applies to beam search")
    no_ext = ("the OpenAI API has no such field; set backend.vllm_extensions=true if the "
              "server accepts vLLM's extra sampling fields (vLLM, SGLang)")
    sample = d.do_sample and d.temperature > 0
    if not extensions:
        if sample and d.top_k:
            _refuse(backend, "top_k", d.top_k, f"{no_ext}, or use top_k=0")
        if d.repetition_penalty != 1.0:
            # frequency_penalty is additive on counts, a different penalty: not a mapping.
            _refuse(backend, "repetition_penalty", d.repetition_penalty,
                    f"{no_ext}, or use repetition_penalty=1.0")
        if fixed_length:
            raise UnsupportedDecoding(
                f"backend {backend}: workload.fixed_length=true needs ignore_eos/min_tokens, "
                f"which the OpenAI API lacks; set backend.vllm_extensions=true if the server "
                f"accepts them, or workload.fixed_length=false"
            )
    body: dict[str, Any] = {
        "n": 1,
        # max_tokens rather than chat's newer max_completion_tokens: every OpenAI-compatible
        # server (vLLM, TGI, SGLang, llama.cpp) accepts it for both endpoints.
        "max_tokens": max_new_tokens,
        "temperature": d.temperature if sample else 0.0,
        "top_p": d.top_p if sample else 1.0,
        "seed": seed,
    }
    if extensions:
        body.update(
            top_k=d.top_k if sample and d.top_k else 0,
            repetition_penalty=d.repetition_penalty,
            min_tokens=max_new_tokens if fixed_length else 0,
            ignore_eos=fixed_length,
        )
    return body
