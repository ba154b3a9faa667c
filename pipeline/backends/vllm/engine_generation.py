"""Generation on a started offline engine: each request's output length
(:func:`output_lengths`), greedy and sampled requests through the engine's step loop with
a time for every token (:func:`generate_steps`), and beam search (:func:`beam_search`).
vLLM is imported only inside the functions that hand it work.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.records import Request, RequestRecord

_REQUEST_IDS = itertools.count()

#: called with the exception that interrupted generation, before it propagates (the
#: backend drops a dead engine from its cache there)
OnError = Callable[[BaseException], None]


def output_lengths(requests: list[Request], max_new_tokens: int) -> list[int]:
    """Each request's output length: its own ``max_new_tokens`` when it has one, else the
    batch's."""
    out = []
    for r in requests:
        n = getattr(r, "max_new_tokens", None)
        out.append(max_new_tokens if n is None else int(n))
    return out


@dataclass
class _Progress:
    ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    t_end: float | None = None


def generate_steps(llm: Any, tokenizer: Any, requests: list[Request], params: list[Any],
                   on_error: OnError) -> list[RequestRecord]:
    """Greedy/sampling through the engine's step loop, so that each token's time can be
    read as it is produced (``LLM.generate`` only returns finished requests)."""
    engine = llm.llm_engine
    offset = time.perf_counter() - time.monotonic()
    by_id: dict[str, Request] = {}
    progress: dict[str, _Progress] = {}
    t_start = time.perf_counter()
    try:
        for r, p in zip(requests, params, strict=True):
            rid = f"infersweep-{next(_REQUEST_IDS)}"
            engine.add_request(rid, _token_input(r.prompt_token_ids), p)
            by_id[rid] = r
            progress[rid] = _Progress()
        pending = set(by_id)
        while pending and engine.has_unfinished_requests():
            for out in engine.step():
                p = progress.get(out.request_id)
                if p is None:
                    continue
                now = time.perf_counter()
                ids = list(out.outputs[0].token_ids)
                stats = out.metrics
                # The engine stamps every step's outputs; last_token_ts is this step's.
                ts = stats.last_token_ts + offset if getattr(
                    stats, "last_token_ts", 0.0) else now
                p.times.extend([ts] * (len(ids) - len(p.ids)))
                p.ids = ids
                if out.finished:
                    p.t_end = now
                    pending.discard(out.request_id)
    except BaseException as e:
        # Leave the shared engine empty (or, if it died, gone) for the next job.
        try:
            engine.abort_request(list(by_id))
        except Exception:
            pass
        on_error(e)
        raise
    records = []
    for rid, r in by_id.items():
        p = progress[rid]
        if p.t_end is None:  # the engine went idle without finishing it
            records.append(RequestRecord(
                index=r.index, prompt=r.prompt, text="",
                prompt_tokens=len(r.prompt_token_ids), output_token_ids=[],
                t_start=t_start, t_first_token=None, t_end=time.perf_counter(),
                error="backend vllm: the engine returned no final output",
            ))
            continue
        records.append(RequestRecord(
            index=r.index, prompt=r.prompt,
            text=tokenizer.decode(p.ids, skip_special_tokens=True),
            prompt_tokens=len(r.prompt_token_ids), output_token_ids=p.ids,
            t_start=t_start, t_first_token=p.times[0] if p.times else None,
            t_end=p.t_end, token_times=p.times or None,
        ))
    return records


def beam_search(llm: Any, tokenizer: Any, requests: list[Request], lengths: list[int],
                params: dict[int, Any], on_error: OnError) -> list[RequestRecord]:
    """``LLM.beam_search``, one call per output length (its parameters are per call);
    its sequences hold prompt + generation, the prompt is cut."""
    from vllm import TokensPrompt

    step_times: list[float] = []
    step = getattr(llm, "_beam_search_step", None)
    if step is not None:
        # beam_search has no per-step hook; timing each of its steps (one token for
        # every live beam) gives token times like the hf backend's step clock.
        def timed_step(*args: Any, **kwargs: Any) -> Any:
            stop = step(*args, **kwargs)
            if not stop:
                step_times.append(time.perf_counter())
            return stop

        llm._beam_search_step = timed_step
    records: dict[int, RequestRecord] = {}
    t_start = time.perf_counter()
    try:
        for n, p in params.items():
            group = [i for i, m in enumerate(lengths) if m == n]
            step_times.clear()
            outs = llm.beam_search([TokensPrompt(prompt_token_ids=list(
                requests[i].prompt_token_ids)) for i in group], p)
            t_end = time.perf_counter()
            for i, out in zip(group, outs, strict=True):
                records[i] = _beam_record(tokenizer, requests[i], out, t_start, t_end,
                                          list(step_times))
    except BaseException as e:
        on_error(e)
        raise
    finally:
        if step is not None:
            del llm._beam_search_step
    return [records[i] for i in range(len(requests))]


def _beam_record(tokenizer: Any, r: Request, out: Any, t_start: float, t_end: float,
                 step_times: list[float]) -> RequestRecord:
    best = out.sequences[0]
    prompt = list(r.prompt_token_ids)
    tokens = list(best.tokens)
    if tokens[: len(prompt)] != prompt:
        raise RuntimeError(
            "backend vllm: beam search output does not start with the prompt tokens")
    ids = tokens[len(prompt):]
    times = step_times[: len(ids)] if step_times else None
    return RequestRecord(
        index=r.index, prompt=r.prompt,
        text=tokenizer.decode(ids, skip_special_tokens=True),
        prompt_tokens=len(prompt), output_token_ids=ids, t_start=t_start,
        t_first_token=times[0] if times else None, t_end=t_end, token_times=times,
    )


def _token_input(ids: tuple[int, ...]) -> Any:
    """An engine input of token ids, so that vLLM sees exactly the pipeline's tokens."""
    try:
        from vllm.inputs import tokens_input
    except ImportError:  # older vLLM: the raw prompt form
        from vllm import TokensPrompt

        return TokensPrompt(prompt_token_ids=list(ids))
    return tokens_input(list(ids))
