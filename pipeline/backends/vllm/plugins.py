"""What both vLLM backend classes answer alike: the plug-in points they share
(:class:`VLLMPlugins`: settings checks, GPUs needed, device synchronization) and the
KV-cache figures both report (:func:`kv_metrics`). Nothing here imports vLLM or torch.
"""

from __future__ import annotations

from typing import Any

from pipeline.backends.vllm.config import VLLMSettings, validate_vllm_settings


class VLLMPlugins:
    """The plug-in points both vLLM backends answer alike (mixed in before the Backend
    base class)."""

    @classmethod
    def validate_settings(cls, cfg: VLLMSettings) -> None:
        """Check ``backend.*`` (typed) before anything loads."""
        validate_vllm_settings(cfg)

    @classmethod
    def gpus_needed(cls, spec: Any) -> int:
        """The engine spans ``tensor_parallel_size`` GPUs on CUDA (the perplexity scorer
        shares the first); none when the model is put on the CPU."""
        if str(spec.model.device) == "cpu":
            return 0
        return int(getattr(spec.backend, "tensor_parallel_size", 1) or 1)

    def sync(self) -> None:
        """Nothing to wait for: the engine hands back only finished work (its timestamps
        are taken in the engine process, after its own device synchronization)."""


def kv_metrics(blocks: Any, tokens: Any) -> dict[str, float]:
    """``kv_cache_blocks``/``kv_cache_tokens`` where the engine reported a capacity."""
    out: dict[str, float] = {}
    if isinstance(blocks, int | float) and blocks:
        out["kv_cache_blocks"] = float(blocks)
    if isinstance(tokens, int | float) and tokens:
        out["kv_cache_tokens"] = float(tokens)
    return out
