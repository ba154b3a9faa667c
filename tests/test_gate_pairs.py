"""The gate's pairs come from what each backend declares about its fields.

Every field of every shipped backend config (and of the toy test backend) is declared task,
optimization or bookkeeping; every comparison preset of ``conf/experiment/`` forms the pairs
it was written for. The presets are composed with Hydra's compose API, one config per
combination of their ``hydra.sweeper.params`` (what ``-m`` would run), and fed to the
gate's pairing as finished jobs: no model is loaded.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.analysis import gate
from pipeline.backends import backend_class
from pipeline.config import register_configs
from pipeline.records import JobResult
from tests.conftest import ROOT

register_configs()
CONF = ROOT / "conf"
BACKEND_YAMLS = sorted(CONF.glob("backend/*.yaml")) + [ROOT / "tests/conf/backend/toy.yaml"]


def _impl(yaml: Path) -> str:
    text = yaml.read_text()
    if "impl:" not in text:  # hf_fast etc. extend hf.yaml through their defaults
        return str(OmegaConf.load(CONF / "backend" / "hf.yaml").impl)
    return str(OmegaConf.load(yaml).impl)


@pytest.mark.parametrize("yaml", BACKEND_YAMLS, ids=lambda p: p.stem)
def test_every_backend_field_is_declared(yaml: Path) -> None:
    cls = backend_class(_impl(yaml))
    assert cls.undeclared_settings() == [], (
        f"{cls.__name__}: declare these fields in its `settings` (task, optimization or "
        f"bookkeeping; '+' = declared but no such field)")
    # each yaml sets only declared fields (a yaml key the class lacks fails validation)
    for key in OmegaConf.load(yaml):
        if key != "defaults":
            assert key in cls.declared_settings(), (yaml.name, key)


def _sweep(preset: str, *extra: str) -> list[tuple[dict[str, str], JobResult]]:
    """The jobs ``python run.py -m +experiment=PRESET`` would run, as FINISHED results
    holding their resolved configs (job numbers in Hydra's basic-sweeper order)."""
    params = OmegaConf.load(CONF / "experiment" / f"{preset}.yaml").hydra.sweeper.params
    axes = [[(str(k), v.strip()) for v in str(vals).split(",")] for k, vals in params.items()]
    jobs = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for num, combo in enumerate(itertools.product(*axes)):
            overrides = [f"{k}={v}" for k, v in combo]
            cfg = compose(config_name="config",
                          overrides=[f"+experiment={preset}", *overrides, *extra])
            config = OmegaConf.to_container(cfg, resolve=True)
            jobs.append((dict(combo), JobResult(status="FINISHED", job_num=num,
                                                config=config, overrides=overrides)))
    return jobs


def _label(combo: dict[str, str]) -> str:
    return " ".join(f"{k.removeprefix('backend.').removeprefix('workload.')}={v}"
                    for k, v in combo.items())


def _pairs(preset: str) -> dict[str, tuple[str, bool]]:
    """optimized job -> (its baseline, whether teacher-forced KL is informative)."""
    jobs = _sweep(preset)
    labels = {id(r): _label(c) for c, r in jobs}
    found = gate.find_pairs([(Path(str(r.job_num)), r) for _, r in jobs])
    return {labels[id(o[1])]: (labels[id(b[1])], gate.kl_informative(b[1].config,
                                                                      o[1].config))
            for b, o in found}


#: preset -> {optimized job: (baseline job, KL informative)}, jobs named by their sweep
#: overrides (``backend.``/``workload.`` left off)
EXPECTED: dict[str, dict[str, tuple[str, bool]]] = {
    # the fast path against plain hf, both float32
    "gate_fast_path": {"backend=hf_fast": ("backend=hf", True)},
    # eager is the reference kernel: sdpa and forced-flash sdpa are both checked against it
    "attention": {"attn_implementation=sdpa": ("attn_implementation=eager", True),
                  "attn_implementation=sdpa_flash": ("attn_implementation=eager", True)},
    # no KV cache (every step recomputes the sequence) is the reference; the cache is the
    # optimization
    "kv_cache": {"use_cache=true": ("use_cache=false", True)},
    # int8 against float32, per batch size
    "quantization": {
        "quantization=int8_dynamic batch_size=1": ("quantization=null batch_size=1", True),
        "quantization=int8_dynamic batch_size=4": ("quantization=null batch_size=4", True)},
    # vLLM ngram K > 0 against K = 0 per batch size: KL is 0 by construction
    "speculative": {
        f"num_speculative_tokens={k} batch_size={b}": (
            f"num_speculative_tokens=0 batch_size={b}", False)
        for k in (2, 5) for b in (1, 4)},
    # hf prompt lookup K > 0 against K = 0
    "speculative_hf": {"prompt_lookup_num_tokens=3": ("prompt_lookup_num_tokens=0", False),
                       "prompt_lookup_num_tokens=10": ("prompt_lookup_num_tokens=0", False)},
    # across backends: plain hf is the baseline of vLLM (its paged KV cache, batching and
    # fused kernels count as optimizations always on)
    "hf_vs_vllm": {"backend=vllm batch_size=1": ("backend=hf batch_size=1", True),
                   "backend=vllm batch_size=8": ("backend=hf batch_size=8", True)},
    "phase3_full": {"backend=hf_kv": ("backend=hf_baseline", True),
                    "backend=hf": ("backend=hf_baseline", True),
                    "backend=vllm": ("backend=hf_baseline", True)},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_comparison_presets_form_their_pairs(preset: str) -> None:
    assert _pairs(preset) == EXPECTED[preset]


def test_optimizations_read_only_where_they_apply() -> None:
    """compile settings count only under compile, dtype=null is model.dtype, and the fast
    path's auto loop is the static one for greedy (so pad_bucket is not read)."""
    (_, hf), (_, fast) = _sweep("gate_fast_path")
    assert gate.optimizations_on(hf.config) == {"attn_implementation": "sdpa",
                                                "use_cache": True}
    on = gate.optimizations_on(fast.config)
    assert on["decode_loop"] == "static" and on["compile"] is True
    assert "pad_bucket" not in on and "dtype" not in on and "inductor_weight_prepack" not in on
    assert "compile_cache_dir" not in gate.task_fields(fast.config)
    # a different task (another seed on vLLM) is no baseline of anything
    vllm = next(r for c, r in _sweep("hf_vs_vllm") if c["backend"] == "vllm")
    seeded = {**vllm.config, "backend": {**vllm.config["backend"], "seed": 7}}
    assert gate.comparable_key(seeded) != gate.comparable_key(vllm.config)
    same = {**vllm.config, "backend": {**vllm.config["backend"], "seed": vllm.config["seed"]}}
    assert gate.comparable_key(same) == gate.comparable_key(vllm.config)


def test_gguf_quant_pairs_every_llamacpp_arm_with_hf() -> None:
    """+experiment=gguf_quant on an HF folder: each arm bundles a backend and its
    gguf_type, and the gate checks every llama.cpp conversion against the one hf job (with
    KL asked for: another backend; llama.cpp's side cannot score, so it is reported as not
    available)."""
    jobs = _sweep("gguf_quant", "model=hf", "model.path=/models/my_llama")
    labels = {id(r): _label(c) for c, r in jobs}
    assert [r.config["backend"]["name"] for _, r in jobs] == ["hf"] + ["llamacpp"] * 3
    found = gate.find_pairs([(Path(str(r.job_num)), r) for _, r in jobs])
    assert {labels[id(o[1])]: labels[id(b[1])] for b, o in found} == {
        f"+gguf_arm={t}": "+gguf_arm=hf" for t in ("F16", "Q8_0", "Q4_0")}
    for b, o in found:
        on = gate.gated_optimizations(b[1].config, o[1].config)
        assert on["backend"] == "llamacpp"
        assert on["gguf_type"] == o[1].config["backend"]["gguf_type"]
        assert gate.kl_informative(b[1].config, o[1].config)
        assert not gate.can_score(o[1].config)
    # gguf_type: null is F16 on a folder, F32 is no quantization, and a GGUF used as it is
    # (the packaged model's) is no conversion at all
    f16 = jobs[1][1].config
    cases = {None: True, "F32": False}
    for value, on in cases.items():
        c = {**f16, "backend": {**f16["backend"], "gguf_type": value}}
        assert ("gguf_type" in gate.optimizations_on(c)) is on, value
    packaged = {**f16, "model": {**f16["model"], "source": "packaged", "gguf_file": "m.gguf"},
                "backend": {**f16["backend"], "gguf_type": None}}
    assert "gguf_type" not in gate.optimizations_on(packaged)


def test_report_says_once_when_a_gguf_pair_holds_the_same_weights() -> None:
    """llama.cpp on the packaged GGUF against hf on its de-quantized folder: the table
    says that the pair measures llama.cpp's numerics, not quantization loss; a converted
    folder's pair does not get the line."""
    from pipeline.report import gate_table
    from tests.conftest import job_run, sweep_data

    def jobs(origin: str) -> list:
        base, opt = job_run(0, "greedy", "1.0", 10.0, 100.0), job_run(1, "greedy", "1.0",
                                                                     20.0, 50.0)
        opt.tags.update(gate_verdict="degraded", gate_baseline_job="0",
                        gate_optimizations="backend=llamacpp")
        opt.results["applied"] = {"gguf_origin": origin}
        return [base, opt]

    (_, blocks), = gate_table.sections(sweep_data(jobs("packaged")))
    texts = [b for kind, b in blocks if kind == "text"]
    assert texts.count(gate_table.SAME_WEIGHTS) == 1
    assert "same weights: this measures llama.cpp's numerics" in gate_table.SAME_WEIGHTS
    (_, blocks), = gate_table.sections(sweep_data(jobs("converted")))
    assert gate_table.SAME_WEIGHTS not in [b for kind, b in blocks if kind == "text"]
