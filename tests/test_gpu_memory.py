"""Memory that fits one card (issue 24, item 4), decided by pure functions on any machine:
the scorer's dtype, which cached models leave the GPU before a vLLM engine starts, and the
free-memory check of ``gpu_memory_utilization``. No test here needs a GPU."""

from __future__ import annotations

from typing import ClassVar

import pytest

from pipeline.errors import ConfigError
from pipeline.gpu_memory import (
    backends_to_free,
    check_free_memory,
    held_gpu_engines,
    prepare_gpu_for_engine,
    scorer_dtype_name,
)

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
    from pipeline.backends.base import Backend

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
