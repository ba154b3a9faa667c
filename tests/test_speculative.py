"""Speculative decoding: refusals before loading, the step arithmetic, and (real model,
fp32 greedy) token-exact output with prompt lookup and with a draft model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.backends.hf import HFBackend
from pipeline.backends.hf import speculative as hs
from pipeline.backends.vllm.engine import VLLMBackend
from pipeline.config import validate
from pipeline.errors import ConfigError, UnsupportedDecoding
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parent.parent


def _spec(*overrides: str):
    return validate(compose_config(*overrides))


def _check(*overrides: str) -> None:
    """Validate, then ask the backend class the yaml names (what run.py does)."""
    spec = _spec(*overrides)
    cls = VLLMBackend if "backend=vllm" in overrides else HFBackend
    cls.check(spec)


# ------------------------------------------------------------------ refusals, no model


def test_beam_search_with_prompt_lookup_is_refused() -> None:
    with pytest.raises(UnsupportedDecoding, match="num_beams=4"):
        _check("decoding=beam", "backend.prompt_lookup_num_tokens=5")


def test_batch_above_one_with_prompt_lookup_is_refused() -> None:
    with pytest.raises(ConfigError, match="batch size 1 only"):
        _check("workload.batch_size=4", "backend.prompt_lookup_num_tokens=5")


def test_static_cache_and_compile_with_speculation_are_refused() -> None:
    with pytest.raises(ConfigError, match="cache_implementation=dynamic"):
        _check("workload.batch_size=1", "backend.prompt_lookup_num_tokens=5",
               "backend.cache_implementation=static")
    with pytest.raises(ConfigError, match="compile=false"):
        _check("workload.batch_size=1", "backend.prompt_lookup_num_tokens=5",
               "backend.compile=true")


def test_draft_model_hub_id_and_both_proposers_are_refused() -> None:
    with pytest.raises(ConfigError, match="local model folder"):
        _spec("backend.draft_model=HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(ConfigError, match="one proposer at a time"):
        _spec("backend.draft_model=/tmp", "backend.prompt_lookup_num_tokens=3")


def test_zero_and_null_mean_off() -> None:
    _check("workload.batch_size=4", "backend.prompt_lookup_num_tokens=0")  # no refusal
    assert not hs.speculation_on(_spec("backend.prompt_lookup_num_tokens=0").backend)


def test_vllm_speculative_options_it_lacks_are_refused() -> None:
    with pytest.raises(ConfigError, match="speculative_method='eagle'"):
        _spec("backend=vllm", "backend.speculative_method=eagle")
    with pytest.raises(ConfigError, match="only apply to backend.speculative_method=ngram"):
        _spec("backend=vllm", "backend.prompt_lookup_max=4")
    with pytest.raises(ConfigError, match="local model folder"):
        _spec("backend=vllm", "backend.speculative_method=draft_model",
              "backend.speculative_model=org/draft")
    with pytest.raises(UnsupportedDecoding, match="beam"):
        _check("backend=vllm", "backend.speculative_method=ngram", "decoding=beam")


def test_vllm_speculative_config_is_built_from_the_keys() -> None:
    from pipeline.backends.vllm.speculative import speculative_config

    b = _spec("backend=vllm", "backend.speculative_method=ngram",
              "backend.num_speculative_tokens=5", "backend.prompt_lookup_max=4").backend
    assert speculative_config(b) == {"method": "ngram", "num_speculative_tokens": 5,
                                     "prompt_lookup_max": 4}
    off = _spec("backend=vllm", "backend.speculative_method=ngram",
                "backend.num_speculative_tokens=0").backend
    assert speculative_config(off) is None


def test_experiment_presets_validate() -> None:
    for name in ("speculative", "speculative_hf", "quantization", "gate_fast_path"):
        text = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()
        assert "hydra:" in text
    spec = _spec("+experiment=speculative_hf")
    assert spec.workload.prompts_file.endswith("copy.jsonl")
    rows = [json.loads(x) for x in (ROOT / spec.workload.prompts_file).read_text().splitlines()]
    assert len(rows) == 8 and all(r["reference"] in r["prompt"] for r in rows)


# ------------------------------------------------------------------ arithmetic


def test_step_stats_and_summary() -> None:
    # prompt of 10; first pass verifies 3 candidates, then passes of 1+3, 1+0, 1+2 -> 10 tokens
    stats = hs.step_stats([13, 4, 1, 3], prompt_width=10, new_tokens=10)
    assert stats == {"target_forward_passes": 4.0, "proposed_tokens": 8.0,
                     "accepted_tokens": 6.0}
    s = hs.summarize([stats], k=3)
    assert s["spec_tokens_per_target_step"] == pytest.approx(2.5)
    assert s["spec_acceptance_rate"] == pytest.approx(0.75)
    assert s["spec_acceptance_rate_of_k"] == pytest.approx(0.5)
    assert hs.step_times([(1.0, 12), (2.0, 15), (3.0, 16)], 10, 6) == [1.0, 1.0, 2.0, 2.0,
                                                                      2.0, 3.0]


# ------------------------------------------------------------------ real model


@pytest.mark.slow
def test_speculative_greedy_is_token_exact(model_dir: str, tmp_path: Path) -> None:
    """fp32 greedy: prompt lookup and a 1-layer random draft change speed, not tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.backends.hf import HFBackendConfig
    from pipeline.config import DecodingConfig, ModelConfig
    from pipeline.workload import make_requests

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "draft")
    prompt = json.loads((ROOT / "pipeline/workload/tasks/copy.jsonl").read_text()
                        .splitlines()[0])["prompt"]
    outs, metrics = [], []
    for b_cfg in (HFBackendConfig(), HFBackendConfig(prompt_lookup_num_tokens=10),
                  HFBackendConfig(draft_model=str(tmp_path / "draft"))):
        with HFBackend(model_dir, ModelConfig(dtype="float32"), b_cfg, seed=0) as b:
            reqs = make_requests([prompt], b.tokenizer, use_chat_template=True)
            rec = b.generate(reqs, DecodingConfig(), max_new_tokens=24, fixed_length=True)[0]
            assert len(rec.token_times) == 24
            outs.append(rec.output_token_ids)
            metrics.append(b.extra_metrics())
            applied = b.applied_settings()
    assert outs[0] == outs[1] == outs[2]
    assert metrics[0] == {}
    assert metrics[1]["spec_tokens_per_target_step"] > 1.5  # copying: lookups hit
    assert applied["speculative"] == "draft_model" and applied["draft_num_parameters"] > 0


def test_vllm_acceptance_from_counter_deltas() -> None:
    from pipeline.backends.vllm.speculative import spec_metrics as _spec_metrics

    keys = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
            "vllm:spec_decode_num_accepted_tokens")
    before = dict(zip(keys, (10.0, 50.0, 40.0), strict=True))  # an earlier job's counts
    after = dict(zip(keys, (30.0, 150.0, 120.0), strict=True))
    m = _spec_metrics(before, after)
    assert m["spec_acceptance_rate"] == pytest.approx(0.8)
    assert m["spec_mean_accepted_tokens"] == pytest.approx(4.0)
    assert m["spec_tokens_per_target_step"] == pytest.approx(5.0)
    assert _spec_metrics(before, {}) == {}
