"""What a job refuses before any model loads: the input checks of :func:`check_inputs`."""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline.adapters import check_adapter
from pipeline.backends import backend_class
from pipeline.config import Config, validate
from pipeline.workload import check_limits, load_prompts
from pipeline.workload.profiles import check_profile


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

