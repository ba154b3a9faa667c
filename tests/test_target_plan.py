"""Planning a sweep for a card from this (CPU) machine: ``+target=NAME`` dry runs and the
memory estimate (pipeline/memory_plan.py), checked against what the pipeline allocates on
the CPU (the packaged model's weights, a KV cache of known length and batch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.memory_plan import Architecture, read_architecture
from tests.conftest import run_cli

#: Llama-2-13B's config.json shape (13,015,864,320 parameters: 26 GB in float16)
LLAMA2_13B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
    "num_hidden_layers": 40, "num_key_value_heads": 40, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
}


def _cache_bytes(cache) -> int:  # noqa: ANN001 - a transformers Cache
    """Bytes of every key and value tensor a transformers cache holds."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(t.nbytes for lay in layers for t in (lay.keys, lay.values))
    return sum(t.nbytes for t in (*cache.key_cache, *cache.value_cache))


def test_formula_matches_the_bytes_allocated_on_cpu(model_dir: str) -> None:
    """Weights and KV cache of the real packaged model, as loaded and run on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    arch = read_architecture(model_dir)
    assert arch is not None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    weights = sum(p.nbytes for p in model.parameters())  # tied embeddings counted once
    assert arch.parameters() * 4 == weights
    batch, length = 3, 17
    with torch.inference_mode():
        out = model(input_ids=torch.ones((batch, length), dtype=torch.long), use_cache=True)
    assert arch.kv_bytes("float32", length, batch) == _cache_bytes(out.past_key_values)


def test_llama2_13b_shape_is_26_gb_in_float16() -> None:
    arch = Architecture.from_config(LLAMA2_13B)
    assert arch.parameters() == 13_015_864_320
    assert arch.kv_bytes("float16", 1, 1) == 2 * 40 * 40 * 128 * 2


def test_t4_sweep_dry_run_prints_float16_and_memory_per_job(tmp_path: Path) -> None:
    p = run_cli("-m", "dry_run=true", "+target=t4", "decoding=topp,beam", "backend=hf,vllm",
                "model.dtype=auto", f"paths.output_dir={tmp_path}", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    assert out.count("valid: ") == 4
    assert out.count("on Tesla T4 (target t4, cuda, compute capability 7.5, 15.0 GiB): "
                     "dtype=float16") == 4
    assert out.count("  memory: ") == 4 and out.count(": fits") == 4
    assert out.count("enforce_eager=False, cuda_graphs=on") == 2  # the vLLM jobs
    assert out.count("attn_implementation=sdpa, cuda_graphs=off") == 2  # hf, uncompiled
    assert not (tmp_path / "mlflow").exists()
    # the decisions are the jobs' applied settings
    res = [json.loads(f.read_text()) for f in tmp_path.glob("multirun/*/*/results.json")]
    assert len(res) == 4 and all(r["applied"]["dtype"] == "float16" for r in res)
    assert all(r["applied"]["memory_fits"] is True for r in res)


@pytest.fixture()
def llama13b_folder(tmp_path: Path, model_dir: str) -> Path:
    """A folder with Llama-2-13B's config.json and the packaged tokenizer (no weights)."""
    folder = tmp_path / "llama13b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA2_13B))
    for f in Path(model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab",
                              "merges")):
            shutil.copy(f, folder / f.name)
    return folder


def test_13b_does_not_fit_a_t4_and_fits_an_a100_80gb(tmp_path: Path,
                                                      llama13b_folder: Path) -> None:
    args = ("dry_run=true", "model=hf", f"model.path={llama13b_folder}",
            "model.weights=random", f"paths.output_dir={tmp_path}")
    p = run_cli(*args, "+target=t4", timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: model={llama13b_folder} does not fit on Tesla T4"), err
    assert "26.03 GB weights" in p.stderr or "weights 26.03 GB" in err
    assert "against 16,106,127,360 bytes" in err
    p = run_cli(*args, "+target=a100-80gb", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "dtype=bfloat16" in p.stdout
    assert "26.03 GB weights" in p.stdout and "of 85.90 GB" in p.stdout
    assert p.stdout.rstrip().endswith(": fits")
