"""What a job refuses before any model loads: the input checks of :func:`check_inputs`,
and on a real CUDA run the memory estimate against the card (:func:`check_memory_before_load`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from pipeline.adapters import check_adapter
from pipeline.backends import backend_class
from pipeline.config import Config, validate
from pipeline.workload import check_limits, load_prompts
from pipeline.workload.profiles import check_profile

if TYPE_CHECKING:
    from pipeline.hardware import Hardware
    from pipeline.memory_plan import MemoryPlan
    from pipeline.records import Request


def check_inputs(cfg: DictConfig) -> tuple[Config, list[str]]:
    """Everything that can be checked without a model: types, ranges, choices, decoding
    support of the backend, the prompts themselves. Imports nothing heavy."""
    spec = validate(cfg)
    check_adapter(spec.model)  # a LoRA adapter needs its base on this machine
    backend_class(spec.backend.impl).check(spec)
    from pipeline.hardware import decide, for_spec

    # every auto on the hardware (a +target's card in a dry run): what it cannot run is
    # refused here, naming the key, the hardware and the fix
    decide(spec, for_spec(spec))
    check_profile(spec, backend_class(spec.backend.impl).online)  # offline: fixed only
    check_limits(spec)  # input + output within the context, per-request output lengths
    return spec, load_prompts(spec.workload)


def check_memory_before_load(spec: Config, model_dir: str, requests: list[Request], *,
                             hw: Hardware | None = None,
                             mem_get_info: Callable[[], tuple[int, int]] | None = None,
                             reserved: Callable[[], int] | None = None) -> MemoryPlan | None:
    """On a real CUDA run, before the weights load: refuse (:class:`ConfigError`, one line)
    a job whose memory estimate (pipeline/memory_plan.py) does not fit the card as it is
    now; returns the estimate (None where none is made). The CPU, dry runs (checked against
    their ``+target`` instead) and backends that load nothing here change nothing.

    - transformers in this process: first the other backends' cached engines leave the card
      (:func:`~pipeline.gpu_memory.free_gpu_for`, e.g. an idle vLLM engine), then the
      estimate less the CUDA context (reading the free memory creates it) must fit in the
      free bytes plus what this process's allocator holds (``reserved``: this backend's
      cached model, either reused for this job, then it is the estimate's weights, or freed
      before loading) (:func:`~pipeline.gpu_memory.check_estimate_fits_free`).
    - vLLM: the estimate must fit its share, ``gpu_memory_utilization`` x the card (the
      dry run's check, :func:`~pipeline.memory_plan.check_plan`); that share itself is
      checked against the free memory when the engine starts
      (:func:`~pipeline.gpu_memory.check_free_memory`), so the free bytes are not read here.

    ``hw``, ``mem_get_info`` (-> free, total bytes) and ``reserved`` (-> bytes) default to
    this machine's device, ``torch.cuda.mem_get_info`` and ``torch.cuda.memory_reserved``.
    """
    from pipeline import gpu_memory, hardware
    from pipeline.memory_plan import check_plan, plan, read_architecture

    if spec.dry_run:
        return None
    hw = hw or hardware.for_spec(spec)
    if not hw.cuda:
        return None
    arch = read_architecture(model_dir)
    decisions = hardware.decide(spec, hw)
    p = plan(spec, decisions, arch, requests) if arch else None
    if p is None:
        return None
    if spec.backend.reserves_gpu_share:  # a vLLM engine: its share of the card
        check_plan(p, hw, spec)
        return p
    gpu_memory.free_gpu_for(backend_class(spec.backend.impl), "cuda")
    if mem_get_info is None or reserved is None:
        import torch

        mem_get_info = mem_get_info or torch.cuda.mem_get_info
        reserved = reserved or torch.cuda.memory_reserved
    free, total = mem_get_info()
    # what the job still needs: the CUDA context exists once the free memory is read
    terms = {k: v for k, v in p.items.items()
             if k != "CUDA context" and not k.startswith("outside: ")}
    gpu_memory.check_estimate_fits_free(
        str(spec.model.path or spec.model.name), sum(terms.values()),
        int(free) + int(reserved()), terms=terms,
        dtype=str(decisions.settings.get("dtype", "")), total=int(total))
    return p
