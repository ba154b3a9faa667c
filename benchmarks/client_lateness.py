"""Does the load generator keep its schedule? Our client against vLLM's, on one schedule.

Both clients are driven by the same send schedule (Poisson arrivals at a given rate, one
seed per round) against a loopback stub that streams a fixed number of tokens at once and
records when each request *arrives* (``time.perf_counter``: CLOCK_MONOTONIC on Linux, one
clock for every process of the machine). Lateness = arrival at the stub - scheduled send
time; it is measured at the stub for both clients, since vLLM's client reports no dispatch
lag of its own. Our client is the pipeline's (``pipeline.serving.client.run_requests``,
what every online backend uses); vLLM's is its benchmark's own request generator
(``vllm.benchmarks.serve.get_request`` with the schedule as its trace timestamps) and
request function (``async_request_openai_completions``) under its semaphore and connector
settings, as ``vllm bench serve`` runs them. Rounds alternate which client goes first, after
one discarded warm-up run of each client at the first rate.

    .venv/bin/python benchmarks/client_lateness.py             # 100-1600 req/s, then a burst
    .venv/bin/python benchmarks/client_lateness.py --concurrency 0 --rates 100,200,400,800
    .venv/bin/python benchmarks/client_lateness.py --rates 200 --requests 400 --rounds 3

Prints, per rate and client, the achieved send rate and the lateness p50/p99/max (median of
the rounds, with their spread), the tail of the TTFT each client recorded and the client's
CPU time per request (this process's, the stub being another: what a busy machine must
find for each request). Under a
concurrency cap a request due while every slot is busy waits for one, and that wait counts
as lateness (for both clients alike); ``--concurrency 0`` at rates the stub keeps up with
leaves only the generator's own stalls. The stub
runs in its own process, so its event loop and the client's do not share a core's time
more than the machine forces; on a 2-core machine both still compete, so figures are for
side-by-side comparison within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------ the stub (own process)

def serve_stub(tokens: int) -> None:
    """A loopback OpenAI-compatible stub: ``POST /v1/completions`` streams ``tokens``
    chunks at once; the arrival of each request (its prompt names its index) is recorded
    and read back (and cleared) with ``GET /arrivals``. Prints its port."""
    import logging

    from aiohttp import web

    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
    arrivals: dict[int, float] = {}

    async def completions(request: web.Request) -> web.StreamResponse:
        t = time.perf_counter()  # before reading the body: the request is here
        body = await request.json()
        p = body.get("prompt")
        index = int(p[0]) if isinstance(p, list) else int(str(p).removeprefix("r"))
        arrivals[index] = t
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = int(body.get("max_tokens") or tokens)
        for i in range(n):
            ch = {"index": 0, "text": f"t{i} ", "token_ids": [100 + i],
                  "finish_reason": "length" if i == n - 1 else None}
            await resp.write(f"data: {json.dumps({'choices': [ch]})}\n\n".encode())
        usage = {"prompt_tokens": 1, "completion_tokens": n}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def read_arrivals(request: web.Request) -> web.Response:
        out = {str(k): v for k, v in arrivals.items()}
        arrivals.clear()
        return web.json_response(out)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "stub"}]})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/arrivals", read_arrivals)
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


def fetch_arrivals(base: str) -> dict[int, float]:
    """The stub's arrival times since the last read (and clear them there)."""
    with urllib.request.urlopen(f"{base}/arrivals", timeout=30) as r:
        return {int(k): float(v) for k, v in json.loads(r.read()).items()}


# ------------------------------------------------------------------ the two clients

def run_ours(base: str, offsets: list[float], tokens: int, concurrency: int | None
             ) -> tuple[dict[int, float], list[float]]:
    """Our client on the schedule: (scheduled send time per request, TTFTs in s)."""
    from pipeline.serving.client import run_requests
    from pipeline.serving.stream import StreamRequest

    reqs = [StreamRequest(index=i, prompt=f"r{i}", url=f"{base}/v1/completions",
                          body={"model": "stub", "prompt": [i], "max_tokens": tokens,
                                "stream": True, "stream_options": {"include_usage": True}},
                          prompt_tokens=1)
            for i in range(len(offsets))]
    recs = run_requests(reqs, offsets, concurrency, 120.0)
    due = {r.index: float(r.extra["t_scheduled"]) for r in recs}
    ttft = [r.t_first_token - r.t_start for r in recs
            if r.ok and r.t_first_token is not None]
    return due, ttft


def run_vllm(base: str, offsets: list[float], tokens: int, concurrency: int | None
             ) -> tuple[dict[int, float], list[float]]:
    """vLLM's benchmark client on the same schedule (its generator, request function,
    semaphore and connector as ``vllm bench serve`` sets them)."""
    import aiohttp
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_completions,
    )
    from vllm.benchmarks.serve import get_request

    samples = [SampleRequest(prompt=f"r{i}", prompt_len=1, expected_output_len=tokens,
                             timestamp=at) for i, at in enumerate(offsets)]

    async def go() -> tuple[float, list[Any]]:
        connector = aiohttp.TCPConnector(
            limit=concurrency or 0, limit_per_host=concurrency or 0, ttl_dns_cache=300,
            use_dns_cache=True, keepalive_timeout=60, enable_cleanup_closed=True,
            force_close=False)
        sem = asyncio.Semaphore(concurrency) if concurrency else None
        async with aiohttp.ClientSession(connector=connector, trust_env=True,
                                         timeout=aiohttp.ClientTimeout(total=600)) as s:
            async def one(inp: RequestFuncInput) -> Any:
                if sem is None:
                    return await async_request_openai_completions(inp, s)
                async with sem:
                    return await async_request_openai_completions(inp, s)

            tasks = []
            t0 = time.perf_counter()  # get_request's own start is a few microseconds later
            async for req, _ in get_request(samples, float("inf"), self_timed=True):
                inp = RequestFuncInput(prompt=req.prompt, api_url=f"{base}/v1/completions",
                                       prompt_len=1, output_len=tokens, model="stub",
                                       ignore_eos=True)
                tasks.append(asyncio.create_task(one(inp)))
            return t0, await asyncio.gather(*tasks)

    t0, outs = asyncio.run(go())
    due = {i: t0 + at for i, at in enumerate(offsets)}
    return due, [o.ttft for o in outs if o.success]


CLIENTS = {"ours": run_ours, "vllm": run_vllm}


# ------------------------------------------------------------------ measurement

def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def lateness_figures(due: dict[int, float], arrived: dict[int, float],
                     ttft: list[float]) -> dict[str, float]:
    """Lateness (arrival - schedule, ms) percentiles, the achieved send rate, the TTFT
    tail and how many scheduled requests never arrived."""
    late = [(arrived[i] - due[i]) * 1000 for i in due if i in arrived]
    span = max(arrived.values()) - min(arrived.values()) if len(arrived) > 1 else 0.0
    return {"late_p50_ms": _pct(late, 50), "late_p99_ms": _pct(late, 99),
            "late_max_ms": max(late) if late else float("nan"),
            "sent_per_s": (len(arrived) - 1) / span if span > 0 else float("nan"),
            "ttft_p99_ms": _pct(ttft, 99) * 1000, "missing": float(len(due) - len(late))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Start the stub, run both clients at each rate in alternating rounds, print a table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="100,400,1600,inf",
                    help="offered rates, req/s (inf: all at once)")
    ap.add_argument("--requests", type=int, default=800, help="requests per run")
    ap.add_argument("--tokens", type=int, default=16, help="tokens the stub streams")
    ap.add_argument("--concurrency", type=int, default=64,
                    help="most requests in flight (0: unbounded)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup-requests", type=int, default=200,
                    help="requests of each client's discarded warm-up run at the first rate")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve is not None:
        serve_stub(a.serve)
        return {}
    from pipeline.provenance import cpu_model
    from pipeline.workload.arrivals import arrival_offsets

    for var in ("no_proxy", "NO_PROXY"):  # vLLM's session trusts the environment
        os.environ[var] = ",".join(filter(None, [os.environ.get(var), "127.0.0.1"]))
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(a.tokens)],
                            stdout=subprocess.PIPE, text=True)
    conc = a.concurrency or None
    rows: dict[tuple[float, str], list[dict[str, float]]] = {}
    try:
        assert proc.stdout is not None
        base = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        rates = [float(x) for x in a.rates.split(",")]
        # Discarded warm-up: each client once at the first rate. The first measured run of
        # a fresh stub stalled for about 0.4 s whichever client went first (both orders
        # tried), a first-run cost of the machine and stub, not of a client.
        warm = arrival_offsets(min(a.requests, a.warmup_requests),
                               None if rates[0] == float("inf") else rates[0], "poisson",
                               1.0, seed=10_000)
        for name in CLIENTS:
            CLIENTS[name](base, warm, a.tokens, conc)
        fetch_arrivals(base)
        for rate in rates:
            for k in range(a.rounds):
                # inf: every request due at once (the burst ``--request-rate inf`` sends)
                offsets = arrival_offsets(a.requests, None if rate == float("inf") else rate,
                                          "poisson", 1.0, seed=k)
                order = list(CLIENTS) if k % 2 == 0 else list(CLIENTS)[::-1]
                for name in order:
                    # the stub is another process: this process's CPU time is the client's
                    cpu0 = time.process_time()
                    due, ttft = CLIENTS[name](base, offsets, a.tokens, conc)
                    cpu_ms = (time.process_time() - cpu0) * 1000 / len(offsets)
                    rows.setdefault((rate, name), []).append(
                        {**lateness_figures(due, fetch_arrivals(base), ttft),
                         "cpu_ms_per_request": cpu_ms})
    finally:
        proc.kill()
        proc.wait(10)
    print(f"\n{a.requests} requests x {a.tokens} streamed tokens, concurrency {conc}, "
          f"{a.rounds} round(s) per client and rate (medians; [min-max] over rounds); "
          f"{cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'rate':>7} {'client':<6} {'sent/s':>8} {'late p50 ms':>12} "
          f"{'late p99 ms':>20} {'late max ms':>12} {'TTFT p99 ms':>12} {'missing':>8} "
          f"{'CPU ms/req':>10}")
    out: dict[str, Any] = {"settings": {k: v for k, v in vars(a).items() if k != "serve"},
                           "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M"),
                           "rows": []}
    for (rate, name), runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lo = min(r["late_p99_ms"] for r in runs)
        hi = max(r["late_p99_ms"] for r in runs)
        print(f"{rate:>7g} {name:<6} {med['sent_per_s']:>8.0f} {med['late_p50_ms']:>12.2f} "
              f"{med['late_p99_ms']:>8.2f} [{lo:.1f}-{hi:.1f}] {med['late_max_ms']:>12.1f} "
              f"{med['ttft_p99_ms']:>12.1f} {med['missing']:>8.0f} "
              f"{med['cpu_ms_per_request']:>10.3f}")
        out["rows"].append({"rate": rate, "client": name, "median": med, "runs": runs})
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
