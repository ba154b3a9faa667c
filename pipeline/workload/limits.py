"""Lengths a job may ask for, checked before any model loads.

The model's context is read from metadata only: its ``config.json`` (a local folder, the
converted cache of a packaged model, or the hub cache), or for a packaged model not yet
converted the GGUF header, through the ``gguf`` package, which memory-maps the file and
reads no tensor. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.workload.lengths import length_bounds

if TYPE_CHECKING:
    from pipeline.config import Config, ModelConfig
    from pipeline.records import Request

log = logging.getLogger(__name__)

#: config.json keys that hold the context length, most common first
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                 "seq_length", "n_ctx")


def _from_config_json(path: Path) -> tuple[int, str] | None:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for node in (cfg, cfg.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(node.get(key), int) and node[key] > 0:
                return node[key], f"{key} in {path}"
    return None


def _from_gguf(path: Path) -> tuple[int, str] | None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        return None
    arch = arch_field.contents()
    ctx = reader.fields.get(f"{arch}.context_length")
    if ctx is None:
        return None
    return int(ctx.contents()), f"{arch}.context_length in {path.name}"


def model_context(m: ModelConfig, cache_dir: Path) -> tuple[int, str] | None:
    """The model's context length in tokens and where it was read; None when no metadata
    can be found without loading or downloading (e.g. a hub id not in the local cache)."""
    from pipeline.config import looks_local

    if m.source == "packaged":
        from pipeline.models import converted_dir, packaged_gguf

        found = _from_config_json(converted_dir(m, cache_dir) / "config.json")
        if found:
            return found
        try:
            return _from_gguf(packaged_gguf(m))
        except ConfigError:
            return None  # not installed: resolving the model says so, with the fix
    assert m.path
    if looks_local(m.path):
        return _from_config_json(Path(m.path).expanduser() / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(m.path, "config.json", revision=m.revision)
    except Exception:  # no hub client, odd id: the engine checks at load
        return None
    return _from_config_json(Path(cached)) if isinstance(cached, str) else None


def context_limit(spec: Config) -> tuple[int, str] | None:
    """The most tokens (prompt + output) one request may hold, and what sets it: the
    model's context, or ``backend.max_model_len`` (vLLM) where that is smaller."""
    found = model_context(spec.model, Path(spec.paths.cache_dir).expanduser().resolve())
    engine = getattr(spec.backend, "max_model_len", None)
    if isinstance(engine, int) and (found is None or engine < found[0]):
        model_note = f" (the model's context is {found[0]})" if found else ""
        return engine, f"backend.max_model_len={engine}{model_note}"
    if found is None:
        return None
    return found[0], f"the model's context of {found[0]} tokens ({found[1]})"


def length_needs(spec: Config) -> tuple[tuple[str, int, str], tuple[str, int]]:
    """The longest input and output a request of this workload can have:
    ``((input key, tokens, how it is known), (output key, tokens))``; the input key is
    empty when prompts are counted only once the tokenizer loads."""
    w = spec.workload
    if w.source == "synthetic":
        key = "workload.input_tokens" if w.input_dist == "fixed" else "workload.input_max"
        inp = (key, length_bounds(w.input_dist, w.input_tokens, w.input_min, w.input_max)[1],
               "input tokens")
    elif w.max_input_tokens is not None:
        inp = ("workload.max_input_tokens", w.max_input_tokens, "input tokens (at most)")
    else:
        # prompts are counted only once the tokenizer loads: at least one token each
        inp = ("", 1, "input token (at least)")
    out_key = "workload.max_new_tokens" if w.output_dist == "fixed" else "workload.output_max"
    out = length_bounds(w.output_dist, w.max_new_tokens, w.output_min, w.output_max)[1]
    return inp, (out_key, out)


def check_context(spec: Config) -> None:
    """Refuse a job whose input + output lengths cannot fit the context, naming both
    numbers and the limit; silent when the limit cannot be read without loading."""
    limit = context_limit(spec)
    if limit is None:
        log.debug("context length unknown before loading; the engine checks it")
        return
    ctx, what = limit
    if spec.workload.source == "trace":  # each line's own lengths, named by its line
        from pipeline.workload.trace import check_trace_context

        check_trace_context(spec.workload, ctx, what)
        return
    if spec.workload.source == "conversations":  # the full bound is checked once the
        from pipeline.workload.conversations import (  # tokenizer renders the history
            check_synthetic_conversation_context,
        )

        check_synthetic_conversation_context(spec.workload, ctx, what)
        return
    (in_key, n_in, in_how), (out_key, n_out) = length_needs(spec)
    if n_in + n_out <= ctx:
        return
    # blame the input when it alone leaves no room for one output token
    key, value = (in_key, n_in) if n_in >= ctx else (out_key, n_out)
    lower = f"{in_key} or {out_key}" if in_key else out_key
    raise ConfigError(
        f"{key}={value} is invalid: {n_in} {in_how} + {n_out} output tokens = "
        f"{n_in + n_out} tokens exceeds {what}; lower {lower}")


def _backend_class(spec: Config) -> Any:
    from pipeline.backends import backend_class

    return backend_class(spec.backend.impl)


def check_output_lengths(spec: Config) -> None:
    """Refuse per-request output lengths on a backend that cannot honour them (never
    silently run every request to one length)."""
    w = spec.workload
    if w.output_dist == "fixed" and w.source != "trace":  # a trace: lengths per request
        return
    try:
        ok = bool(getattr(_backend_class(spec), "per_request_output_lengths", False))
    except Exception:  # the class cannot be had here: refuse rather than guess
        ok = False
    if not ok and w.source == "trace":
        raise ConfigError(
            f"workload.source='trace' is invalid for backend {spec.backend.name}: it cannot "
            f"give each request its own output length (the trace's output_length)")
    if not ok:
        raise ConfigError(
            f"workload.output_dist={w.output_dist!r} is invalid for backend "
            f"{spec.backend.name}: it cannot give each request its own output length; "
            f"use workload.output_dist=fixed (one workload.max_new_tokens for every request)")


def check_limits(spec: Config) -> None:
    """Every workload check that needs the backend or model metadata (no model load)."""
    check_output_lengths(spec)
    check_context(spec)


def check_requests_fit(requests: Sequence[Request], default_output: int, limit: int,
                       what: str) -> None:
    """Refuse the first request whose prompt tokens plus its output length (its own
    ``max_new_tokens``, else ``default_output``) exceed ``limit`` tokens (``what`` names
    the limit), naming the request and both numbers. The one per-request context check:
    run on the built requests before anything loads, and by engines on their own limit."""
    for r in requests:
        out = default_output if r.max_new_tokens is None else int(r.max_new_tokens)
        n_in = len(r.prompt_token_ids)
        if n_in + out > limit:
            rid = r.request_id or f"request {r.index}"
            raise ConfigError(
                f"workload.max_new_tokens={out} is invalid for {rid}: {n_in} prompt tokens + "
                f"{out} output tokens = {n_in + out} tokens exceeds {what}; lower "
                f"workload.max_new_tokens, or cut prompts with workload.max_input_tokens "
                f"and workload.on_too_long=truncate")


def check_request_lengths(spec: Config, requests: Sequence[Request]) -> None:
    """:func:`check_requests_fit` against the job's context limit (:func:`context_limit`);
    silent when the limit cannot be read without loading."""
    limit = context_limit(spec)
    if limit is not None:
        check_requests_fit(requests, spec.workload.max_new_tokens, limit[0], limit[1])
