"""Backend registry: config name -> implementation, imported only when used."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.backends.base import Backend
    from pipeline.config import Config

# name -> "module:Class"; adding a backend = one file here + one yaml in conf/backend/
REGISTRY = {
    "hf": "pipeline.backends.hf:HFBackend",
    "vllm": "pipeline.backends.vllm:VLLMBackend",
}


def backend_class(name: str) -> type[Backend]:
    """Import and return the backend class registered under ``name``."""
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(spec: Config, model_dir: str) -> Backend:
    """Construct (not load) the configured backend."""
    return backend_class(spec.backend.name)(model_dir, spec.model, spec.backend, spec.seed)


def preflight(spec: Config) -> None:
    """Checks that need the backend's knowledge but no model: decoding support, kernels.
    Raises ConfigError / UnsupportedDecoding before anything loads."""
    from pipeline.decoding import check_vllm, hf_generate_kwargs

    if spec.backend.name == "vllm":
        check_vllm(spec.decoding)
    elif spec.backend.name == "hf":
        hf_generate_kwargs(spec.decoding, spec.workload.max_new_tokens,
                           spec.workload.fixed_length)
