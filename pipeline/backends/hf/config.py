"""The transformers backend's settings schema: :class:`HFBackendConfig` (``backend.*`` of
``conf/backend/hf*.yaml``) and the values its choice fields allow."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.backends.base import BackendConfig

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
    """The backend's short name in tags, run names and error messages (``hf`` for every
    ``conf/backend/hf*.yaml``, ``hf_fast`` included)."""
    impl: str = "pipeline.backends.hf:HFBackend"
    """The Backend class that runs this config, as ``module:Class``."""
    attn_implementation: str = "sdpa"
    """Attention kernel: ``eager`` (transformers' plain matmul + softmax), ``sdpa``
    (PyTorch's scaled_dot_product_attention, which picks its kernel), ``sdpa_flash`` (sdpa
    with PyTorch's flash kernel forced; on CUDA it needs float16/bfloat16 and batches
    without left padding) or ``flash_attention_2`` (needs the flash-attn package, a CUDA
    GPU of compute capability >= 8.0 and float16/bfloat16 weights)."""
    use_cache: bool = True
    """Keep a KV cache between decoding steps; false recomputes the whole sequence at every
    step (the naive baseline)."""
    cache_implementation: str = "dynamic"
    """KV cache layout under ``use_cache``: ``dynamic`` (grows with the sequence) or
    ``static`` (preallocated fixed-shape cache, so a compiled step sees one shape; required
    by ``decode_loop=static``)."""
    compile: bool = False
    """Run the model's forward through ``torch.compile``; compilation happens in the untimed
    warm-up and is reported as ``compile_s``."""
    compile_mode: str = "default"
    """torch.compile mode under ``compile=true``: ``default``, ``reduce-overhead`` (CUDA
    graphs), ``max-autotune``, ``max-autotune-no-cudagraphs`` or ``auto`` (resolved at load
    on the model's device: max-autotune-no-cudagraphs on the CPU, reduce-overhead on
    CUDA). Ignored without compile."""
    inductor_freezing: bool = False
    """Under ``compile``: inductor folds the weights into the graph as constants (inference
    only)."""
    inductor_cpp_wrapper: bool = False
    """Under ``compile``: inductor's C++ wrapper, which removes Python from the per-step
    launch path."""
    inductor_weight_prepack: bool = True
    """Under ``compile`` and ``inductor_freezing``: inductor packs bf16/fp32 linear weights
    into oneDNN's blocked layout: up to ~14% faster decode steps on CPU, but packed (mkldnn)
    tensors cannot be pickled, so the graph skips inductor's on-disk cache and every process
    compiles again."""
    pad_bucket: int = 32
    """Under ``compile`` with the ``generate`` loop, prompts are left-padded to a multiple of
    this many tokens (>= 1; 1 = no padding beyond the longest prompt), so that few distinct
    shapes (few recompilations) reach the measured phase."""
    compile_cache_dir: str | None = None
    """Folder of inductor's on-disk cache (compiled kernels, autotuning results; keyed by
    graph, settings and torch version), set as ``TORCHINDUCTOR_CACHE_DIR`` under
    ``compile``: a second run on the machine skips most compilation. null keeps the
    variable as it is (inductor's own default folder); the yaml sets
    ``${paths.cache_dir}/inductor``."""
    dtype: str | None = None
    """Weight and compute dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the
    hardware rule: float32 on the CPU, bfloat16 on CUDA >= 8.0, float16 below); null uses
    ``model.dtype``."""
    num_threads: int | None = None
    """CPU threads torch uses (``torch.set_num_threads``, >= 1); null keeps torch's
    default."""
    prompt_lookup_num_tokens: int | None = None
    """Speculative decoding by prompt lookup: K candidate tokens copied from the prompt's
    n-grams per step (>= 0; 0 / null = off); batch 1 only, with a dynamic KV cache, no
    compile and no beam search (``speculative.py``)."""
    draft_model: str | None = None
    """Speculative decoding by a draft model (assisted generation): a local model folder
    sharing the target's tokenizer (null = off; not together with
    ``prompt_lookup_num_tokens``; same limits)."""
    quantization: str | None = None
    """Weight quantization: null (off), ``int8_dynamic`` (CPU, float32 model),
    ``int4_weight_only`` (CUDA, torchao), ``bnb_int8`` or ``bnb_4bit`` (CUDA,
    bitsandbytes); pretrained weights only, no compile (``quantization.py`` says which run
    where)."""
    decode_loop: str = "generate"
    """``generate`` (transformers' loop), ``static`` (``static.py``: exact-length eager
    prefill, fixed-shape decode steps, no per-step logits processors; greedy and sampling
    over ``cache_implementation=static``) or ``auto`` (static where it applies, else
    generate; ``applied.decode_loop`` says which ran)."""
