"""Memory that fits one card (issue 24, item 4), decided by pure functions on any machine:
the scorer's dtype, which cached models leave the GPU before a vLLM engine starts, and the
free-memory check of ``gpu_memory_utilization``. No test here needs a GPU."""

from __future__ import annotations

from typing import ClassVar

import pytest

from pipeline.errors import ConfigError
from pipeline.gpu_memory import (
    backends_to_free,
    check_estimate_fits_free,
    check_free_memory,
    free_gpu_for,
    held_gpu_engines,
    prepare_gpu_for_engine,
    scorer_dtype_name,
)
from pipeline.hardware import Hardware

GiB = 2**30


def test_scorer_dtype_auto_is_the_generating_dtype_on_cuda_and_float32_on_cpu() -> None:
    # CUDA: the loaded bf16/fp16 model is the scorer, no second float32 copy
    assert scorer_dtype_name("auto", "cuda", "bfloat16") == "bfloat16"
    assert scorer_dtype_name("auto", "cuda", "float16") == "float16"
    assert scorer_dtype_name("auto", "cuda", "float32") == "float32"
    # CPU: unchanged scores, always float32
    assert scorer_dtype_name("auto", "cpu", "bfloat16") == "float32"
    # explicit values win everywhere
    assert scorer_dtype_name("float32", "cuda", "bfloat16") == "float32"
    assert scorer_dtype_name("bfloat16", "cpu", "float32") == "bfloat16"
    # no HF dtype to reuse (an endpoint, an int8 engine): the card's half dtype
    assert scorer_dtype_name("auto", "cuda", None, cuda_auto_dtype="float16") == "float16"
    assert scorer_dtype_name("auto", "cuda", "int8") == "bfloat16"


def test_scorer_dtype_defaults_to_auto() -> None:
    import yaml

    from pipeline.config import ScoringConfig
    from tests.conftest import ROOT

    assert ScoringConfig().scorer_dtype == "auto"
    conf = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    assert conf["scoring"]["scorer_dtype"] == "auto"


def test_cached_gpu_models_of_other_backends_are_freed_on_cuda_only() -> None:
    held = {"HFBackend": 1, "VLLMServerBackend": 0, "VLLMBackend": 1}
    assert backends_to_free("VLLMBackend", "cuda", held) == ["HFBackend"]
    assert backends_to_free("VLLMServerBackend", "cuda", held) == ["HFBackend", "VLLMBackend"]
    # on the CPU nothing is freed: CPU sweeps behave as before
    assert backends_to_free("VLLMBackend", "cpu", held) == []


@pytest.mark.parametrize(("free", "total", "util", "ok"), [
    (79 * GiB, 80 * GiB, 0.9, True),
    (72 * GiB, 80 * GiB, 0.9, True),    # exactly 0.9 x 80 GiB
    (30 * GiB, 80 * GiB, 0.9, False),   # an HF model or another process holds 50 GiB
    (14 * GiB, 15 * GiB, 0.95, False),  # a T4 with 1 GiB taken by this process's context
])
def test_free_memory_check(free: int, total: int, util: float, ok: bool) -> None:
    if ok:
        check_free_memory(free, total, util)
        return
    with pytest.raises(ConfigError) as e:
        check_free_memory(free, total, util)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"backend.gpu_memory_utilization={util} is invalid")
    assert f"only {free} bytes are free" in msg and f"{total} bytes total" in msg
    fits = int(free / total * 100) / 100
    assert f"lower backend.gpu_memory_utilization to {fits:.2f} or less" in msg
    check_free_memory(free, total, fits)  # the fix it names is accepted


def _holder_class(calls: list[str]) -> type:
    import gc

    from pipeline.backends.base import Backend

    # the fake classes of earlier tests share this name; collected here so that the walk
    # over loaded classes (weak references) finds only this one
    gc.collect()

    class FakeGPUBackend(Backend):
        """Stands for a backend that keeps a model on a GPU between jobs: a stub, because
        no model can be resident on a GPU on a CPU machine. It is a real Backend subclass,
        so the registry walk that finds the holders is the real one."""

        name = "fake_gpu"
        models: ClassVar[int] = 1

        @classmethod
        def cached_engines(cls) -> int:
            calls.append("count")
            return cls.models

        @classmethod
        def shutdown_cached(cls) -> int:
            calls.append("shutdown")
            n, cls.models = cls.models, 0
            return n

        def load(self) -> None:  # pragma: no cover - never loaded
            raise NotImplementedError

        def generate(self, *a: object, **k: object) -> list:  # pragma: no cover
            raise NotImplementedError

    return FakeGPUBackend


def test_engine_start_frees_other_gpu_models_before_reading_free_memory() -> None:
    # The call order on CUDA, observed on the CPU: the other backend's cached model is
    # stopped first, then the free memory is read (so what was freed counts), then checked.
    from pipeline.backends.vllm.engine import VLLMBackend

    calls: list[str] = []
    holder = _holder_class(calls)
    assert held_gpu_engines()["FakeGPUBackend"][0] == 1

    def mem_get_info(i: int) -> tuple[int, int]:
        calls.append(f"mem_get_info({i})")
        return 79 * GiB, 80 * GiB

    calls.clear()
    freed = prepare_gpu_for_engine(VLLMBackend, "cuda", 0.9, gpus=1,
                                   mem_get_info=mem_get_info)
    assert freed == ["FakeGPUBackend"] and holder.models == 0
    assert calls.index("shutdown") < calls.index("mem_get_info(0)")

    # too little free after freeing: the one-line refusal names the key
    holder.models = 1
    with pytest.raises(ConfigError, match=r"backend.gpu_memory_utilization=0.9 is invalid"):
        prepare_gpu_for_engine(VLLMBackend, "cuda", 0.9,
                               mem_get_info=lambda i: (10 * GiB, 80 * GiB))

    # on the CPU: nothing freed, memory never read
    holder.models = 1
    calls.clear()
    assert prepare_gpu_for_engine(VLLMBackend, "cpu", 0.9, mem_get_info=mem_get_info) == []
    assert calls == [] and holder.models == 1
    holder.models = 0  # later tests in this process see no holder


# ------------------------------------------------ an HF load frees the GPU of idle engines


def test_idle_vllm_engines_leave_the_gpu_before_an_hf_model_loads() -> None:
    # the decision: on CUDA every other holder goes (an idle vLLM engine keeps
    # gpu_memory_utilization of the card), HF's own cache is left to its load
    held = {"HFLoading": 1, "VLLMBackend": 1, "VLLMServerBackend": 2, "Other": 0}
    assert backends_to_free("HFLoading", "cuda", held) == ["VLLMBackend", "VLLMServerBackend"]
    assert backends_to_free("HFLoading", "cpu", held) == []

    # through the Backend API: the holder's shutdown_cached runs, the HF cache is not touched
    from pipeline.backends.hf import HFBackend

    calls: list[str] = []
    holder = _holder_class(calls)
    assert free_gpu_for(HFBackend, "cuda") == ["FakeGPUBackend"]
    assert holder.models == 0 and "shutdown" in calls
    holder.models = 1
    calls.clear()
    assert free_gpu_for(HFBackend, "cpu") == [] and calls == [] and holder.models == 1
    holder.models = 0


@pytest.mark.slow
def test_hf_load_asks_to_free_the_gpu_before_loading(model_dir: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The HF load calls :func:`free_gpu_for` with its class and device before it loads a
    model (a recorder that calls through: on this CPU machine the call frees nothing, and
    a model cannot be put on a GPU here to show the freeing itself)."""
    from pipeline import gpu_memory
    from pipeline.backends.hf import HFBackend, HFBackendConfig, loading
    from pipeline.config import ModelConfig

    seen: list[tuple[type, str, bool]] = []
    real = gpu_memory.free_gpu_for

    def recording(starting: type, device: str) -> list[str]:
        seen.append((starting, device, bool(loading._LOADED)))
        return real(starting, device)

    monkeypatch.setattr(gpu_memory, "free_gpu_for", recording)
    HFBackend.shutdown_cached()  # nothing cached: this load really loads
    with HFBackend(model_dir, ModelConfig(device="cpu"), HFBackendConfig(), seed=0) as b:
        assert b.model is not None
    assert seen == [(HFBackend, "cpu", False)]  # before the model existed


# ------------------------------------------- the estimate against the free memory (real runs)


def test_estimate_against_free_memory_hand_worked() -> None:
    # a 1B-parameter model in float32 on a T4: 4.0 GB weights + 0.5 GB KV cache + 0.1 GB
    # activations = 4,600,000,000 bytes needed
    terms = {"weights": 4_000_000_000, "KV cache (8 x 512 tokens)": 500_000_000,
             "activations": 100_000_000}
    need = sum(terms.values())
    assert need == 4_600_000_000
    check_estimate_fits_free("llama-1b", need, 4_600_000_000, terms=terms)  # exactly fits
    with pytest.raises(ConfigError) as e:
        check_estimate_fits_free("llama-1b", need, 4_599_999_999, terms=terms,
                                 dtype="float32", total=15 * GiB)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model=llama-1b does not fit in the free memory of cuda:0: "
                          "the estimate is 4,600,000,000 bytes (weights 4.00 GB, KV cache "
                          "(8 x 512 tokens) 0.50 GB, activations 0.10 GB), but only "
                          "4,599,999,999 bytes are free (4.3 of 15.0 GiB")
    assert "model.dtype=auto (half precision on CUDA)" in msg  # float32: halve it
    assert "workload.batch_size" in msg and "a card with more memory" in msg
    with pytest.raises(ConfigError) as e:  # already half precision: that fix is not offered
        check_estimate_fits_free("llama-1b", need, 1, dtype="float16")
    assert "model.dtype" not in str(e.value)


T4 = Hardware(device="cuda", name="Tesla T4", capability=(7, 5), memory_bytes=15 * GiB)


def _prepared(*overrides: str) -> tuple:
    from pipeline.job_checks import check_inputs
    from pipeline.workload.prepare import prepare_requests
    from tests.conftest import compose_config

    spec, prompts = check_inputs(compose_config(*overrides))
    prepared = prepare_requests(spec, prompts)
    return spec, prepared.model_dir, prepared.requests


def test_real_cuda_run_refuses_an_estimate_over_the_free_memory() -> None:
    """The pre-load check of a real run, on a T4 described by hand (no GPU here): the
    other backends' engines leave first, then the estimate less the CUDA context is held
    against the free bytes plus what this process's allocator holds."""
    from pipeline.hardware import decide
    from pipeline.job_checks import check_memory_before_load
    from pipeline.memory_plan import CUDA_CONTEXT_BYTES, plan, read_architecture

    spec, model_dir, requests = _prepared()
    expected = plan(spec, decide(spec, T4), read_architecture(model_dir), requests)
    assert expected is not None and expected.items["CUDA context"] == CUDA_CONTEXT_BYTES
    need = expected.total - CUDA_CONTEXT_BYTES
    calls: list[str] = []
    holder = _holder_class(calls)

    def mem(free: int) -> object:
        def mem_get_info() -> tuple[int, int]:
            calls.append("mem_get_info")
            return free, 15 * GiB
        return mem_get_info

    # the free bytes and this process's own cached model together are exactly enough
    got = check_memory_before_load(spec, model_dir, requests, hw=T4,
                                   mem_get_info=mem(need - 1000), reserved=lambda: 1000)
    assert got is not None and got.total == expected.total
    assert calls.index("shutdown") < calls.index("mem_get_info")  # freed, then read
    with pytest.raises(ConfigError) as e:
        check_memory_before_load(spec, model_dir, requests, hw=T4,
                                 mem_get_info=mem(need - 1001), reserved=lambda: 1000)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model={spec.model.name} does not fit")
    assert f"the estimate is {need:,} bytes" in msg and f"only {need - 1:,} bytes" in msg
    assert "model.dtype=auto" not in msg  # float16 on a T4 already

    # the CPU, and dry runs (checked against their +target instead): nothing read
    calls.clear()
    assert check_memory_before_load(spec, model_dir, requests, mem_get_info=mem(0),
                                    reserved=lambda: 0) is None
    dry, _, _ = _prepared("dry_run=true")
    assert check_memory_before_load(dry, model_dir, requests, hw=T4, mem_get_info=mem(0),
                                    reserved=lambda: 0) is None
    assert calls == []
    holder.models = 0


def test_real_cuda_vllm_run_checks_its_share_not_the_free_memory() -> None:
    """vLLM: the estimate against ``gpu_memory_utilization`` x the card; the free memory
    is the engine start's check (check_free_memory), not read a second time here."""
    from pipeline.job_checks import check_memory_before_load

    read: list[int] = []

    def mem_get_info() -> tuple[int, int]:
        read.append(1)
        return 0, 15 * GiB

    spec, model_dir, requests = _prepared("backend=vllm")
    assert check_memory_before_load(spec, model_dir, requests, hw=T4,
                                    mem_get_info=mem_get_info) is not None
    # 0.01 x 15 GiB = 161 MB, below the 135M model's 270 MB of float16 weights
    small, _, _ = _prepared("backend=vllm", "backend.gpu_memory_utilization=0.01")
    with pytest.raises(ConfigError, match=r"does not fit on Tesla T4 .* 161,061,273 bytes"):
        check_memory_before_load(small, model_dir, requests, hw=T4,
                                 mem_get_info=mem_get_info)
    # the weights fit its share, one max_model_len sequence's KV cache does not: the fix
    # names the vLLM keys
    p = check_memory_before_load(spec, model_dir, requests, hw=T4, mem_get_info=mem_get_info)
    assert p is not None
    kv = next(v for k, v in p.items.items() if k.startswith("KV cache"))
    util = round((p.items["weights"] + kv / 2) / T4.memory_bytes, 6)
    tight, _, _ = _prepared("backend=vllm", f"backend.gpu_memory_utilization={util}")
    with pytest.raises(ConfigError, match=r"use a smaller backend.max_model_len, a higher "
                                          r"backend.gpu_memory_utilization"):
        check_memory_before_load(tight, model_dir, requests, hw=T4,
                                 mem_get_info=mem_get_info)
    assert read == []
