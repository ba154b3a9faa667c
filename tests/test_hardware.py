"""The one hardware rule (pipeline/hardware.py): one test per decision, on the CPU.

The CUDA cards are the shipped ``+target`` yamls (conf/target/): the rule is a pure function
of the hardware description, so a T4 or an H100 is decided here exactly as on the card.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline import hardware
from pipeline.backends.vllm.config import VLLMBackendConfig, engine_eager
from pipeline.backends.vllm.engine import VLLMBackend
from pipeline.config import ModelConfig, register_configs
from pipeline.errors import ConfigError
from pipeline.job_checks import check_inputs
from tests.conftest import ROOT, assert_refused_early

register_configs()


def _spec(*overrides: str):  # noqa: ANN202 - a validated Config
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    spec, _ = check_inputs(cfg)
    return spec


def _decide(*overrides: str) -> dict:
    spec = _spec(*overrides)
    return hardware.decide(spec, hardware.for_spec(spec)).settings


def test_t4_dtype_auto_is_float16_and_ampere_bfloat16() -> None:
    assert _decide("dry_run=true", "+target=t4", "model.dtype=auto")["dtype"] == "float16"
    assert _decide("dry_run=true", "+target=a100-40gb")["dtype"] == "bfloat16"
    assert _decide("dry_run=true", "+target=l4", "backend=vllm")["dtype"] == "bfloat16"


def test_cpu_defaults_are_unchanged() -> None:
    """The shipped default (model.dtype=auto now) is float32 on the CPU, vLLM eager, and
    hf_fast compiles without CUDA graphs, as before."""
    assert _spec().model.dtype == "auto"
    d = _decide()
    assert d["dtype"] == "float32" and d["cuda_graphs"] is False
    assert _decide("+target=cpu", "dry_run=true")["dtype"] == "float32"
    fast = _decide("backend=hf_fast")
    assert fast["compile_mode"] == "max-autotune-no-cudagraphs" and fast["dtype"] == "bfloat16"


def test_bfloat16_below_ampere_is_refused() -> None:
    assert_refused_early([
        (["dry_run=true", "+target=t4", "backend=vllm", "model.dtype=bfloat16"],
         "model.dtype='bfloat16' is invalid on Tesla T4 (target t4, cuda, compute "
         "capability 7.5, 15.0 GiB): bfloat16 needs compute capability >= 8.0; use "
         "model.dtype=float16 or auto"),
        # hf_fast runs bf16 (the fastest CPU path): on a T4 the fix is its own key
        (["dry_run=true", "+target=t4", "backend=hf_fast"],
         "backend.dtype='bfloat16' is invalid on Tesla T4"),
    ])


def test_t4_flash_attention_2_is_refused_naming_the_fix() -> None:
    assert_refused_early([
        (["dry_run=true", "+target=t4", "backend.attn_implementation=flash_attention_2"],
         "backend.attn_implementation='flash_attention_2' is invalid on Tesla T4 (target "
         "t4, cuda, compute capability 7.5, 15.0 GiB): missing compute capability >= 8.0"),
    ])
    with pytest.raises(ConfigError, match="use sdpa instead"):
        _spec("dry_run=true", "+target=t4", "backend.attn_implementation=flash_attention_2")


def test_flash_attention_2_on_an_ampere_target_reports_the_package() -> None:
    """On a target the package is checked on the GPU machine: reported, not refused."""
    spec = _spec("dry_run=true", "+target=a100-80gb",
                 "backend.attn_implementation=flash_attention_2")
    d = hardware.decide(spec, hardware.for_spec(spec))
    assert d.settings["attn_implementation"] == "flash_attention_2"
    assert any("flash-attn is not installed here" in n for n in d.notes)
    # in float32 it is refused (FA2 has no float32 kernel)
    with pytest.raises(ConfigError, match="missing float16/bfloat16 weights"):
        hardware.check_attention("flash_attention_2", "float32", hardware.from_target(
            spec.target), flash_attn_installed=True)


def test_sdpa_flash_float32_on_cuda_is_refused_as_documented() -> None:
    assert_refused_early([
        (["dry_run=true", "+target=a100-80gb", "backend.attn_implementation=sdpa_flash",
          "model.dtype=float32"],
         "backend.attn_implementation='sdpa_flash' is invalid on NVIDIA A100-SXM4-80GB "
         "(target a100-80gb, cuda, compute capability 8.0, 80.0 GiB) in float32: PyTorch's "
         "flash kernel runs only in float16/bfloat16"),
        # batches of unequal prompts are left-padded: a mask the flash kernel does not take
        (["dry_run=true", "+target=a100-80gb", "backend.attn_implementation=sdpa_flash"],
         "with left-padded batches"),
    ])
    ok = _decide("dry_run=true", "+target=a100-80gb", "backend.attn_implementation=sdpa_flash",
                 "workload.batch_size=1")
    assert ok["dtype"] == "bfloat16"
    # on the CPU PyTorch's flash kernel takes float32 and a mask: unchanged
    assert _decide("backend.attn_implementation=sdpa_flash")["dtype"] == "float32"


def test_h100_vllm_runs_cuda_graphs() -> None:
    d = _decide("dry_run=true", "+target=h100-80gb", "backend=vllm")
    assert d["enforce_eager"] is False and d["cuda_graphs"] is True
    assert _decide("dry_run=true", "+target=h100-80gb", "backend=vllm_server")[
        "enforce_eager"] is False
    # an explicit setting wins over the rule
    assert _decide("dry_run=true", "+target=h100-80gb", "backend=vllm",
                   "backend.enforce_eager=true")["enforce_eager"] is True


def test_cpu_vllm_stays_eager() -> None:
    assert _decide("backend=vllm")["enforce_eager"] is True
    # what the engine is handed on this (CPU) machine: vllm.LLM(enforce_eager=True)
    cfg = VLLMBackendConfig()
    assert cfg.enforce_eager == "auto"
    assert engine_eager(cfg, ModelConfig(device="auto")) is True
    engine = VLLMBackend("unused-model-dir", ModelConfig(device="auto"), cfg, seed=0)
    assert engine.engine_kwargs("float32")["enforce_eager"] is True


def test_hf_fast_compiles_with_cuda_graphs_on_cuda() -> None:
    d = _decide("dry_run=true", "+target=h100-80gb", "backend=hf_fast", "backend.dtype=null")
    assert d["compile_mode"] == "reduce-overhead" and d["cuda_graphs"] is True
    assert hardware.compile_mode("auto", hardware.live("cpu")) == "max-autotune-no-cudagraphs"


def test_a_gpu_target_stands_in_for_the_device_only_in_a_dry_run(tmp_path: Path) -> None:
    # no local CUDA needed in a dry run, model.device=cuda included
    assert _decide("dry_run=true", "+target=t4", "model.device=cuda")["dtype"] == "float16"
    assert_refused_early([
        (["+target=t4"], "target='t4' is invalid for a real run here: this machine has"),
        (["dry_run=true", "+target=t4", "model.device=cpu"],
         "model.device='cpu' is invalid with +target=t4 (a cuda target)"),
    ])
    # without a target nothing changed: model.device=cuda without CUDA is refused
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        _spec("model.device=cuda")


def test_capability_parsing() -> None:
    assert hardware.parse_capability("7.5") == (7, 5)
    assert hardware.parse_capability(None, "cpu") is None
    with pytest.raises(ConfigError, match="target.compute_capability='sm75' is invalid"):
        hardware.parse_capability("sm75")
