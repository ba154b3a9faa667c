"""transformers backend: batched ``generate`` with left padding, in this process."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import hardware
from pipeline.backends import hf_quantization as hq
from pipeline.backends import hf_speculative as hs
from pipeline.backends import hf_static as hst
from pipeline.backends.base import (
    BOOKKEEPING,
    Backend,
    BackendConfig,
    Job,
    Setting,
    backend_of,
    optimization,
)
from pipeline.config import DTYPES, DecodingConfig, ModelConfig, check_choice, check_range
from pipeline.devices import resolve_device
from pipeline.errors import UnsupportedDecoding
from pipeline.measure.timing import Sync, clock
from pipeline.records import Request, RequestRecord

if TYPE_CHECKING:
    from pipeline.config import Config

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "sdpa_flash", "flash_attention_2")
CACHE_IMPLEMENTATIONS = ("dynamic", "static")
#: ``auto``: the hardware rule's mode (hardware.COMPILE_AUTO: no CUDA graphs on the CPU,
#: reduce-overhead's CUDA graphs on CUDA)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
                 "auto")


@dataclass
class HFBackendConfig(BackendConfig):
    """transformers ``generate`` in this process."""

    name: str = "hf"
    impl: str = "pipeline.backends.hf:HFBackend"
    attn_implementation: str = "sdpa"
    use_cache: bool = True
    cache_implementation: str = "dynamic"
    compile: bool = False
    compile_mode: str = "default"
    inductor_freezing: bool = False
    inductor_cpp_wrapper: bool = False
    #: under freezing, inductor packs bf16/fp32 linear weights into oneDNN's blocked layout:
    #: up to ~14% faster decode steps on CPU, but packed (mkldnn) tensors cannot be
    #: pickled, so the graph skips inductor's on-disk cache and every process compiles again
    inductor_weight_prepack: bool = True
    #: under compile, prompts are left-padded to a multiple of this many tokens, so that
    #: few distinct shapes (few recompilations) reach the measured phase
    pad_bucket: int = 32
    #: inductor's on-disk cache (compiled kernels, autotuning results; keyed by graph,
    #: settings and torch version): a second run on the machine skips most compilation
    compile_cache_dir: str | None = None
    dtype: str | None = None
    num_threads: int | None = None
    #: speculative decoding by prompt lookup: K candidate tokens copied from the prompt's
    #: n-grams per step (0 / null = off); batch 1 only (hf_speculative.py)
    prompt_lookup_num_tokens: int | None = None
    #: speculative decoding by a draft model (assisted generation): a local folder sharing
    #: the target's tokenizer (null = off)
    draft_model: str | None = None
    #: weight quantization: null | int8_dynamic | int4_weight_only | bnb_int8 | bnb_4bit
    #: (hf_quantization.py says which run where)
    quantization: str | None = None
    #: generate (transformers' loop) | static (hf_static.py: exact-length eager prefill,
    #: fixed-shape decode steps, no per-step logits processors; greedy and sampling) |
    #: auto (static where it applies, else generate; applied.decode_loop says which ran)
    decode_loop: str = "generate"


def _compiled(job: Job) -> bool:
    return bool(backend_of(job).get("compile"))


def _compile_mode(value: Any, job: Job) -> Any:
    """``compile_mode=auto`` resolved on the job's device (this machine)."""
    device = str((job.get("model") or {}).get("device", "auto"))
    return value if value != "auto" else hardware.compile_mode(value, hardware.live(device))


def _loop(value: Any, job: Job) -> str:
    """``auto`` resolved for the job's decoding (what ``applied.decode_loop`` records)."""
    from types import SimpleNamespace

    if value == "generate":
        return "generate"
    fields = {**HFBackendConfig().__dict__, **backend_of(job)}
    dec = {**DecodingConfig().__dict__, **(job.get("decoding") or {})}
    why = hst.unsupported(SimpleNamespace(**dec), SimpleNamespace(**fields))  # type: ignore[arg-type]
    return "generate" if why else "static"


#: what each ``backend.*`` field of :class:`HFBackendConfig` is to the gate. The reference
#: is transformers' plainest computation: eager attention, no KV cache (every step
#: recomputes the whole sequence), float32, generate's own loop; everything that departs
#: from it is an optimization the gate checks against it.
HF_SETTINGS: dict[str, Setting] = {
    "attn_implementation": optimization(("eager",)),
    "use_cache": optimization((False,)),
    "cache_implementation": optimization(
        ("dynamic",), read_if=lambda j: bool(backend_of(j).get("use_cache", True))),
    "compile": optimization((False,)),
    "compile_mode": optimization(("default",), read_if=_compiled, effective=_compile_mode),
    "inductor_freezing": optimization((False,), read_if=_compiled),
    "inductor_cpp_wrapper": optimization((False,), read_if=_compiled),
    "inductor_weight_prepack": optimization(
        (False,), read_if=lambda j: _compiled(j) and bool(
            backend_of(j).get("inductor_freezing"))),
    # left padding to a bucket: only generate's loop under compile pads
    "pad_bucket": optimization(
        (1,), read_if=lambda j: _compiled(j) and _loop(
            backend_of(j).get("decode_loop", "generate"), j) == "generate"),
    "compile_cache_dir": BOOKKEEPING,
    "dtype": optimization(("float32",), effective=hardware.effective_dtype),
    "num_threads": BOOKKEEPING,
    "prompt_lookup_num_tokens": optimization((None, 0), numerics=False),
    "draft_model": optimization((None,), numerics=False),
    "quantization": optimization((None,)),
    "decode_loop": optimization(("generate",), effective=_loop),
}


def hf_generate_kwargs(d: DecodingConfig, max_new_tokens: int, fixed_length: bool) -> dict:
    """Keyword arguments for transformers' ``generate``."""
    sample = d.do_sample and d.temperature > 0
    kw: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "num_beams": d.num_beams,
        "repetition_penalty": d.repetition_penalty,
        "no_repeat_ngram_size": d.no_repeat_ngram_size,
    }
    if sample:
        # All three always passed (0 / 1.0 = off) so a model's own generation_config
        # defaults (often top_k=50) never leak in; greedy and beam ignore them.
        kw.update(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p)
    if d.num_beams > 1:
        kw["length_penalty"] = d.length_penalty
        kw["early_stopping"] = True
    elif d.length_penalty != 1.0:
        raise UnsupportedDecoding(
            "backend hf: decoding.length_penalty only applies to beam search "
            "(set decoding.num_beams > 1 or leave length_penalty at 1.0)"
        )
    if fixed_length:
        kw["min_new_tokens"] = max_new_tokens
    return kw



# (model_dir, dtype, attention, weights, device, compile settings, quantization)
#   -> (model, tokenizer, parameter count of the unquantized architecture)
# The loaded model of the last job, kept for the next job with the same load settings
# (a sweep over decoding, batch or workload reloads nothing; compiled graphs live on the
# model object, so a compiled model is reused with them). One only: an idle model of other
# settings would sit in this process's memory and inflate the next job's peak RSS.
_LOADED: dict[tuple, tuple[Any, Any, int]] = {}
# id(cached model) -> its static decoder, whose caches a compiled step keeps seeing
_DECODERS: dict[int, hst.StaticDecoder] = {}


class _StepClock:
    """A stopping criterion that never stops: it only timestamps each decoding step.

    transformers calls stopping criteria once per generated position, for greedy, sampling
    and beam search alike (streamers refuse beam search), so step k's time is when token k
    of every sequence in the batch exists.
    """

    def __init__(self, sync: Sync) -> None:
        self.sync = sync
        self.times: list[float] = []
        #: (time, sequence length): an assisted step adds several tokens at once
        self.steps: list[tuple[float, int]] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        t = clock(self.sync)
        self.times.append(t)
        self.steps.append((t, int(input_ids.shape[-1])))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFBackend(Backend):
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

    def sync(self) -> None:
        """``torch.cuda.synchronize`` on CUDA; the CPU runs in program order."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def scorer_model(self, dtype: Any) -> Any | None:
        """The loaded model, when it holds the real weights in ``dtype`` and is not
        compiled (a compiled forward would recompile for the scorer's shapes) and not
        quantized (perplexity is scored with the real weights)."""
        m = self.model
        if (m is None or self.cfg.compile or self.model_cfg.weights != "pretrained"
                or self.cfg.quantization
                or next(m.parameters()).dtype != dtype):
            return None
        return m

    def next_token_logprobs(self, prompt_ids: list[int], cont_ids: list[int]) -> Any:
        """Log-softmax (float32, on the CPU) of the next-token distribution at each position
        of ``cont_ids``, teacher-forced on prompt + continuation: one unpadded sequence, no
        cache, through this job's model as loaded (dtype, attention, quantization, compiled
        forward). The gate (``pipeline/gate.py``) compares two settings' answers."""
        import torch

        ids = torch.tensor([list(prompt_ids) + list(cont_ids)], device=self.device)
        with torch.inference_mode(), self._sdpa_context():
            logits = self.model(input_ids=ids, use_cache=False).logits
        n = len(prompt_ids)
        return torch.log_softmax(logits[0, n - 1 : n - 1 + len(cont_ids)].float(), -1).cpu()

    def _sdpa_context(self) -> Any:
        if self.cfg.attn_implementation != "sdpa_flash":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])

    def generate(
        self, requests: list[Request], decoding: DecodingConfig, max_new_tokens: int = 32,
        fixed_length: bool = False,
    ) -> list[RequestRecord]:
        """Generate one batch (all ``requests`` padded on the left together)."""
        import torch

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos_ids = self._eos_ids()
        loop = hst.chosen_loop(self.cfg, decoding)
        width = max(len(r.prompt_token_ids) for r in requests)
        if self.cfg.compile and loop == "generate":
            # few distinct shapes -> few recompilations inside the measured phase (the
            # static loop prefills eagerly at the exact length)
            width = -(-width // self.cfg.pad_bucket) * self.cfg.pad_bucket
        input_ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            n = len(r.prompt_token_ids)
            input_ids[i, width - n :] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        torch.manual_seed(self.seed)
        graphs_before = _compiled_graph_count() if self.cfg.compile else 0
        hits_before = _disk_cache_hits() if self.cfg.compile else 0
        with torch.inference_mode(), self._sdpa_context():
            if loop == "static":
                new, t_start, t_end, times_of = self._static(
                    input_ids, mask, decoding, max_new_tokens, fixed_length, eos_ids, pad_id)
            else:
                new, t_start, t_end, times_of = self._generate(
                    input_ids, mask, decoding, max_new_tokens, fixed_length, eos_ids, pad_id)
        self.decode_loop = loop
        self._calls += 1
        if self.cfg.compile:
            self._count_compilation(_compiled_graph_count() - graphs_before, t_end - t_start)
            self.graphs_from_disk += _disk_cache_hits() - hits_before
        records = []
        for i, r in enumerate(requests):
            ids = _cut_at_eos(new[i].tolist(), eos_ids, keep_all=fixed_length)
            times = times_of(len(ids))
            records.append(RequestRecord(
                index=r.index, prompt=r.prompt,
                text=tok.decode(ids, skip_special_tokens=True),
                prompt_tokens=len(r.prompt_token_ids), output_token_ids=ids,
                t_start=t_start, t_first_token=times[0] if times else None, t_end=t_end,
                token_times=times,
            ))
        return records

    def _generate(self, input_ids: Any, mask: Any, decoding: DecodingConfig,
                  max_new_tokens: int, fixed_length: bool, eos_ids: set[int], pad_id: int
                  ) -> tuple[Any, float, float, Callable[[int], list[float]]]:
        """transformers' ``generate``: (new tokens, start, end, step times of n tokens)."""
        width = input_ids.shape[1]
        kw = hf_generate_kwargs(decoding, max_new_tokens, fixed_length)
        if self.cfg.cache_implementation != "dynamic":
            kw["cache_implementation"] = self.cfg.cache_implementation
        kw.update(hs.generate_kwargs(self.cfg, self.draft))
        step_clock = _StepClock(self.sync)
        speculative = hs.speculation_on(self.cfg)
        counter = hs.ForwardCounter().attach(self.model) if speculative else None
        try:
            t_start = clock(self.sync)
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids), use_cache=self.cfg.use_cache,
                stopping_criteria=[step_clock], **kw,
            )
            t_end = clock(self.sync)
        finally:
            if counter is not None:
                counter.detach()
        if counter is not None:  # warm-up calls included: acceptance is the proposer's
            self._spec_calls.append(hs.step_stats(counter.widths, width, out.shape[1] - width))

        def times_of(n: int) -> list[float]:
            if speculative:  # a step may add several tokens at once
                return hs.step_times(step_clock.steps, width, n)
            return step_clock.times[:n]

        return out[:, width:], t_start, t_end, times_of

    def _static(self, input_ids: Any, mask: Any, decoding: DecodingConfig,
                max_new_tokens: int, fixed_length: bool, eos_ids: set[int], pad_id: int
                ) -> tuple[Any, float, float, Callable[[int], list[float]]]:
        """The static loop (hf_static.py): (new tokens, start, end, step times)."""
        m = self.model
        dec = _DECODERS.get(id(m))
        if dec is None or dec.model is not m:
            # prefill through the class's own (eager) forward; steps through the instance's,
            # which is the compiled one under backend.compile
            dec = _DECODERS[id(m)] = hst.StaticDecoder(m, type(m).forward.__get__(m),
                                                       m.forward)
        limit = getattr(m.config, "max_position_embeddings", None)
        new, t_start, times = dec.run(
            input_ids, mask, max_new_tokens=max_new_tokens, decoding=decoding,
            eos_ids=eos_ids, min_new_tokens=max_new_tokens if fixed_length else 0,
            pad_id=pad_id, clock=lambda: clock(self.sync),
            cache_len=hst.cache_length(input_ids.shape[1], max_new_tokens, limit))
        return new, t_start, times[-1], lambda n: times[:n]

    def _count_compilation(self, new_graphs: int, call_s: float) -> None:
        """A call that compiled (a new model, or a new shape for a cached one) costs
        compilation + one generation; the sum is this job's compile_s."""
        if not new_graphs:
            return
        self.compile_s = (self.compile_s or 0.0) + call_s
        self.compiled_graphs += new_graphs
        if self._calls > 1:  # after the warm-up: inside the measured phase
            self.late_compiled_graphs += new_graphs
            hint = (f"prompt lengths within {self.cfg.pad_bucket}-token buckets "
                    "(backend.pad_bucket)" if self.decode_loop == "generate" else
                    f"prompt + output lengths within {hst.CACHE_BUCKET}-position cache buckets")
            print(f"warning: torch.compile built {new_graphs} graph(s) during the "
                  f"measured phase (a new batch shape); its time is in the figures "
                  f"- use equal batch sizes and {hint}", flush=True)

    def extra_metrics(self) -> dict[str, float]:
        out = hs.summarize(self._spec_calls, self.cfg.prompt_lookup_num_tokens)
        if self.cfg.compile:
            out.update({"compile_s": self.compile_s or 0.0,
                        "compiled_graphs": float(self.compiled_graphs),
                        "compiled_graphs_after_warmup": float(self.late_compiled_graphs),
                        "compiled_graphs_from_disk": float(self.graphs_from_disk)})
        return out

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for v in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, list | tuple):
                ids.update(int(x) for x in v)
        return ids

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


def _compiled_graph_count() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _disk_cache_hits() -> int:
    """Graphs inductor loaded from its on-disk FX graph cache so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"])


def _cut_at_eos(ids: list[int], eos_ids: set[int], keep_all: bool) -> list[int]:
    """Output tokens up to and including the first EOS (what follows is padding)."""
    if keep_all:
        return ids
    for j, t in enumerate(ids):
        if t in eos_ids:
            return ids[: j + 1]
    return ids
