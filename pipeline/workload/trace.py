"""Trace replay (``workload.source=trace``): requests with a trace's lengths, sent at its times.

A trace is one request a line, in Mooncake's format (``timestamp`` in ms from the trace's
start, ``input_length``, ``output_length``, ``hash_ids``: one id per 512-token block of the
prompt, the last block possibly partial) or a plain ``.csv``/``.jsonl`` with the first three
fields only. Mooncake's rule is kept: a request has exactly ``ceil(input_length / 512)``
blocks, and blocks with the same id are the same tokens in every request that has them.

Prompts are raw token ids (no chat template) at the exact length: each hash id maps to a
fixed block of 512 token ids of the shipped corpus (``corpus.txt``, tokenized by the model's
tokenizer, so the text is natural), picked by the run's seed and the id alone, so a prefix
cache sees the sharing the trace had. The corpus is about 1,200 tokens, far fewer than the
distinct blocks of a trace, so a block is runs of tokens, each from its own word start (the
id and the run's place pick it): an 8-token run, then runs of 32. Two ids open with the same
8 tokens once in about as many pairs as the corpus has word starts (about 1,000), less than
one 16-token block of a paged KV cache, and with the same 40 almost never. A line without
``hash_ids`` gets blocks of its own.

The file is read with plain ``json`` and ``csv`` rather than ``datasets``: every refusal
names its line (Arrow infers one type per column, so a float among ints or a string among
numbers fails the whole file, or is silently widened), and nothing is cached on disk.
Everything here up to :func:`trace_requests` runs in validation: no torch, no tokenizer.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.workload.line_files import json_lines, read_lines_file, refusal

if TYPE_CHECKING:
    from pipeline.config import Config, WorkloadConfig
    from pipeline.records import Request
    from pipeline.workload.base import Prompt

#: tokens per hash id (Mooncake's block size)
BLOCK_TOKENS = 512
#: a block is made of runs this long, each cut from the corpus at its own word start; the
#: first is short, so that two blocks opening alike share less than a KV-cache block
FIRST_RUN_TOKENS, RUN_TOKENS = 8, 32
TRACE_SUFFIXES = (".jsonl", ".csv")
FIELDS = ("timestamp", "input_length", "output_length")
#: workload keys a trace replaces: set together with source=trace they are refused
_REPLACED = (("request_rate", None, "the trace's timestamps are the send times"),
             ("output_dist", "fixed", "each request's output length is the trace's"),
             ("max_input_tokens", None, "each request's input length is the trace's"),
             ("prompts_file", None, "the prompts are built from workload.trace_file"))


@dataclass(frozen=True)
class TraceRow:
    """One request of a trace: its line in the file (1-based; a CSV's header is line 1),
    arrival time in ms, lengths in tokens and block ids (None: every block its own)."""

    line: int
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] | None


def _bad(path: str, why: str) -> ConfigError:
    return refusal("trace_file", path, why)


def _int(value: Any, field: str, where: str, path: str, lo: int) -> int:
    """A whole number >= ``lo`` from JSON (an int, never a bool or a float) or CSV text."""
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(path, f"{where}: {field}={value!r} is not an integer")
    if value < lo:
        raise _bad(path, f"{where}: {field}={value} must be >= {lo}")
    return value


def _timestamp(value: Any, where: str, path: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value) or value < 0:
        raise _bad(path, f"{where}: timestamp={value!r} must be a number of ms >= 0")
    return float(value)


def _hash_ids(value: Any, where: str, path: str) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):  # a CSV cell holding a JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list) or any(isinstance(h, bool) or not isinstance(h, int)
                                          for h in value):
        raise _bad(path, f"{where}: hash_ids must be a list of integers")
    return tuple(value)


def _row(obj: Any, line: int, path: str) -> TraceRow:
    where = f"line {line}"
    if not isinstance(obj, dict):
        raise _bad(path, f"{where}: not an object with {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if obj.get(f) in (None, "")]
    if missing:
        raise _bad(path, f"{where}: missing {', '.join(missing)} (each line needs "
                         f"{', '.join(FIELDS)}; hash_ids optional)")
    n_in = _int(obj["input_length"], "input_length", where, path, 1)
    n_out = _int(obj["output_length"], "output_length", where, path, 1)
    ids = _hash_ids(obj.get("hash_ids"), where, path)
    if ids is not None:
        need = -(-n_in // BLOCK_TOKENS)  # Mooncake: ceil(input_length / 512) blocks
        if len(ids) * BLOCK_TOKENS < n_in:
            raise _bad(path, f"{where}: input_length={n_in} is more than its {len(ids)} "
                             f"hash_ids blocks hold ({len(ids)} x {BLOCK_TOKENS} tokens)")
        if len(ids) != need:
            raise _bad(path, f"{where}: {len(ids)} hash_ids for input_length={n_in}, which "
                             f"needs ceil({n_in}/{BLOCK_TOKENS}) = {need} blocks")
    return TraceRow(line, _timestamp(obj["timestamp"], where, path), n_in, n_out, ids)


def _parse(path: str, text: str) -> tuple[TraceRow, ...]:
    rows: list[TraceRow] = []
    if path.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        absent = [f for f in FIELDS if f not in (reader.fieldnames or [])]
        if absent:
            raise _bad(path, f"line 1: the header lacks {', '.join(absent)}")
        for obj in reader:
            rows.append(_row(obj, reader.line_num, path))
    else:
        for line, obj in json_lines("trace_file", path, text):
            rows.append(_row(obj, line, path))
    if not rows:
        raise _bad(path, "holds no request")
    for prev, row in zip(rows, rows[1:], strict=False):
        if row.timestamp_ms < prev.timestamp_ms:
            raise _bad(path, f"line {row.line}: timestamp {row.timestamp_ms:g} is before "
                             f"line {prev.line}'s {prev.timestamp_ms:g}; a trace must be "
                             f"sorted by timestamp")
    return tuple(rows)


def read_trace(path: str, max_bytes: int) -> tuple[TraceRow, ...]:
    """Every request of the trace file, checked line by line (fields, integer lengths,
    Mooncake's block count, sorted timestamps); refusals name the line."""
    return read_lines_file("trace_file", path, TRACE_SUFFIXES,
                           ".jsonl (Mooncake's format) or .csv", max_bytes, _parse)


def select(rows: tuple[TraceRow, ...], window: list[float] | None,
           num_prompts: int | None) -> list[TraceRow]:
    """The requests replayed: those whose timestamp falls in ``window`` ``[start, end)``
    (ms; None: all), then the first ``num_prompts`` of them (None: all)."""
    chosen = [r for r in rows if window is None or window[0] <= r.timestamp_ms < window[1]]
    return chosen if num_prompts is None else chosen[:num_prompts]


def send_offsets(rows: list[TraceRow], speedup: float) -> list[float]:
    """Send times in seconds: each timestamp less the first replayed one, over ``speedup``."""
    t0 = rows[0].timestamp_ms if rows else 0.0
    return [(r.timestamp_ms - t0) / 1000.0 / speedup for r in rows]


def selected_rows(w: WorkloadConfig) -> list[TraceRow]:
    """The workload's replayed requests (:func:`select` over :func:`read_trace`)."""
    assert w.trace_file is not None, "validate_trace requires workload.trace_file"
    rows = read_trace(w.trace_file, w.max_file_bytes)
    chosen = select(rows, w.trace_window, w.num_prompts)
    if not chosen:
        raise ConfigError(
            f"workload.trace_window={w.trace_window!r} is invalid: no request of "
            f"{w.trace_file} has a timestamp in it (its timestamps run from "
            f"{rows[0].timestamp_ms:g} to {rows[-1].timestamp_ms:g} ms)")
    return chosen


def validate_trace(w: WorkloadConfig) -> None:
    """The trace keys and the file itself, before anything loads (exit 2 on a refusal)."""
    if w.profile != "trace":
        raise ConfigError(
            f"workload.profile={w.profile!r} is invalid with workload.source=trace: a trace "
            f"is replayed as one open-loop point at its own times (profile=trace; "
            f"workload=trace sets it); sweeps, ramps and SLO searches vary a rate the "
            f"trace does not have")
    for key, unset, why in _REPLACED:
        if getattr(w, key) != unset:
            raise ConfigError(f"workload.{key}={getattr(w, key)!r} is invalid with "
                              f"workload.source=trace: {why}; leave it at {unset}")
    if w.repeats != 1:
        raise ConfigError(f"workload.repeats={w.repeats} is invalid with "
                          f"workload.source=trace: a trace is replayed once; use 1")
    if w.trace_file is None:
        raise ConfigError("workload.trace_file=None is invalid: source=trace needs a trace "
                          "file (.jsonl or .csv)")
    s = w.trace_speedup
    if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
        raise ConfigError(f"workload.trace_speedup={s!r} is invalid: must be a number > 0")
    win = w.trace_window
    if win is not None and (len(win) != 2 or not all(math.isfinite(x) for x in win)
                            or win[0] < 0 or win[0] >= win[1]):
        raise ConfigError(f"workload.trace_window={list(win)!r} is invalid: must be "
                          f"[start_ms, end_ms] with 0 <= start_ms < end_ms, or null")
    selected_rows(w)


def check_trace_job(spec: Config, online: bool) -> None:
    """What a trace needs of the backend and model: an online backend (a trace is a
    serving workload), prompts sent as token ids, and no chat template."""
    b = spec.backend
    if not online:
        raise ConfigError(
            f"workload.source='trace' is invalid for backend {b.name}: it is offline (it "
            f"generates in batches, with no send times); a trace is a serving workload: "
            f"use an online backend (vllm_server, llamacpp, openai)")
    if getattr(b, "api", None) == "chat":
        raise ConfigError(
            "backend.api='chat' is invalid with workload.source=trace: a trace's prompts "
            "are raw token ids at the trace's lengths, and the chat API sends messages the "
            "server wraps in its template; use the completions API")
    fmt = getattr(b, "prompt_format", None)
    if fmt == "text" or (fmt == "auto" and not getattr(b, "vllm_extensions", False)):
        raise ConfigError(
            f"backend.prompt_format={fmt!r} is invalid with workload.source=trace: text "
            f"would be re-tokenized by the server, changing lengths and shared blocks; use "
            f"backend.prompt_format=token_ids (a server that takes token-id prompts)")
    if spec.model.use_chat_template == "true":
        raise ConfigError(
            "model.use_chat_template='true' is invalid with workload.source=trace: the "
            "trace's prompts are raw token ids at its exact lengths; use auto or false")


def check_trace_context(w: WorkloadConfig, limit: int, what: str) -> None:
    """Refuse the first replayed request whose input + output exceeds ``limit`` tokens."""
    for r in selected_rows(w):
        if r.input_length + r.output_length > limit:
            raise _bad(str(w.trace_file), (
                f"line {r.line}: input_length={r.input_length} + output_length="
                f"{r.output_length} = {r.input_length + r.output_length} tokens exceeds "
                f"{what}; leave the line out (workload.trace_window, workload.num_prompts) "
                f"or use a longer context"))


@dataclass(frozen=True)
class ReplayPlan:
    """When each replayed request is sent (seconds from the start) and what its record's
    ``extra`` gets: ``trace_line``, ``hash_ids`` (its number of blocks) and
    ``shared_blocks`` (how many of them an earlier replayed request already had)."""

    send_at: list[float]
    extra: list[dict[str, int]]


def replay_plan(w: WorkloadConfig) -> ReplayPlan:
    """The schedule and per-request facts of the workload's trace, in request order."""
    rows = selected_rows(w)
    seen: set[int] = set()
    extra = []
    for r in rows:
        ids = r.hash_ids or ()
        extra.append({"trace_line": r.line, "hash_ids": len(ids),
                      "shared_blocks": sum(h in seen for h in ids)})
        seen.update(ids)
    return ReplayPlan(send_offsets(rows, w.trace_speedup), extra)


def trace_prompts(w: WorkloadConfig) -> list[Prompt]:
    """Placeholders for the replayed lines (``line N``), so that the request count is known
    before any model loads; :func:`trace_requests` builds the prompts."""
    from pipeline.workload.base import Prompt

    return [Prompt(f"<trace line {r.line}>", request_id=f"line {r.line}")
            for r in selected_rows(w)]


def _start(key: str, seed: int, n: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def trace_requests(w: WorkloadConfig, tokenizer: Any, seed: int) -> list[Request]:
    """One request per replayed line: its blocks' token ids in order, cut to
    ``input_length``, and ``max_new_tokens`` = ``output_length``. A block is runs of
    consecutive token ids of the tokenized corpus (8, then 32 each), each from a word start
    chosen by ``seed``, the hash id and the run's place alone, so one id is one block
    everywhere; lines without ``hash_ids`` get blocks keyed by their line."""
    from pipeline.records import Request
    from pipeline.workload.synthetic import Corpus

    corpus = Corpus(tokenizer)
    stream, starts = corpus.ids, corpus.word_starts
    blocks: dict[str, list[int]] = {}

    def block(key: str) -> list[int]:
        if key not in blocks:
            out: list[int] = []
            while len(out) < BLOCK_TOKENS:
                s = starts[_start(f"{key} run {len(out)}", seed, len(starts))]
                n = RUN_TOKENS if out else FIRST_RUN_TOKENS
                out += [stream[(s + k) % len(stream)] for k in range(n)]
            blocks[key] = out[:BLOCK_TOKENS]
        return blocks[key]

    out = []
    for i, r in enumerate(selected_rows(w)):
        n = -(-r.input_length // BLOCK_TOKENS)
        keys = ([f"id {h}" for h in r.hash_ids] if r.hash_ids is not None
                else [f"line {r.line} block {k}" for k in range(n)])
        ids = [t for key in keys for t in block(key)][:r.input_length]
        if len(ids) != r.input_length:  # guards the block rule read_trace enforces
            raise RuntimeError(f"trace line {r.line}: built {len(ids)} tokens, expected "
                               f"{r.input_length}")
        out.append(Request(index=i, prompt=tokenizer.decode(ids), prompt_token_ids=tuple(ids),
                           max_new_tokens=r.output_length, request_id=f"line {r.line}"))
    return out
