"""The gate's teacher-forced KL (``pipeline.analysis.gate.teacher_forced``) on the real
packaged model.

Both settings score the same token sequences (the built-in prompts of ``workload=quick``
and a fixed continuation): the same settings twice must give KL 0 and equal NLLs; dynamic
int8 quantization of the linear layers really changes the numerics and must give KL > 0.
The three scorings run once for the module (two model loads: float32, then int8).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.analysis import gate
from pipeline.config import register_configs
from pipeline.records import JobResult
from tests.conftest import CACHE_DIR, ROOT

pytestmark = pytest.mark.slow
register_configs()

#: a continuation scored after each prompt (any tokens will do: both settings score the
#: same ones)
CONTINUATION = " The answer is short, clear and written for a curious reader."


def _job(num: int, tokens: list[int], *overrides: str) -> JobResult:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "backend=hf", "model.dtype=float32", "model.device=cpu",
            "workload.num_prompts=2", f"paths.cache_dir={CACHE_DIR}", *overrides])
    config: Any = OmegaConf.to_container(cfg, resolve=True)
    return JobResult(status="FINISHED", job_num=num, config=config,
                     requests=[{"index": i, "output_token_ids": tokens} for i in range(2)])


@pytest.fixture(scope="module")
def scored(model_dir: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(model_dir)(CONTINUATION)["input_ids"]
    base = _job(0, tokens)
    same = _job(1, tokens)
    int8 = _job(2, tokens, "backend.quantization=int8_dynamic")
    return {"n": 2 * len(tokens),
            "same": gate.teacher_forced(base, same, CACHE_DIR, max_requests=2),
            "int8": gate.teacher_forced(base, int8, CACHE_DIR, max_requests=2)}


def test_same_settings_give_zero_kl_and_equal_nlls(scored: dict[str, Any]) -> None:
    kls, nll_b, nll_o = scored["same"]
    assert len(kls) == len(nll_b) == len(nll_o) == scored["n"]
    assert max(kls) < 1e-9
    assert nll_o == pytest.approx(nll_b, abs=1e-6)


def test_int8_weights_change_the_distributions(scored: dict[str, Any]) -> None:
    kls, nll_b, nll_o = scored["int8"]
    assert len(kls) == scored["n"]
    mean_kl = sum(kls) / len(kls)
    # far above float32 noise (the same settings give 0); on this 135M model int8 dynamic
    # quantization moves the distributions a lot (docs/speculative-quantization.md: degraded)
    assert math.isfinite(mean_kl) and mean_kl > 1e-3
    assert nll_o != pytest.approx(nll_b, abs=1e-6)
    # the float32 baseline's NLLs are the same in both comparisons (one reference)
    assert nll_b == pytest.approx(scored["same"][1], abs=1e-6)
