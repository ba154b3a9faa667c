"""The hf backend on the real packaged model: determinism, decoding effects, timestamps."""

from __future__ import annotations

import pytest

from pipeline.backends.hf import HFBackend, HFBackendConfig
from pipeline.config import DecodingConfig, ModelConfig, WorkloadConfig
from pipeline.metrics.diversity import distinct_n, self_bleu
from pipeline.metrics.quality import continuation_nll, corpus_perplexity
from pipeline.workload import load_prompts, make_requests
from tests.conftest import compose_config

pytestmark = pytest.mark.slow

QUICK = list(compose_config().workload.prompts)


@pytest.fixture(scope="module")
def backend(model_dir: str):
    with HFBackend(model_dir, ModelConfig(), HFBackendConfig(), seed=0) as b:
        yield b


@pytest.fixture(scope="module")
def requests(backend: HFBackend):
    prompts = load_prompts(WorkloadConfig(prompts=QUICK))
    return make_requests(prompts, backend.tokenizer, use_chat_template=True)


def _texts(backend: HFBackend, requests, d: DecodingConfig, n: int = 24) -> list[str]:
    return [r.text for r in backend.generate(requests, d, max_new_tokens=n, fixed_length=False)]


def test_greedy_is_deterministic(backend, requests) -> None:
    assert _texts(backend, requests, DecodingConfig()) == _texts(backend, requests,
                                                                 DecodingConfig())


def test_beam_differs_from_greedy_on_some_prompt(backend, requests) -> None:
    greedy = _texts(backend, requests[:4], DecodingConfig(), n=16)
    beam = _texts(backend, requests[:4], DecodingConfig(num_beams=4), n=16)
    assert any(g != b for g, b in zip(greedy, beam, strict=True))


def test_hot_sampling_is_more_diverse_than_greedy(backend, requests) -> None:
    greedy = _texts(backend, requests, DecodingConfig(), n=32)
    hot = _texts(backend, requests, DecodingConfig(do_sample=True, temperature=1.5), n=32)
    assert distinct_n(hot, 2) > distinct_n(greedy, 2)
    assert self_bleu(hot) < self_bleu(greedy)


def test_fixed_length_records_and_timestamps(backend, requests) -> None:
    recs = backend.generate(requests[:3], DecodingConfig(), max_new_tokens=6, fixed_length=True)
    assert [r.index for r in recs] == [0, 1, 2]
    for r in recs:
        assert r.output_tokens == 6 and len(r.token_times) == 6
        assert r.t_start <= r.t_first_token <= r.token_times[-1] <= r.t_end
        assert r.token_times == sorted(r.token_times)
        assert r.prompt_tokens == len(requests[r.index].prompt_token_ids)


def test_perplexity_of_greedy_continuations_is_low_and_prompt_masked(backend, requests) -> None:
    recs = backend.generate(requests[:4], DecodingConfig(), max_new_tokens=12, fixed_length=True)
    prompts = [list(requests[r.index].prompt_token_ids) for r in recs]
    conts = [r.output_token_ids for r in recs]
    nlls, counts = continuation_nll(backend.model, prompts, conts)
    assert counts == [12] * 4  # only continuation tokens are scored
    greedy_ppl = corpus_perplexity(nlls, counts)
    # the same continuations scored after a different prompt must look less likely
    shuffled = prompts[1:] + prompts[:1]
    nlls2, _ = continuation_nll(backend.model, shuffled, conts)
    assert 1.0 < greedy_ppl < corpus_perplexity(nlls2, counts)


def test_applied_settings_are_read_from_the_model(backend) -> None:
    a = backend.applied_settings()
    assert a["device"] == "cpu" and a["dtype"] == "float32"
    assert a["attn_implementation"] == "sdpa" and a["num_parameters"] > 100_000_000


def test_flash_attention_2_on_cpu_fails_before_loading(model_dir: str) -> None:
    from pipeline.errors import ConfigError

    b = HFBackend(model_dir, ModelConfig(device="cpu"),
                  HFBackendConfig(attn_implementation="flash_attention_2"), seed=0)
    with pytest.raises(ConfigError, match="flash_attention_2.*missing.*use sdpa"):
        b.load()
    assert b.model is None


def test_compile_cost_is_counted_per_job_and_shape(tmp_path) -> None:
    """compile_s / compiled_graphs: a new model compiles, a cached one with a known shape
    does not, and a new batch shape on the cached model compiles again (session 2 found a
    reused model's recompilation for batch 8 reported as no compile at all)."""
    import json
    import shutil

    from tests.conftest import ROOT

    src = ROOT / "benchmarks" / "assets" / "smollm2-135m"
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 1  # the code path, not the speed: compile in seconds
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = ModelConfig(name="tiny", source="hf", path=str(tmp_path), weights="random",
                        dtype="float32", device="cpu")
    hf = HFBackendConfig(cache_implementation="static", compile=True)
    d = DecodingConfig()

    def job(batch: int) -> tuple[dict, bool]:
        with HFBackend(str(tmp_path), model, hf, seed=0) as b:
            reqs = make_requests(QUICK[:batch], b.tokenizer, use_chat_template=True)
            for _ in range(2):  # warm-up, then a "measured" call of the same shape
                b.generate(reqs, d, max_new_tokens=4, fixed_length=True)
            return b.extra_metrics(), b.compile_reused

    first, reused = job(1)
    assert not reused and first["compiled_graphs"] > 0 and first["compile_s"] > 0
    assert first["compiled_graphs_after_warmup"] == 0
    again, reused = job(1)
    assert reused and again == {"compile_s": 0.0, "compiled_graphs": 0.0,
                                "compiled_graphs_after_warmup": 0.0,
                                "compiled_graphs_from_disk": 0.0}
    wider, reused = job(2)
    assert reused and wider["compiled_graphs"] > 0 and wider["compile_s"] > 0


def test_cached_cpu_model_does_not_hold_a_gpu_lock(model_dir: str) -> None:
    """A model kept for the next job counts towards the GPU lock only on a GPU."""
    with HFBackend(model_dir, ModelConfig(device="cpu"), HFBackendConfig(), seed=0) as b:
        assert b.model is not None
    assert HFBackend.shutdown_cached() >= 1  # the model just closed was kept
    with HFBackend(model_dir, ModelConfig(device="cpu"), HFBackendConfig(), seed=0) as fresh:
        assert not fresh.model_reused  # the shutdown dropped it
    assert HFBackend.cached_engines() == 0  # cached, but on the CPU
    with HFBackend(model_dir, ModelConfig(device="cpu"), HFBackendConfig(), seed=0) as again:
        assert again.model_reused  # still cached for the next job, just not on a GPU
