"""One streamed request: what is sent (:class:`StreamRequest`), the server-sent-event stream
of an OpenAI-compatible ``/v1/completions`` or ``/v1/chat/completions`` endpoint read into
its state (:class:`StreamState`), and the record that state becomes (:func:`stream_record`).

Timing follows vLLM's serving benchmark (``vllm/benchmarks/lib/endpoint_request_func.py``):
``t_first_token`` is the arrival of the first chunk that carries output (text or token ids),
``token_times`` the arrival of every such chunk, ``t_end`` the arrival of the last chunk with
choices (not the trailing usage chunk).

Output and prompt token counts come from the server's ``usage`` (``stream_options:
{"include_usage": true}``), never from re-tokenising text. Output token ids are kept only
when the server sends them (vLLM's ``return_token_ids``, llama.cpp's ``return_tokens``) and
they add up to the usage count. Prompt tokens the server's prefix cache held are kept as
``extra["cached_prompt_tokens"]`` where the usage says (``prompt_tokens_details``).
llama.cpp's own ``/completion`` stream (``content``, ``tokens``, ``stop``, counts in its last
event, ``tokens_cached``) is read into the same state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.measure.timing import clock
from pipeline.records import RequestRecord


@dataclass(frozen=True)
class StreamRequest:
    """One HTTP request to send: where, what, and what to record it as."""

    index: int
    prompt: str
    url: str
    body: dict[str, Any]
    #: the pipeline's own prompt length, used when the server reports no usage
    prompt_tokens: int
    #: ``completions`` (choices[0].text) or ``chat`` (choices[0].delta.content)
    api: str = "completions"


@dataclass
class StreamState:
    """What has arrived so far for one request (read live by a :class:`PointControl`)."""

    due: float = 0.0
    t_start: float | None = None
    t_end: float | None = None
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    ids_complete: bool = True
    times: list[float] = field(default_factory=list)
    t_last: float | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False
    server_error: str | None = None



async def read_stream(resp: Any, st: StreamState, api: str) -> None:
    """Parse the SSE stream into ``st``; a ``data: [DONE]`` line ends it."""
    buf = b""
    async for chunk in resp.content.iter_any():
        now = clock()
        buf += chunk
        # SSE events end with a blank line; "data:" lines are all we need, so splitting
        # on newlines and keeping the incomplete tail is enough.
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, ": ping" comments, "event:" lines
            data = line[5:].strip()
            if data == b"[DONE]":
                st.done = True
                return
            on_event(json.loads(data), st, api, now)


def on_event(ev: dict[str, Any], st: StreamState, api: str, now: float) -> None:
    """Apply one decoded event, arrived at ``now``, to ``st``: an error, the usage, output."""
    if ev.get("error"):
        # vLLM and others report a failure inside an already-started 200 stream.
        err = ev["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        st.server_error = f"server error mid-stream: {msg}"
        return
    if ev.get("usage"):
        st.usage = ev["usage"]
    if "choices" not in ev and "content" in ev:
        ev = _llamacpp_event(ev, st)
    choices = ev.get("choices") or []
    if not choices:
        return
    ch = choices[0]
    delta = ch.get("delta") or {}
    text = (delta.get("content") if api == "chat" else ch.get("text")) or ""
    ids = ch.get("token_ids")
    if ids is None and api == "chat":
        ids = delta.get("token_ids")
    carries_output = bool(text) or bool(ids)
    if carries_output:
        if ids is None:
            # Output without ids (a server without return_token_ids): the ids are unknown.
            st.ids_complete = False
        st.times.append(now)
        st.text.append(text)
        if ids:
            st.ids.extend(int(t) for t in ids)
    st.t_last = now
    if ch.get("finish_reason") is not None:
        st.finish_reason = ch["finish_reason"]


#: llama.cpp's ``stop_type`` -> the OpenAI ``finish_reason``
_STOP_TYPES = {"limit": "length", "eos": "stop", "word": "stop"}


def _llamacpp_event(ev: dict[str, Any], st: StreamState) -> dict[str, Any]:
    """One event of llama.cpp's own ``/completion`` stream as an OpenAI completions chunk;
    its last event's counts become ``st.usage``."""
    choice: dict[str, Any] = {"text": ev.get("content") or "", "token_ids": ev.get("tokens")}
    if ev.get("stop"):
        choice["finish_reason"] = _STOP_TYPES.get(ev.get("stop_type"), "stop")
        if "tokens_predicted" in ev:
            st.usage = {"completion_tokens": ev["tokens_predicted"],
                        "prompt_tokens": ev.get("tokens_evaluated")}
            if ev.get("tokens_cached") is not None:
                st.usage["prompt_tokens_details"] = {"cached_tokens": ev["tokens_cached"]}
    return {"choices": [choice]}


def stream_record(
    req: StreamRequest, st: StreamState, t_start: float, t_now: float, error: str | None
) -> RequestRecord:
    """The record of a request whose stream ended (or failed, ``error``) at ``t_now``."""
    usage = st.usage or {}
    n_out = usage.get("completion_tokens")
    ids: list[int] = []
    if st.ids_complete and st.ids and (n_out is None or n_out == len(st.ids)):
        ids = list(st.ids)
    # the client's own count, to hold the server's usage against (validity of a point):
    # exact from token ids, else one per output chunk
    client_tokens = len(st.ids) if (st.ids_complete and st.ids) else len(st.times)
    extra: dict[str, Any] = {"chunks": len(st.times), "client_tokens": client_tokens,
                             "client_tokens_source": "token_ids" if st.ids_complete and st.ids
                             else "chunks"}
    if n_out is None:
        # No usage from this server: the ids if it sent them, else one token per chunk
        # (exact for servers that stream token by token); flagged so it can be told apart.
        n_out = len(ids) if ids else len(st.times)
        extra["output_tokens_source"] = "token_ids" if ids else "chunks"
    else:
        extra["output_tokens_source"] = "usage"
    if st.finish_reason is not None:
        extra["finish_reason"] = st.finish_reason
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        # prompt tokens the server's prefix cache already held (vLLM with
        # --enable-prompt-tokens-details, OpenAI); absent where the server does not say
        extra["cached_prompt_tokens"] = int(details["cached_tokens"])
    return RequestRecord(
        index=req.index, prompt=req.prompt, text="".join(st.text),
        prompt_tokens=int(usage.get("prompt_tokens") or req.prompt_tokens),
        output_token_ids=ids,
        t_start=t_start,
        t_first_token=st.times[0] if st.times else None,
        # vLLM's benchmark ends a request at its last chunk with choices; a failed request
        # ends when the failure was seen.
        t_end=st.t_last if (error is None and st.t_last is not None) else t_now,
        token_times=list(st.times) or None,
        error=error,
        extra=extra,
        n_output_tokens=None if ids else int(n_out),
    )

