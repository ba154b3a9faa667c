"""What each ``backend.*`` field of the transformers backend is to the gate
(:data:`HF_SETTINGS`), with the ``auto`` values resolved as a job ran them."""

from __future__ import annotations

from typing import Any

from pipeline import hardware
from pipeline.backends.base import BOOKKEEPING, Job, Setting, backend_of, optimization
from pipeline.backends.hf import static as hst
from pipeline.backends.hf.config import HFBackendConfig
from pipeline.config import DecodingConfig


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
