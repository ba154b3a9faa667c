"""The transformers backend class :class:`HFBackend` (registry name ``hf``; ``hf_fast``,
``hf_baseline`` and ``hf_kv`` are yamls over it): its checks before loading, its state,
and what a job reads back (applied settings, extra metrics). Loading, generation and
scoring live in :mod:`.loading`, :mod:`.generation` and :mod:`.scoring`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pipeline.backends.base import Backend
from pipeline.backends.hf import quantization as hq
from pipeline.backends.hf import speculative as hs
from pipeline.backends.hf import static as hst
from pipeline.backends.hf.config import (
    ATTN_IMPLEMENTATIONS,
    CACHE_IMPLEMENTATIONS,
    COMPILE_MODES,
    HFBackendConfig,
)
from pipeline.backends.hf.generation import HFGeneration, hf_generate_kwargs
from pipeline.backends.hf.loading import HFLoading
from pipeline.backends.hf.scoring import HFScoring
from pipeline.backends.hf.settings import HF_SETTINGS
from pipeline.config import DTYPES, ModelConfig, check_choice, check_range

if TYPE_CHECKING:
    from pipeline.config import Config


class HFBackend(HFLoading, HFScoring, HFGeneration, Backend):
    """In-process transformers generation."""

    name = "hf"
    config_class = HFBackendConfig
    settings = HF_SETTINGS

    @classmethod
    def validate_settings(cls, cfg: HFBackendConfig) -> None:  # type: ignore[override]
        check_choice("backend.attn_implementation", cfg.attn_implementation,
                     ATTN_IMPLEMENTATIONS)
        check_choice("backend.cache_implementation", cfg.cache_implementation,
                     CACHE_IMPLEMENTATIONS)
        check_range("backend.num_threads", cfg.num_threads, 1, optional=True)
        check_choice("backend.compile_mode", cfg.compile_mode, COMPILE_MODES)
        check_range("backend.pad_bucket", cfg.pad_bucket, 1)
        check_choice("backend.decode_loop", cfg.decode_loop, hst.DECODE_LOOPS)
        if cfg.dtype is not None:
            check_choice("backend.dtype", cfg.dtype, DTYPES)
        hs.validate_speculative(cfg)
        hq.validate_quantization(cfg)

    @classmethod
    def check(cls, spec: Config) -> None:
        hf_generate_kwargs(spec.decoding, spec.workload.max_new_tokens,
                           spec.workload.fixed_length)
        # dtype, attention kernel and compile mode on the hardware: hardware.decide, which
        # check_inputs applies to every job (a +target's card in a dry run)
        hs.check_speculative(spec)
        hq.check_quantization(spec)
        hst.check_decode_loop(spec)

    def __init__(
        self, model_dir: str, model: ModelConfig, cfg: HFBackendConfig, seed: int
    ) -> None:
        self.model_dir = model_dir
        self.model_cfg = model
        self.cfg = cfg
        self.seed = seed
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = "cpu"
        self.compile_s: float | None = None
        self.compile_reused = False
        self.model_reused = False
        self.compiled_graphs = 0
        self.late_compiled_graphs = 0
        self.graphs_from_disk = 0  # inductor's on-disk cache hits (no lowering, no C++)
        self._calls = 0
        self.draft: Any = None
        self.num_parameters = 0  # of the unquantized architecture
        self._spec_calls: list[dict[str, float]] = []
        self.decode_loop: str | None = None  # the loop the last call ran
        self.compile_mode = cfg.compile_mode  # ``auto`` resolved at load (hardware rule)
        self.cuda_graphs = False

    def sync(self) -> None:
        """``torch.cuda.synchronize`` on CUDA; the CPU runs in program order."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def extra_metrics(self) -> dict[str, float]:
        out = hs.summarize(self._spec_calls, self.cfg.prompt_lookup_num_tokens)
        if self.cfg.compile:
            out.update({"compile_s": self.compile_s or 0.0,
                        "compiled_graphs": float(self.compiled_graphs),
                        "compiled_graphs_after_warmup": float(self.late_compiled_graphs),
                        "compiled_graphs_from_disk": float(self.graphs_from_disk)})
        return out

    def applied_settings(self) -> dict[str, Any]:
        import torch

        m = self.model
        return {
            "device": str(next(m.parameters()).device),
            "dtype": str(next(m.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": getattr(m.config, "_attn_implementation", None),
            "sdpa_kernel_forced": "flash" if self.cfg.attn_implementation == "sdpa_flash"
            else None,
            "use_cache": self.cfg.use_cache,
            "cache_implementation": self.cfg.cache_implementation,
            "decode_loop": self.decode_loop,
            "compiled": self.cfg.compile,
            "compile_mode": self.compile_mode if self.cfg.compile else None,
            "cuda_graphs": self.cuda_graphs,
            "compile_reused": self.compile_reused,
            "model_reused": self.model_reused,
            "inductor_freezing": self.cfg.inductor_freezing if self.cfg.compile else None,
            "inductor_weight_prepack": self.cfg.inductor_weight_prepack
            if self.cfg.compile and self.cfg.inductor_freezing else None,
            "pad_bucket": self.cfg.pad_bucket if self.cfg.compile else None,
            "compile_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            if self.cfg.compile else None,
            "torch_threads": torch.get_num_threads(),
            "num_parameters": self.num_parameters or sum(p.numel() for p in m.parameters()),
            "weights": self.model_cfg.weights,
            "speculative": ("prompt_lookup" if self.cfg.prompt_lookup_num_tokens
                            else "draft_model" if self.draft is not None else None),
            "prompt_lookup_num_tokens": self.cfg.prompt_lookup_num_tokens or None,
            "draft_model": self.cfg.draft_model,
            "draft_num_parameters": sum(p.numel() for p in self.draft.parameters())
            if self.draft is not None else None,
            **hq.applied_quantization(m, self.cfg.quantization, self.num_parameters),
        }

