"""The llama.cpp server's child process: ``python -m pipeline.backends.llamacpp.server_process
--params JSON`` sets those ``xllamacpp.CommonParams`` fields, starts llama.cpp's HTTP server
(``xllamacpp.Server``, its own threads in this process) on 127.0.0.1 and stays up until
SIGTERM; :func:`server_params` builds the JSON from the backend's settings.

A child process rather than a thread of the pipeline, so that the server's memory is
counted apart from the pipeline's and a crash in llama.cpp fails one job, not the sweep.
The parent side (start, ``/health`` wait, log, process-group stop, the per-process cache)
is the vLLM server's (:class:`~pipeline.backends.vllm.server_process.VLLMServer`). This
module imports nothing heavy at import time: the child pays only for ``xllamacpp``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.backends.llamacpp.config import LlamaCppBackendConfig

#: ``backend.flash_attn`` -> the name of llama.cpp's ``llama_flash_attn_type`` member
FLASH_ATTN_TYPES = {"auto": "LLAMA_FLASH_ATTN_TYPE_AUTO", "on": "LLAMA_FLASH_ATTN_TYPE_ENABLED",
                    "off": "LLAMA_FLASH_ATTN_TYPE_DISABLED"}


def usable_cores() -> int:
    """Cores this process may run on (its affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def server_params(cfg: LlamaCppBackendConfig, gguf: str, port: int, alias: str
                  ) -> dict[str, Any]:
    """The server's parameters (``CommonParams`` field names, flat; ``threads`` sets both
    the generation and the prompt-processing thread pools)."""
    return {
        "model": gguf,
        "alias": alias,
        "port": port,
        "n_ctx": cfg.n_ctx,
        "n_parallel": cfg.n_parallel,
        # one KV pool shared by all slots: any slot may use the whole context, as in vLLM
        "kv_unified": True,
        "threads": cfg.n_threads or usable_cores(),
        "n_batch": cfg.n_batch,
        "n_ubatch": cfg.n_ubatch,
        "flash_attn": cfg.flash_attn,
        "cache_type_k": cfg.cache_type_k,
        "cache_type_v": cfg.cache_type_v,
        "n_gpu_layers": cfg.n_gpu_layers,
        "cache_prompt": cfg.cache_prompt,
    }


def build_params(spec: dict[str, Any]) -> Any:
    """``xllamacpp.CommonParams`` for :func:`server_params`' dict."""
    import xllamacpp as xl

    p = xl.CommonParams()
    p.model.path = spec["model"]
    p.model_alias = {spec["alias"]}
    p.hostnames = ["127.0.0.1"]
    p.port = int(spec["port"])
    p.n_ctx = int(spec["n_ctx"])
    p.n_parallel = int(spec["n_parallel"])
    p.kv_unified = bool(spec["kv_unified"])
    p.cpuparams.n_threads = int(spec["threads"])
    p.cpuparams_batch.n_threads = int(spec["threads"])
    p.n_batch = int(spec["n_batch"])
    p.n_ubatch = int(spec["n_ubatch"])
    p.flash_attn_type = xl.llama_flash_attn_type[FLASH_ATTN_TYPES[spec["flash_attn"]]]
    p.cache_type_k = xl.ggml_type[f"GGML_TYPE_{spec['cache_type_k'].upper()}"]
    p.cache_type_v = xl.ggml_type[f"GGML_TYPE_{spec['cache_type_v'].upper()}"]
    p.n_gpu_layers = int(spec["n_gpu_layers"])
    p.cache_prompt = bool(spec["cache_prompt"])
    p.endpoint_metrics = True  # the load points scrape /metrics
    return p


def main(argv: list[str] | None = None) -> int:
    """Start the server and block until SIGTERM/SIGINT."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True, help="JSON of server_params()")
    spec = json.loads(ap.parse_args(argv).params)
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    # blocked before the server's threads exist, so that they inherit the mask and the
    # signal reaches sigwait below instead of a llama.cpp thread
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    import xllamacpp as xl

    print(f"xllamacpp {xl.__version__}; {xl.get_system_info()}", flush=True)
    server = xl.Server(build_params(spec))
    print(f"llama.cpp server listening on {server.listening_address}", flush=True)
    sig = signal.sigwait(signals)
    print(f"llama.cpp server: {signal.Signals(sig).name}, exiting", flush=True)
    sys.stdout.flush()
    # llama.cpp's own threads are not joined: the process simply ends
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
