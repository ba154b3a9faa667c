"""The one rule for ``auto`` devices and dtypes, used by every backend and the scorer.

``model.device=auto`` picks CUDA when torch sees a GPU, else the CPU; ``dtype=auto`` is
bfloat16 on CUDA and float32 on the CPU (where bfloat16 is emulated on many processors).
:func:`cuda_present` answers without importing torch wherever the machine plainly has no
NVIDIA driver, so that config validation stays light.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError


def cuda_present() -> bool:
    """Whether a CUDA device can be used; an empty/``-1`` CUDA_VISIBLE_DEVICES or a
    machine without the NVIDIA driver answers without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if not (Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia[0-9]*"))):
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` or ``cpu``; asking for CUDA without it is a config error."""
    if name == "auto":
        return "cuda" if cuda_present() else "cpu"
    if name == "cuda" and not cuda_present():
        raise ConfigError("model.device='cuda' is invalid: no CUDA device is visible on "
                          "this machine; use model.device=cpu or auto")
    return name


def resolve_dtype_name(name: str) -> str:
    """``auto`` -> ``bfloat16`` on CUDA, ``float32`` elsewhere; other names unchanged.
    (vLLM's own ``auto`` would turn a float32 checkpoint into float16: never passed on.)"""
    if name != "auto":
        return name
    return "bfloat16" if cuda_present() else "float32"


def torch_dtype(name: str) -> Any:
    """The torch dtype for a config dtype name (``auto`` resolved as above)."""
    import torch

    return getattr(torch, resolve_dtype_name(name))
