"""A stub OpenAI-compatible streaming server of known capacity, shared by the load-profile
tests. It stands in for a server whose capacity is known analytically, which no real engine
can give.

The stub (this file run as a script, in its own process on 127.0.0.1, so the client's CPU
reading is the client's) is a continuous-batching engine: every step emits one token to
each active request and lasts ``a + b * n`` seconds with ``n`` requests active; a new
request joins at the next step. With requests of T tokens arriving at a steady rate λ,
Little's law gives n = λ T s and s = a + b n, so

    TPOT(λ) = s = a / (1 - λ T b),   capacity λ_max = 1 / (T b),
    a mean-TPOT SLO L holds up to λ* = (1 - a / L) / (T b).

Every request gets exactly ``max_tokens`` tokens (the stub has no end-of-sequence: what
``ignore_eos`` with ``min_tokens`` make a real engine do), and its ``usage`` counts a
token-id prompt (a list) as its length (a text prompt as 3 tokens). What each request
carried (``prompt``, ``max_tokens``, ``min_tokens``, ``ignore_eos``) and when it arrived
(``time.perf_counter()``: CLOCK_MONOTONIC, the clock of every process of the machine, so
comparable with the client's ``t_scheduled``) is kept, in arrival order, for
:func:`received`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def slo_rate(a_s: float, b_s: float, tokens: int, slo_tpot_s: float) -> float:
    """λ*: the highest steady arrival rate (req/s) whose TPOT stays within the SLO."""
    return (1 - a_s / slo_tpot_s) / (tokens * b_s)


def capacity(b_s: float, tokens: int) -> float:
    """λ_max: the rate (req/s) past which the stub's queue grows without bound."""
    return 1 / (tokens * b_s)


@contextlib.contextmanager
def stub_server(a_s: float, b_s: float) -> Iterator[str]:
    """Start the stub in its own process on 127.0.0.1; yield its ``/v1`` base URL; kill
    it (and wait for it) at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.stub_engine", str(a_s), str(b_s)],
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.kill()
        proc.wait(10)


def received(base_url: str) -> list[dict[str, Any]]:
    """What the stub at ``base_url`` (its ``/v1`` URL) received so far, in arrival order:
    ``prompt``, ``max_tokens``, ``min_tokens``, ``ignore_eos`` and ``arrival`` (seconds on
    ``time.perf_counter()``) of each completion request."""
    # no proxy from the environment: the stub is on loopback
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{base_url.removesuffix('/v1')}/received", timeout=10) as resp:
        return json.loads(resp.read())


def serve(a: float, b: float) -> None:
    """Run the stub engine (see the module docstring) until killed; prints its port."""
    import logging

    from aiohttp import web

    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # aborted streams are expected

    active: list[list[Any]] = []  # [queue, tokens left]
    pending: list[list[Any]] = []
    seen: list[dict[str, Any]] = []  # every completion request, in arrival order
    wake = asyncio.Event()

    async def engine() -> None:
        loop = asyncio.get_running_loop()
        t = loop.time()
        while True:
            if not active and not pending:
                wake.clear()
                await wake.wait()
                t = loop.time()
            active.extend(pending)  # new requests join at the next step (continuous batching)
            pending.clear()
            # steps end on a deadline, not after a sleep of the step's length: the stub's
            # own work (writing the chunks of the previous step) and timer slack fall inside
            # the step instead of adding to it, so the model a + b n holds under load
            t += a + b * len(active)
            delay = t - loop.time()
            await asyncio.sleep(max(0.0, delay))
            if delay < 0:
                t = loop.time()  # fell behind: carry no debt into the next step
            for item in list(active):
                item[1] -= 1
                item[0].put_nowait(item[1] == 0)
                if item[1] == 0:
                    active.remove(item)

    async def completions(request: web.Request) -> web.StreamResponse:
        arrival = time.perf_counter()  # the headers are in; the body is read next
        body = await request.json()
        n = int(body.get("max_tokens", 8))
        prompt = body.get("prompt")
        seen.append({"prompt": prompt, "max_tokens": body.get("max_tokens"),
                     "min_tokens": body.get("min_tokens"),
                     "ignore_eos": body.get("ignore_eos"), "arrival": arrival})
        q: asyncio.Queue = asyncio.Queue()
        item = [q, n]
        pending.append(item)
        wake.set()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await resp.prepare(request)
            for i in range(n):
                last = await q.get()
                ch = {"index": 0, "text": f"t{i} ", "token_ids": [100 + i],
                      "finish_reason": "length" if last else None}
                await resp.write(f"data: {json.dumps({'choices': [ch]})}\n\n".encode())
        except (ConnectionError, asyncio.CancelledError):
            # the client aborted: a real engine frees the sequence, so does the stub
            for lst in (active, pending):
                if item in lst:
                    lst.remove(item)
            raise
        usage = {"prompt_tokens": len(prompt) if isinstance(prompt, list) else 3,
                 "completion_tokens": n}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "stub"}]})

    async def received_(request: web.Request) -> web.Response:
        return web.json_response(seen)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=(f"vllm:num_requests_running {len(active)}\n"
                                  f"vllm:num_requests_waiting {len(pending)}\n"
                                  "vllm:num_preemptions_total 0\n"))

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/received", received_)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
        asyncio.get_running_loop().create_task(engine())
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    serve(float(sys.argv[1]), float(sys.argv[2]))
