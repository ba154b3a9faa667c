"""Memory that fits one card: the rules that keep a job to one copy of the model on a GPU.

Three decisions, each a pure function so that it is tested on a CPU machine (the CUDA
paths that call them are thin and unverified without a GPU):

- :func:`scorer_dtype_name`: ``scoring.scorer_dtype=auto`` (the default) scores perplexity
  in the generating model's dtype on CUDA, so the scorer reuses the loaded model instead of
  loading a second full float32 copy; on the CPU it is float32, as before.
- :func:`backends_to_free`: before a backend loads onto a GPU, every *other* backend's
  cached engines and models are stopped: the HF model kept between jobs before a vLLM
  engine or server starts (vLLM asks for ``gpu_memory_utilization`` of the *whole* card and
  fails when it is not free), and an idle vLLM engine, which keeps that share of the card,
  before an HF model loads. :func:`free_gpu_for` applies it.
- :func:`check_free_memory`: ``backend.gpu_memory_utilization`` x the card's total must be
  free when the engine starts (vLLM's own start-up check, made before anything loads so
  that the refusal is one line naming the key and the fix).
- :func:`check_estimate_fits_free`: an HF job's memory estimate (pipeline/memory_plan.py)
  must fit in the memory free on the card before its weights load.

:func:`prepare_gpu_for_engine` runs the first two where an engine starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

#: dtypes a transformers scorer can load in (what ``scoring.scorer_dtype`` may name)
SCORER_DTYPES = ("float32", "bfloat16", "float16")


def scorer_dtype_name(requested: str, device: str, model_dtype: str | None,
                      cuda_auto_dtype: str = "bfloat16") -> str:
    """The dtype perplexity is scored in.

    ``requested`` is ``scoring.scorer_dtype``; anything but ``auto`` is used as given.
    ``auto``: float32 on the CPU (the scores CPU runs always had); on CUDA the generating
    model's dtype (``model_dtype``, as resolved for the backend), so that the HF backend's
    loaded model *is* the scorer and no second copy is loaded. When the generating dtype is
    unknown or not one a scorer loads in (an OpenAI endpoint, a quantized engine), the
    card's half-precision dtype ``cuda_auto_dtype``: half the bytes of a float32 copy.
    """
    if requested != "auto":
        return requested
    if device != "cuda":
        return "float32"
    if model_dtype in SCORER_DTYPES:
        return str(model_dtype)
    return cuda_auto_dtype


def backends_to_free(starting: str, device: str, held: Mapping[str, int]) -> list[str]:
    """Which backends' cached engines/models must stop before ``starting`` loads its model
    or starts its engine on ``device``.

    ``held`` maps each loaded backend (by name) to how many cached engines or models it
    keeps that hold a GPU (:meth:`Backend.cached_engines`; the HF backend counts only its
    CUDA-resident models). On CUDA every other holder is freed: a vLLM engine takes
    ``gpu_memory_utilization`` of the whole card at start and keeps it while idle, and an
    HF model keeps its weights; either would leave the next backend too little. The
    starting backend's own cache is left to it (vLLM's engine cache stops its idle engines
    itself and may reuse one; the HF backend reuses a model of the same settings and frees
    one of other settings). On the CPU nothing is freed: memory there is not reserved up
    front, and CPU sweeps keep reusing what they cached, as before.
    """
    if device != "cuda":
        return []
    return sorted(name for name, n in held.items() if n > 0 and name != starting)


def check_free_memory(free: int, total: int, utilization: float,
                      key: str = "backend.gpu_memory_utilization", gpu: str = "cuda:0"
                      ) -> None:
    """Refuse, in one line, a ``gpu_memory_utilization`` the card cannot give now.

    vLLM reserves ``utilization x total`` bytes of the card when its engine starts and
    fails when fewer are free (another process, or a model this process still holds).
    The message names the key, the free and total bytes, and the fix: the largest
    utilization that fits now (rounded down to 0.01), or freeing the card.
    """
    want = utilization * total
    if free >= want:
        return
    fits = int(free / total * 100) / 100 if total > 0 else 0.0
    fix = (f"lower {key} to {fits:.2f} or less" if fits > 0
           else "free the GPU")
    raise ConfigError(
        f"{key}={utilization} is invalid on {gpu}: vLLM would reserve {utilization} x "
        f"{total} bytes total = {int(want)} bytes, but only {free} bytes are free "
        f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB; other processes hold the rest); "
        f"{fix}, or stop what else runs on the GPU")


def held_gpu_engines() -> dict[str, tuple[int, Callable[[], int]]]:
    """Each loaded backend that keeps engines or models between jobs, by the name of the
    class that implements its cache: (how many it holds now, its ``shutdown_cached``).
    A subclass that inherits the cache is the same holder, counted once."""
    from pipeline.backends import loaded_classes

    out: dict[str, tuple[int, Callable[[], int]]] = {}
    seen: set[Any] = set()
    for cls in loaded_classes():
        count, stop = cls.cached_engines, cls.shutdown_cached
        if count.__func__ in seen:
            continue
        seen.add(count.__func__)
        out[_holder_name(cls)] = (count(), stop)
    return out


def _holder_name(cls: type) -> str:
    """The class whose ``cached_engines`` ``cls`` uses (its cache's owner)."""
    return next(c for c in cls.__mro__ if "cached_engines" in vars(c)).__name__


def free_gpu_for(starting: type, device: str) -> list[str]:
    """Stop the cached engines/models of every backend but ``starting`` (a Backend class)
    that :func:`backends_to_free` names, through each one's ``shutdown_cached``; returns
    the holders stopped. On the CPU this does nothing and walks nothing."""
    if device != "cuda":
        return []
    holders = held_gpu_engines()
    names = backends_to_free(_holder_name(starting), device,
                             {k: n for k, (n, _) in holders.items()})
    for name in names:
        stopped = holders[name][1]()
        log.info("stopped %d cached %s engine(s)/model(s) to free the GPU for %s", stopped,
                 name, starting.__name__)
    return names


def check_estimate_fits_free(model: str, estimate: int, free: int, *,
                             terms: Mapping[str, int] | None = None, dtype: str = "",
                             total: int | None = None, gpu: str = "cuda:0") -> None:
    """Refuse, in one line, a job whose memory ``estimate`` (bytes) exceeds the ``free``
    bytes of its card before its weights load.

    ``estimate`` is what the job still needs on the card (pipeline/memory_plan.py's sum
    without the CUDA context, which exists once the free memory has been read); ``free``
    counts what is free now plus what this process's own allocator holds for models that
    are reused or freed before loading. ``terms`` (name -> bytes) are named in the message;
    ``dtype`` picks the fix (half precision where the job runs in float32).
    """
    if estimate <= free:
        return
    half = dtype == "float32"
    fixes = (["model.dtype=auto (half precision on CUDA)"] if half else []) + [
        "a smaller workload.batch_size or shorter prompts / workload.max_new_tokens",
        "scoring.perplexity=false" if terms and any(k.startswith("scorer") for k in terms)
        else "", "a card with more memory"]
    parts = (f" ({', '.join(f'{k} {v / 1e9:.2f} GB' for k, v in terms.items())})"
             if terms else "")
    of_total = f" of {total / 2**30:.1f}" if total else ""
    raise ConfigError(
        f"model={model} does not fit in the free memory of {gpu}: the estimate is "
        f"{estimate:,} bytes{parts}, but only {free:,} bytes are free "
        f"({free / 2**30:.1f}{of_total} GiB; other processes hold the rest); use "
        f"{', '.join(f for f in fixes if f)}, or stop what else runs on the GPU")


def prepare_gpu_for_engine(starting: type, device: str, utilization: float,
                           gpus: int = 1,
                           mem_get_info: Callable[[int], tuple[int, int]] | None = None
                           ) -> list[str]:
    """Before an engine of class ``starting`` starts on ``device``: stop the other
    backends' cached GPU models (:func:`free_gpu_for`), then check that
    ``utilization`` of each of its ``gpus`` cards is free (:func:`check_free_memory`),
    in that order, so that what was just freed counts. Returns the holders stopped.

    ``mem_get_info(i)`` -> (free, total) bytes of logical GPU ``i``; default
    ``torch.cuda.mem_get_info``. On the CPU this does nothing and imports nothing.
    """
    if device != "cuda":
        return []
    names = free_gpu_for(starting, device)
    if mem_get_info is None:
        import torch

        mem_get_info = torch.cuda.mem_get_info
    for i in range(gpus):
        free, total = mem_get_info(i)
        check_free_memory(int(free), int(total), utilization, gpu=f"cuda:{i}")
    return names
