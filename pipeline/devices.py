"""The one rule for ``auto`` devices and dtypes, used by every backend and the scorer.

``model.device=auto`` picks CUDA when torch sees a GPU, else the CPU; ``dtype=auto`` is
decided by the hardware rule (pipeline/hardware.py): float32 on the CPU (where bfloat16 is
emulated on many processors), bfloat16 on CUDA at compute capability >= 8.0, float16 below
(a T4). :func:`cuda_present` answers without importing torch wherever the machine plainly
has no NVIDIA driver, so that config validation stays light.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError

# the CUDA probe lives with the hardware rule; importing it here keeps the old name
from pipeline.hardware import cuda_present  # noqa: F401


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` or ``cpu``; asking for CUDA without it is a config error."""
    if name == "auto":
        return "cuda" if cuda_present() else "cpu"
    if name == "cuda" and not cuda_present():
        raise ConfigError("model.device='cuda' is invalid: no CUDA device is visible on "
                          "this machine; use model.device=cpu or auto")
    return name


def resolve_dtype_name(name: str, device: str = "auto") -> str:
    """``auto`` -> the hardware rule's dtype for ``device`` on this machine (float32 on the
    CPU, bfloat16 on CUDA >= 8.0, float16 below); other names unchanged. (vLLM's own
    ``auto`` would turn a float32 checkpoint into float16: never passed on.)"""
    if name != "auto":
        return name
    from pipeline.hardware import live, resolve_dtype

    return resolve_dtype(name, live(device))


def torch_dtype(name: str, device: str = "auto") -> Any:
    """The torch dtype for a config dtype name (``auto`` resolved as above)."""
    import torch

    return getattr(torch, resolve_dtype_name(name, device))
