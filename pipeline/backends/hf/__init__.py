"""The transformers backend (``backend=hf`` and the yamls over it: ``hf_fast``,
``hf_baseline``, ``hf_kv``) as a package. Its public names are re-exported here on first
use (the package imports nothing at load time, so its modules import one another without a
cycle through it), so that ``pipeline.backends.hf:HFBackend`` (the yamls' and stored
runs' ``impl``) and ``from pipeline.backends.hf import HFBackendConfig`` keep working.

Modules, one concern each: :mod:`.config` (the settings schema), :mod:`.settings` (each
setting's role for the gate), :mod:`.backend` (the class), :mod:`.loading`,
:mod:`.generation`, :mod:`.scoring`, :mod:`.static` (the static decode loop),
:mod:`.speculative` (prompt lookup and draft models), :mod:`.quantization`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from pipeline.backends.hf.backend import HFBackend
    from pipeline.backends.hf.config import (
        ATTN_IMPLEMENTATIONS,
        CACHE_IMPLEMENTATIONS,
        COMPILE_MODES,
        HFBackendConfig,
    )
    from pipeline.backends.hf.generation import hf_generate_kwargs
    from pipeline.backends.hf.settings import HF_SETTINGS

_EXPORTS = {
    "ATTN_IMPLEMENTATIONS": "pipeline.backends.hf.config",
    "CACHE_IMPLEMENTATIONS": "pipeline.backends.hf.config",
    "COMPILE_MODES": "pipeline.backends.hf.config",
    "HFBackendConfig": "pipeline.backends.hf.config",
    "HFBackend": "pipeline.backends.hf.backend",
    "HF_SETTINGS": "pipeline.backends.hf.settings",
    "hf_generate_kwargs": "pipeline.backends.hf.generation",
}

__all__ = [
    "ATTN_IMPLEMENTATIONS", "CACHE_IMPLEMENTATIONS", "COMPILE_MODES", "HF_SETTINGS", "HFBackend",
    "HFBackendConfig", "hf_generate_kwargs",
]

__getattr__ = lazy_exports(__name__, _EXPORTS)
