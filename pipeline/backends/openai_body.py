"""The sampling fields of an OpenAI-compatible request body, shared by every online
backend (:mod:`pipeline.backends.openai` and the servers built on it): what each decoding
setting becomes, and which ones such a server cannot honour (refused, never dropped)."""

from __future__ import annotations

from typing import Any

from pipeline.config import DecodingConfig
from pipeline.errors import UnsupportedDecoding

OPENAI_APIS = ("completions", "chat")


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


def _refuse(backend: str, key: str, value: Any, instead: str) -> None:
    raise UnsupportedDecoding.option(backend, key, value, instead)
