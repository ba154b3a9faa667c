"""The settings schema of the ``llamacpp`` backend (``backend.*``,
:class:`LlamaCppBackendConfig`), what each is to the gate (:data:`LLAMACPP_SETTINGS`) and
their checks (:func:`validate_llamacpp_settings`). Nothing here imports ``xllamacpp``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.backends.base import BOOKKEEPING, BackendConfig, Job, Setting, optimization, task
from pipeline.backends.llamacpp.gguf_convert import check_type
from pipeline.config import check_choice, check_range, fail

#: KV-cache element types llama.cpp's server accepts for ``cache_type_k``/``cache_type_v``
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
#: llama.cpp's flash-attention switch: auto (on where the build supports it) | on | off
FLASH_ATTN = ("auto", "on", "off")


#: ``backend.api``: llama.cpp's own endpoint, or OpenAI's two
LLAMACPP_APIS = ("completion", "completions", "chat")


@dataclass
class LlamaCppBackendConfig(BackendConfig):
    """llama.cpp's OpenAI-compatible server, started by the pipeline on 127.0.0.1 (one per
    distinct settings, shared by the jobs of a sweep) on the model's GGUF file."""

    name: str = "llamacpp"
    """The backend's name in configs, tags and messages."""
    impl: str = "pipeline.backends.llamacpp.backend:LlamaCppBackend"
    """The Backend class that runs these settings (``module:Class``)."""
    api: str = "completion"
    """The client API: completion (llama.cpp's own ``/completion`` endpoint: prompts sent as
    token ids, the same tokens every other backend gets, and the output's token ids streamed
    back, so parity and perplexity are exact) | completions (OpenAI's ``/v1/completions``:
    token-id prompts, text back without ids, so parity and perplexity are not computed) |
    chat (messages; the server renders the GGUF's chat template)."""
    n_ctx: int = 4096
    """Context size in tokens of the server's KV cache, shared by all slots (llama.cpp's
    ``--ctx-size`` with a unified KV cache), at least 16; a request whose prompt plus output
    does not fit is refused."""
    n_parallel: int = 8
    """Slots: sequences decoded together by continuous batching (``--parallel``), at least
    1; requests beyond it wait in the server's queue."""
    n_threads: int | None = None
    """CPU threads for generation and prompt processing (``--threads``); null means every
    core this process may use."""
    n_batch: int = 2048
    """Logical batch: most prompt tokens submitted to one decode call (``--batch-size``),
    at least 1."""
    n_ubatch: int = 512
    """Physical batch: most tokens one compute graph runs (``--ubatch-size``), at least 1
    and at most ``n_batch``."""
    flash_attn: str = "auto"
    """llama.cpp's flash attention: auto (on where the build supports it) | on | off."""
    cache_type_k: str = "f16"
    """Element type of the K cache: f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | iq4_nl | q5_0 |
    q5_1 (a quantized cache changes the numerics)."""
    cache_type_v: str = "f16"
    """Element type of the V cache, as ``cache_type_k`` (a quantized V cache needs
    flash attention)."""
    n_gpu_layers: int = 0
    """Layers offloaded to a GPU (``--n-gpu-layers``) in a GPU build of llama.cpp; 0 keeps
    everything on the CPU, -1 offloads all. The CPU wheel ignores it."""
    cache_prompt: bool = False
    """Reuse the KV cache of a slot's previous prompt for a request sharing its prefix.
    Off by default, so that repeated prompts do not turn prefill into a cache hit."""
    gguf_type: str | None = None
    """For an HF model folder (``model=hf`` without ``model.gguf_file``) only: the type its
    weights are written in when the folder is converted to GGUF for llama.cpp, once, into
    ``gguf_dir``: F32 (no quantization) | F16 | BF16 | Q8_0 | Q5_0 | Q5_1 | Q4_0 | Q4_1
    (no K-quants); norms stay F32. null means F16 for an HF folder. Refused with the
    packaged model or with ``model.gguf_file``: those GGUFs run as they are."""
    gguf_dir: str = "outputs/cache/gguf"
    """Folder of the GGUF conversions of HF folders (one file per folder content and
    ``gguf_type``), under ``paths.cache_dir``."""
    seed: int | None = None
    """The sampling seed sent with each request; null means the run's ``seed``."""
    startup_timeout_s: float = 120.0
    """Seconds (> 0) to wait for the server's ``/health`` after starting it; past that the
    job fails, quoting the end of the server log."""
    log_dir: str = "outputs/servers"
    """Folder of the live server logs; each job copies its part to ``server.log`` in its
    job folder."""


def converts_folder(job: Job) -> bool:
    """Whether the job's model is an HF folder llama.cpp runs through a conversion (no
    ``model.gguf_file`` of its own)."""
    m = job.get("model") or {}
    return m.get("source") == "hf" and not m.get("gguf_file")


def _gguf_type(value: object, job: Job) -> object:
    """The type a converted folder is written in (null: F16); a GGUF used as it is (the
    packaged one, ``model.gguf_file``) counts as no conversion: None."""
    if not converts_folder(job):
        return None
    return value or "F16"


def _run_seed(value: object, job: Job) -> object:
    """``backend.seed`` equal to the run's seed (or null) says nothing the run does not."""
    return None if value is None or value == job.get("seed") else value


#: what each field is to the gate: the numerics of the KV cache and attention kernel are
#: optimizations (off: an f32 cache, no flash attention, nothing on a GPU, no prompt
#: cache), so llama.cpp's default f16 cache counts as one; the capacity and threading are
#: bookkeeping (a request that does not fit is refused, never computed differently); the
#: seed may change what is computed
LLAMACPP_SETTINGS: dict[str, Setting] = {
    "api": task(("completion", "completions")),
    "n_ctx": BOOKKEEPING,
    "n_parallel": BOOKKEEPING,
    "n_threads": BOOKKEEPING,
    "n_batch": BOOKKEEPING,
    "n_ubatch": BOOKKEEPING,
    "flash_attn": optimization(("off",)),
    "cache_type_k": optimization(("f32",)),
    "cache_type_v": optimization(("f32",)),
    "n_gpu_layers": optimization((0,)),
    "cache_prompt": optimization((False,)),
    # F32 is the folder's weights unquantized; a GGUF used as it is is no conversion
    "gguf_type": optimization(("F32", None), effective=_gguf_type),
    "gguf_dir": BOOKKEEPING,
    "seed": task((None,), effective=_run_seed),
    "startup_timeout_s": BOOKKEEPING,
    "log_dir": BOOKKEEPING,
}

#: what llama.cpp always does, with no switch (counted when the gate picks the
#: least-optimized job)
LLAMACPP_INHERENT = ("continuous batching", "fused CPU kernels")


def validate_llamacpp_settings(s: LlamaCppBackendConfig) -> None:
    """Range and choice checks; raises :class:`ConfigError` naming the key, the value and
    what is allowed."""
    check_choice("backend.api", s.api, LLAMACPP_APIS)
    check_range("backend.n_ctx", s.n_ctx, 16)
    check_range("backend.n_parallel", s.n_parallel, 1)
    if s.n_threads is not None:
        check_range("backend.n_threads", s.n_threads, 1)
    check_range("backend.n_batch", s.n_batch, 1)
    check_range("backend.n_ubatch", s.n_ubatch, 1, s.n_batch)
    # yaml's on/off/true/false may arrive as booleans' strings
    s.flash_attn = {"true": "on", "false": "off"}.get(str(s.flash_attn).lower(),
                                                      str(s.flash_attn).lower())
    check_choice("backend.flash_attn", s.flash_attn, FLASH_ATTN)
    check_choice("backend.cache_type_k", s.cache_type_k, CACHE_TYPES)
    check_choice("backend.cache_type_v", s.cache_type_v, CACHE_TYPES)
    if s.cache_type_v not in ("f16", "f32", "bf16") and s.flash_attn == "off":
        fail("backend.cache_type_v", s.cache_type_v,
             "a quantized V cache needs flash attention; set backend.flash_attn=auto or on")
    check_range("backend.n_gpu_layers", s.n_gpu_layers, -1)
    if s.gguf_type is not None:
        s.gguf_type = str(s.gguf_type).upper()
        check_type(s.gguf_type)
    if not s.gguf_dir:
        fail("backend.gguf_dir", s.gguf_dir, "a folder is required for converted GGUFs")
    check_range("backend.startup_timeout_s", s.startup_timeout_s, 0.0, lo_open=True)
    if not s.log_dir:
        fail("backend.log_dir", s.log_dir, "a folder is required for the server log")
