"""The streaming load generator shared by the online backends (``openai``, ``vllm_server``).

It sends request i at ``send_at[i]`` seconds after the start (asyncio + aiohttp), keeps at
most ``concurrency`` requests in flight, bounds each by a timeout, and reads the
server-sent-event stream of an OpenAI-compatible ``/v1/completions`` or
``/v1/chat/completions`` endpoint. Timing follows vLLM's serving benchmark
(``vllm/benchmarks/lib/endpoint_request_func.py``) so that the two clients agree:

- ``t_start``: just before the request is sent (after waiting for a concurrency slot);
- ``t_first_token``: arrival of the first chunk that carries output (text or token ids);
- ``token_times``: arrival of every chunk that carries output (one per token when the
  server streams token by token, as vLLM does by default);
- ``t_end``: arrival of the last chunk with choices (not the trailing usage chunk).

Every record also carries its scheduled send time ``extra["t_scheduled"]`` (the start of
the run plus ``send_at[i]``) and ``extra["dispatch_lag_s"]``: how late the event loop woke
up for it (a concurrency-slot wait is not lag; it is ``extra["client_queue_s"]``). A load
point (:mod:`pipeline.serving`) can watch the run live and end it early
(:class:`PointControl`, :func:`point_control`).

How one stream is read, and the token counts a record carries, is
:mod:`pipeline.serving.stream`. Every failure (HTTP status, timeout, refused connection, a
stream cut short because the server died) becomes a record with ``error`` set: this module
never raises for a request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.measure.timing import clock
from pipeline.records import RequestRecord
from pipeline.serving.stream import StreamRequest, StreamState, read_stream, stream_record

T = TypeVar("T")

#: characters of a failing response body kept in the error message
ERROR_BODY_CHARS = 300


@dataclass(frozen=True)
class LiveRequest:
    """One request as a stop rule sees it mid-run; seconds since the run's start, None
    for what has not happened yet."""

    due: float
    t_start: float | None
    t_first_token: float | None
    t_end: float | None


#: a stop rule: the live requests and the seconds since the start -> a reason to stop, or None
StopRule = Callable[[list[LiveRequest], float], "str | None"]


@dataclass
class PointControl:
    """Live control of one load point. Every ``check_every_s`` the client asks
    ``stop_rule`` (and checks ``deadline_s``); on a reason it stops dispatching (requests
    not yet sent get no record at all: they were never part of the load), gives the ones
    in flight ``grace_s`` to finish, then aborts the rest (records with ``error`` starting
    ``aborted:`` and ``extra["aborted"]``). The client fills the fields after ``grace_s``."""

    stop_rule: StopRule | None = None
    deadline_s: float | None = None
    grace_s: float = 10.0
    check_every_s: float = 0.25
    stop_reason: str | None = None
    stopped_at_s: float | None = None
    not_sent: int = 0
    aborted: int = 0


_CONTROL: contextvars.ContextVar[PointControl | None] = contextvars.ContextVar(
    "point_control", default=None)


@contextlib.contextmanager
def point_control(ctrl: PointControl) -> Iterator[PointControl]:
    """Make ``ctrl`` govern every :func:`run_requests` inside the block. A context
    variable rather than a parameter: it reaches the client through any backend's
    ``serve()`` without every backend's signature carrying it."""
    token = _CONTROL.set(ctrl)
    try:
        yield ctrl
    finally:
        _CONTROL.reset(token)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, also when the caller already
    runs an event loop (then in a worker thread with its own loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_requests(
    requests: Sequence[StreamRequest], send_at: Sequence[float], concurrency: int | None,
    timeout_s: float, headers: Mapping[str, str] | None = None,
) -> list[RequestRecord]:
    """Send every request on its schedule and return one record per request, in order.

    ``concurrency=None`` leaves the number in flight unbounded (the arrival schedule alone
    paces the load). ``timeout_s`` bounds each request from its send to its last byte.
    Under a :func:`point_control` that stopped the run, requests never sent are left out.
    """
    if len(send_at) != len(requests):
        raise ValueError(f"{len(requests)} requests but {len(send_at)} send times")
    # read here, in the caller's context: run_sync may move the loop to another thread
    ctrl = _CONTROL.get()
    return run_sync(_run_all(list(requests), list(send_at), concurrency, timeout_s,
                             dict(headers or {}), ctrl))


async def _run_all(
    requests: list[StreamRequest], send_at: list[float], concurrency: int | None,
    timeout_s: float, headers: dict[str, str], ctrl: PointControl | None = None,
) -> list[RequestRecord]:
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    async with client_session() as session:
        t0 = clock()
        streams = [StreamState(due=t0 + at) for at in send_at]
        tasks = [
            asyncio.create_task(_scheduled(session, r, st, sem, timeout_s, headers))
            for r, st in zip(requests, streams, strict=True)
        ]
        monitor = (asyncio.create_task(_monitor(ctrl, tasks, streams, t0))
                   if ctrl is not None else None)
        # return_exceptions: a task cancelled before it first ran raises CancelledError
        done = await asyncio.gather(*tasks, return_exceptions=True)
        if monitor is not None:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
        out: list[RequestRecord] = []
        for d in done:
            if isinstance(d, RequestRecord):
                out.append(d)
            elif isinstance(d, BaseException) and not isinstance(d, asyncio.CancelledError):
                raise d
        if ctrl is not None:
            ctrl.not_sent = len(requests) - len(out)
            ctrl.aborted = sum(bool(r.extra.get("aborted")) for r in out)
        return out


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[Any]:
    """The HTTP session every request of a run is sent on (with :func:`send`)."""
    import aiohttp

    # trust_env=False: a proxy from the environment must never see loopback traffic.
    # limit=0 lifts aiohttp's default cap of 100 connections; callers cap concurrency.
    connector = aiohttp.TCPConnector(limit=0, force_close=False, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        yield session


def _live(streams: list[StreamState], t0: float) -> list[LiveRequest]:
    def rel(t: float | None) -> float | None:
        return None if t is None else t - t0

    return [LiveRequest(s.due - t0, rel(s.t_start), rel(s.times[0] if s.times else None),
                        rel(s.t_end)) for s in streams]


async def _monitor(ctrl: PointControl, tasks: list[asyncio.Task], streams: list[StreamState],
                   t0: float) -> None:
    """Check the point's stop rule while it runs; on a reason, stop it (see PointControl)."""
    while True:
        await asyncio.sleep(ctrl.check_every_s)
        if all(t.done() for t in tasks):
            return
        elapsed = clock() - t0
        reason = None
        if ctrl.deadline_s is not None and elapsed >= ctrl.deadline_s:
            reason = f"duration: point_duration_s={ctrl.deadline_s:g} reached"
        elif ctrl.stop_rule is not None:
            reason = ctrl.stop_rule(_live(streams, t0), elapsed)
        if reason is None:
            continue
        ctrl.stop_reason, ctrl.stopped_at_s = reason, elapsed
        for t, st in zip(tasks, streams, strict=True):
            if st.t_start is None:
                t.cancel()  # not sent yet: it never becomes part of the load
        pending = [t for t in tasks if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=ctrl.grace_s)
            for t in still:
                t.cancel()
        return


async def _scheduled(
    session: Any, req: StreamRequest, st: StreamState, sem: asyncio.Semaphore | None,
    timeout_s: float, headers: dict[str, str],
) -> RequestRecord | None:
    t_ready: float | None = None
    try:
        delay = st.due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        t_ready = clock()
        if sem is None:
            rec = await send(session, req, timeout_s, headers, st)
        else:
            async with sem:
                rec = await send(session, req, timeout_s, headers, st)
    except asyncio.CancelledError:
        if st.t_start is None:
            return None  # stopped before it was sent
        rec = stream_record(req, st, st.t_start, clock(),
                      "aborted: the load point ended early and this request was still "
                      "in flight after the grace period")
        rec.extra["aborted"] = True
    assert t_ready is not None  # a request that was sent woke up first
    # Time spent waiting for a concurrency slot: client-side queueing, not server latency.
    rec.extra["client_queue_s"] = rec.t_start - t_ready
    # MLPerf's reference point, and how late the loop was for it (asyncio timer slack,
    # a busy client): the two timing conventions differ by lag + queueing.
    rec.extra["t_scheduled"] = st.due
    rec.extra["dispatch_lag_s"] = max(0.0, t_ready - st.due)
    return rec


async def send(
    session: Any, req: StreamRequest, timeout_s: float, headers: dict[str, str],
    st: StreamState | None = None,
) -> RequestRecord:
    """Send ``req`` now on ``session`` and read its stream into a record; every failure
    is a record with ``error`` set (this never raises for the request)."""
    import aiohttp

    st = st if st is not None else StreamState()
    t_start = clock()
    st.t_start = t_start
    error: str | None = None
    try:
        # asyncio.timeout covers the whole exchange, including a server that accepts the
        # connection and then stalls; aiohttp's own timeout is a second, looser guard.
        async with asyncio.timeout(timeout_s):
            async with session.post(
                req.url, json=req.body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s + 5.0),
            ) as resp:
                if resp.status != 200:
                    body = (await resp.text())[:ERROR_BODY_CHARS]
                    error = f"HTTP {resp.status} {resp.reason}: {body}".strip()
                else:
                    await read_stream(resp, st, req.api)
    except TimeoutError:
        error = f"timeout: no complete response within request_timeout_s={timeout_s:g}"
    except aiohttp.ClientConnectorError as e:
        error = f"cannot connect to {req.url}: {e.os_error or e}"
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as e:
        error = f"connection lost mid-response (server died?): {type(e).__name__}: {e}"
    except aiohttp.ClientError as e:
        error = f"HTTP client error: {type(e).__name__}: {e}"
    except (json.JSONDecodeError, ValueError) as e:
        error = f"unreadable stream from {req.url}: {e}"
    t_now = clock()
    if error is None:
        error = st.server_error
    if error is None and not st.times:
        error = "the stream carried no output token"
    if error is None and st.finish_reason is None and not st.done:
        error = "the stream ended without a finish_reason (server died mid-response?)"
    st.t_end = t_now
    return stream_record(req, st, t_start, t_now, error)


