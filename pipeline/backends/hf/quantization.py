"""Weight quantization for the transformers backend, and the bytes the weights really take.

``backend.quantization``:

- ``int8_dynamic``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``
  (int8 weights with one scale per output channel, activations quantized per batch at run
  time); CPU only, float32 model only
  (the quantized linear kernels are fbgemm/onednn CPU kernels taking float32 activations).
- ``int4_weight_only``: torchao's ``Int4WeightOnlyConfig``. Refused on CPU: torchao 0.18.0
  (the newest for torch 2.13) has no CPU path (measured on this machine: ``plain`` and
  ``preshuffled`` need the ``mslk`` package, ``plain_int32`` says "does not support device
  'cpu' yet", ``tile_packed_to_4d`` needs CUDA), and torchao is not installed here.
- ``bnb_int8`` / ``bnb_4bit``: bitsandbytes through transformers' ``BitsAndBytesConfig``;
  CUDA only.

``weight_bytes`` reads back what the loaded model stores: every parameter and buffer plus
the packed weights of quantized linear layers (which are not ``parameters()``), each tensor
once. ``bytes_per_parameter`` divides it by the parameter count of the unquantized
architecture, and the roofline uses it instead of the dtype's width.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from pipeline.config import check_choice
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config

QUANTIZATIONS = ("int8_dynamic", "int4_weight_only", "bnb_int8", "bnb_4bit")


def validate_quantization(cfg: Any) -> None:
    """``backend.quantization`` is null or one of :data:`QUANTIZATIONS`."""
    if cfg.quantization is not None:
        check_choice("backend.quantization", cfg.quantization, QUANTIZATIONS)


def _effective_dtype(spec: Config) -> str:
    return str(getattr(spec.backend, "dtype", None) or spec.model.dtype)


def check_quantization(spec: Config) -> None:
    """Refuse quantization settings this machine or model cannot run, before loading (only
    package lookups, no import of torch)."""
    q = spec.backend.quantization
    if q is None:
        return
    device, key = spec.model.device, f"backend.quantization={q!r}"
    if spec.model.weights != "pretrained":
        raise ConfigError(f"{key} is invalid with model.weights={spec.model.weights!r}: "
                          "quantizing random weights measures nothing; use pretrained weights")
    if spec.backend.compile:
        raise ConfigError(f"{key} is invalid with backend.compile=true (not supported by this "
                          "backend: quantized linear modules are not traced); set compile=false")
    if q == "int8_dynamic":
        if device == "cuda":
            raise ConfigError(f"{key} is invalid with model.device='cuda': torch's dynamic int8 "
                              "linear kernels are CPU-only; use bnb_int8 on CUDA")
        if _effective_dtype(spec) not in ("float32", "auto"):
            raise ConfigError(f"{key} is invalid with dtype {_effective_dtype(spec)!r}: dynamic "
                              "int8 quantization takes a float32 model; set backend.dtype=float32")
    elif q == "int4_weight_only":
        if device == "cpu":
            raise ConfigError(f"{key} is invalid on CPU: torchao 0.18 (the release for torch "
                              "2.13) has no CPU int4 weight-only kernel; use int8_dynamic on CPU")
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError(f"{key} needs the torchao package (not installed; pip install "
                              "torchao) and a CUDA GPU; use int8_dynamic on CPU")
    else:  # bitsandbytes
        if device == "cpu":
            raise ConfigError(f"{key} is invalid on CPU: bitsandbytes quantization runs on "
                              "CUDA only here; use int8_dynamic on CPU or model.device=cuda")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{key} needs the bitsandbytes package (not installed; pip "
                              "install bitsandbytes) and a CUDA GPU; use int8_dynamic on CPU")


def check_device(q: str | None, device: str) -> None:
    """The load-time half of :func:`check_quantization`, once ``model.device=auto`` is
    resolved."""
    if q is None:
        return
    if q == "int8_dynamic" and device != "cpu":
        raise ConfigError(f"backend.quantization='int8_dynamic' is invalid on {device}: "
                          "CPU-only kernels; set model.device=cpu")
    if q != "int8_dynamic" and device != "cuda":
        raise ConfigError(f"backend.quantization={q!r} is invalid on {device}: it needs a "
                          "CUDA GPU here; use int8_dynamic on CPU")


def from_pretrained_kwargs(q: str | None, dtype: Any) -> dict[str, Any]:
    """What ``from_pretrained`` needs for load-time quantization (bitsandbytes)."""
    if q not in ("bnb_int8", "bnb_4bit"):
        return {}
    from transformers import BitsAndBytesConfig

    if q == "bnb_int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True),
                "device_map": "cuda"}
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4"),
        "device_map": "cuda"}


def quantize_loaded(model: Any, q: str | None) -> Any:
    """Quantize an already loaded model in place where the method works after loading."""
    if q == "int8_dynamic":
        import torch
        from torch import nn
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # per output channel: one scale per row. The default ({nn.Linear} -> one scale per
        # tensor) measured KL 1.5 nats/token and +505% perplexity against float32 on the
        # packaged model (docs/speculative-quantization.md); rows of an LLM's weight
        # matrices differ too much in range for a single scale
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)
    if q == "int4_weight_only":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        quantize_(model, Int4WeightOnlyConfig(group_size=128))
    return model


def _tensor_bytes(t: Any) -> int:
    return int(t.numel() * t.element_size())


def weight_bytes(model: Any) -> int:
    """Bytes of every stored tensor of ``model``: parameters, buffers and the packed weights
    (and biases) of torch's dynamically quantized linear layers, each storage once."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if t is None:
            return
        # tied weights (embedding = lm_head) share a storage: counted once
        key = hash((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)))
        if key in seen:
            return
        seen.add(key)
        total += _tensor_bytes(t)

    for p in model.parameters():
        add(p)
    for b in model.buffers():
        add(b)
    for mod in model.modules():  # each module once; its packed weights are its own
        packed = getattr(mod, "_packed_params", None)
        if packed is not None and hasattr(mod, "weight") and callable(mod.weight):
            # not by storage: a quantized tensor unpacked from fbgemm reports no stable
            # storage pointer, and deduplicating by one merged every same-shaped layer
            total += _tensor_bytes(mod.weight())
            bias = mod.bias() if callable(getattr(mod, "bias", None)) else None
            total += _tensor_bytes(bias) if bias is not None else 0
    return total


def applied_quantization(model: Any, q: str | None, num_parameters: int) -> dict[str, Any]:
    """What the loaded model holds: the method, its stored bytes, bytes per parameter and
    how many linear layers were actually quantized."""
    quantized = sum(1 for m in model.modules()
                    if type(m).__module__.startswith(("torch.ao.nn.quantized",
                                                      "torch.nn.quantized", "bitsandbytes"))
                    and type(m).__name__ in ("Linear", "Linear8bitLt", "Linear4bit"))
    wb = weight_bytes(model)
    return {
        "quantization": q,
        "quantized_linear_layers": quantized if q else 0,
        "weight_bytes": wb,
        "bytes_per_parameter": round(wb / num_parameters, 4) if num_parameters else None,
    }
