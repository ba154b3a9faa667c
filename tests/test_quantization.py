"""Weight quantization: refusals before loading, stored bytes read back, and int8 on the
real model (applied settings, roofline bytes, no scorer borrowing)."""

from __future__ import annotations

import pytest

from pipeline.backends.hf import HFBackend
from pipeline.backends.hf import quantization as hq
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.measure.roofline import roofline_metrics
from tests.conftest import compose_config


def _check(*overrides: str) -> None:
    HFBackend.check(validate(compose_config(*overrides)))


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ConfigError, match="backend.quantization='int3'"):
        validate(compose_config("backend.quantization=int3"))


def test_int4_without_a_cpu_kernel_is_refused() -> None:
    with pytest.raises(ConfigError, match="no CPU int4 weight-only kernel"):
        _check("backend.quantization=int4_weight_only", "model.device=cpu")


def test_bitsandbytes_on_cpu_is_refused() -> None:
    for q in ("bnb_int8", "bnb_4bit"):
        with pytest.raises(ConfigError, match="CUDA only"):
            _check(f"backend.quantization={q}", "model.device=cpu")


def test_int8_dynamic_needs_float32_and_no_compile() -> None:
    with pytest.raises(ConfigError, match="takes a float32 model"):
        _check("backend.quantization=int8_dynamic", "backend.dtype=bfloat16")
    with pytest.raises(ConfigError, match="compile=false"):
        _check("backend.quantization=int8_dynamic", "backend.compile=true")
    _check("backend.quantization=int8_dynamic", "model.dtype=float32")


def test_weight_bytes_count_packed_int8_weights_once() -> None:
    import torch
    from torch import nn

    m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8, bias=False))
    assert hq.weight_bytes(m) == 4 * (64 * 32 + 32 + 32 * 8)
    n = sum(p.numel() for p in m.parameters())
    q = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    applied = hq.applied_quantization(q, "int8_dynamic", n)
    # int8 weights (1 byte) + float32 bias (4 bytes)
    assert applied["weight_bytes"] == 64 * 32 + 32 * 8 + 4 * 32
    assert applied["quantized_linear_layers"] == 2
    assert applied["bytes_per_parameter"] == pytest.approx(applied["weight_bytes"] / n,
                                                           abs=1e-4)


def test_roofline_uses_the_applied_bytes(tmp_path) -> None:
    import json

    from pipeline.measure.roofline import machine_key

    f = tmp_path / "roofline" / f"{machine_key('cpu', 'float32')}.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"bandwidth_bytes_per_s": 1e10, "matmul_flops_per_s": 1e15}))
    base = {"num_parameters": 1_000_000, "dtype": "float32", "device": "cpu"}
    fp32 = roofline_metrics(base, 1, 100.0, tmp_path)
    int8 = roofline_metrics({**base, "bytes_per_parameter": 1.0}, 1, 100.0, tmp_path)
    assert fp32["roofline_tokens_per_s"] == pytest.approx(1e10 / 4e6)
    assert int8["roofline_tokens_per_s"] == pytest.approx(4 * fp32["roofline_tokens_per_s"])
    assert int8["roofline_bytes_per_parameter"] == 1.0


@pytest.mark.slow
def test_int8_dynamic_on_the_real_model(model_dir: str) -> None:
    import torch

    from pipeline.backends.hf import HFBackendConfig
    from pipeline.config import DecodingConfig, ModelConfig
    from pipeline.workload import make_requests

    with HFBackend(model_dir, ModelConfig(dtype="float32", device="cpu"),
                   HFBackendConfig(quantization="int8_dynamic"), seed=0) as b:
        reqs = make_requests(["Tell me about the sea."], b.tokenizer, use_chat_template=True)
        rec = b.generate(reqs, DecodingConfig(), max_new_tokens=8, fixed_length=True)[0]
        applied = b.applied_settings()
        assert rec.output_tokens == 8
        assert b.scorer_model(torch.float32) is None  # never scores with int8 weights
    assert applied["quantization"] == "int8_dynamic"
    assert applied["quantized_linear_layers"] > 100
    assert 1.0 < applied["bytes_per_parameter"] < 2.5  # fp32 embedding stays, int8 linears
    assert applied["num_parameters"] > 100_000_000  # the unquantized architecture's count


def test_same_shaped_quantized_layers_are_all_counted() -> None:
    import torch
    from torch import nn

    m = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(3)])
    q = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    assert hq.weight_bytes(q) == 3 * 16 * 16
