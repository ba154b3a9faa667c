"""Loading the transformers backend's model (dtype, attention, weights, quantization,
torch.compile and inductor settings) and the process-wide cache of the last loaded model."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pipeline import gpu_memory, hardware
from pipeline.backends.hf import quantization as hq
from pipeline.backends.hf import speculative as hs
from pipeline.backends.hf import static as hst
from pipeline.backends.hf.config import HFBackendConfig
from pipeline.config import ModelConfig
from pipeline.devices import resolve_device

# (model_dir, dtype, attention, weights, device, compile settings, quantization)
#   -> (model, tokenizer, parameter count of the unquantized architecture)
# The loaded model of the last job, kept for the next job with the same load settings
# (a sweep over decoding, batch or workload reloads nothing; compiled graphs live on the
# model object, so a compiled model is reused with them). One only: an idle model of other
# settings would sit in this process's memory and inflate the next job's peak RSS.
_LOADED: dict[tuple, tuple[Any, Any, int]] = {}
# id(cached model) -> its static decoder, whose caches a compiled step keeps seeing
_DECODERS: dict[int, hst.StaticDecoder] = {}


class HFLoading:
    """Load, hand back and shut down the model of :class:`~pipeline.backends.hf.HFBackend`
    (mixed into it; the attributes below are set in its ``__init__``)."""

    model_dir: str
    model_cfg: ModelConfig
    cfg: HFBackendConfig
    seed: int
    model: Any
    tokenizer: Any
    draft: Any
    device: str
    compile_mode: str
    cuda_graphs: bool
    compile_reused: bool
    model_reused: bool
    num_parameters: int

    def load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(self.model_cfg.device)
        # the hardware rule again, on the device this model lands on (check_inputs decided
        # for model.device; the package and kernel must exist here)
        hw = hardware.live(self.device)
        own = self.cfg.dtype
        dtype_name = hardware.check_dtype("backend.dtype" if own else "model.dtype",
                                          own or self.model_cfg.dtype, hw)
        hardware.check_attention(self.cfg.attn_implementation, dtype_name, hw)
        self.compile_mode = hardware.compile_mode(self.cfg.compile_mode, hw)
        self.cuda_graphs = hardware.hf_cuda_graphs(self.cfg.compile, self.compile_mode, hw)
        hq.check_device(self.cfg.quantization, self.device)
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        attn = "sdpa" if self.cfg.attn_implementation == "sdpa_flash" else (
            self.cfg.attn_implementation
        )
        dtype = getattr(torch, dtype_name)
        # an idle vLLM engine of an earlier job keeps gpu_memory_utilization of the card:
        # it goes before this model loads (nothing on the CPU)
        gpu_memory.free_gpu_for(type(self), self.device)
        trust = self.model_cfg.trust_remote_code
        m = self.model_cfg
        key = (self.model_dir, m.revision, trust, str(dtype), attn, m.weights,
               self.seed if m.weights == "random" else None, self.device, self.cfg.compile,
               self.compile_mode, self.cfg.inductor_freezing, self.cfg.inductor_cpp_wrapper,
               self.cfg.inductor_weight_prepack, self.cfg.quantization)
        if key in _LOADED:
            self.model, self.tokenizer, self.num_parameters = _LOADED[key]
            self.model_reused = True
            self.compile_reused = self.cfg.compile
            self._load_draft(dtype, attn)
            return
        self.shutdown_cached()  # free the other settings' model before loading this one
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=trust)
        if self.model_cfg.weights == "random":
            torch.manual_seed(self.seed)
            config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=trust)
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn, trust_remote_code=trust
            )
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=dtype, attn_implementation=attn, trust_remote_code=trust,
                revision=self.model_cfg.revision,
                **hq.from_pretrained_kwargs(self.cfg.quantization, dtype),
            )
        if not self.cfg.quantization or not self.cfg.quantization.startswith("bnb"):
            self.model.to(self.device)  # bitsandbytes places the model itself
        self.model.eval()
        # counted before quantization: packed int8 weights are no longer parameters()
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.model = hq.quantize_loaded(self.model, self.cfg.quantization)
        if self.cfg.compile:
            import torch._inductor.config as inductor

            if self.cfg.compile_cache_dir:
                # read by inductor whenever it compiles (also later recompiles), so it is
                # set for the process. Set, not defaulted: inductor writes its own default
                # (/tmp/torchinductor_<user>) into the variable the first time it asks, so
                # an earlier import could otherwise leave this setting silently unused;
                # backend.compile_cache_dir=null keeps the variable as it is
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(
                    Path(self.cfg.compile_cache_dir).expanduser().resolve())
            inductor.fx_graph_cache = True

            # freezing folds weights into the graph as constants (inference only); the
            # C++ wrapper removes Python from the per-step launch path
            inductor.freezing = self.cfg.inductor_freezing
            inductor.cpp_wrapper = self.cfg.inductor_cpp_wrapper
            inductor.cpp.weight_prepack = self.cfg.inductor_weight_prepack
            # max-autotune prints a table per matmul shape (hundreds of lines): keep the
            # job's output readable; compile_s still reports what autotuning cost
            inductor.max_autotune_report_choices_stats = False
            inductor.autotune_num_choices_displayed = 0
            self.model.forward = torch.compile(self.model.forward, mode=self.compile_mode)
        _LOADED[key] = (self.model, self.tokenizer, self.num_parameters)
        self._load_draft(dtype, attn)

    def _load_draft(self, dtype: Any, attn: str) -> None:
        """The draft model for assisted generation (after the target: loading a new target
        clears every cached model, drafts included)."""
        if self.cfg.draft_model:
            self.draft = hs.load_draft(self.cfg.draft_model, dtype, self.device, attn)
        else:  # an idle draft would inflate this job's peak RSS
            hs.clear_drafts()

    def close(self) -> None:
        """Release this job's hold; the model stays cached for the next job."""
        self.model = None
        self.tokenizer = None
        self.draft = None

    @classmethod
    def cached_engines(cls) -> int:
        """Cached models that hold a GPU (a CPU model holds nothing a GPU lock guards)."""
        return sum(1 for m, *_ in _LOADED.values()
                   if next(m.parameters()).device.type == "cuda")

    @classmethod
    def shutdown_cached(cls) -> int:
        n = len(_LOADED)
        if n:
            import gc

            _LOADED.clear()
            _DECODERS.clear()
            hs.clear_drafts()
            gc.collect()
            if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
                sys.modules["torch"].cuda.empty_cache()
        return n

