"""An HF folder written as a GGUF for backend=llamacpp (pipeline/backends/llamacpp/gguf_convert.py).

The packaged model's de-quantized folder (real weights) is converted once per type into a
temporary cache and read back by other code than the writer's: transformers' GGUF loader
(which undoes llama.cpp's q/k row order and maps the names back) for F16, and the gguf
package's reader and de-quantizers for Q8_0 and Q4_0. No server is started here; llama.cpp
running a converted file against hf is the preset's end-to-end test in tests/test_llamacpp.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.backends.llamacpp import gguf_convert as gc
from pipeline.errors import ConfigError

TYPES = ("F16", "Q8_0", "Q4_0")


@pytest.fixture(scope="module")
def converted(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """type -> the packaged folder's GGUF in that type, written through the cache."""
    cache = tmp_path_factory.mktemp("gguf")
    out = {}
    for t in TYPES:
        path, seconds = gc.converted_gguf(Path(model_dir), t, cache)
        assert seconds > 0 and path.parent == cache and path.name.endswith(f"-{t}.gguf")
        # a second ask reuses the file: no conversion, same path
        assert gc.converted_gguf(Path(model_dir), t, cache) == (path, 0.0)
        out[t] = path
    assert not list(cache.glob("*.partial"))
    return out


@pytest.fixture(scope="module")
def source(model_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_f16_reads_back_through_transformers(converted: dict[str, Path], model_dir: str,
                                             source: dict[str, np.ndarray]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = converted["F16"]
    with torch.device("meta"):  # only its parameter names are read
        shell = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    ck = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=shell)
    tensors = ck["tensors"]
    # tied embeddings: no lm_head / output.weight written
    assert set(tensors) == set(source) - {"lm_head.weight"}
    for name, want in source.items():
        got = tensors[name].float().numpy()
        # fp16 rounding: half an ulp (2^-11 relative), subnormals 2^-25 absolute
        bound = np.abs(want) * 2.0**-11 + 2.0**-25
        assert np.all(np.abs(got - want) <= bound), name
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    read = ck["config"]
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "hidden_size", "intermediate_size", "vocab_size"):
        assert read[key] == cfg[key], key
    assert read["rms_norm_eps"] == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)
    assert read["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    # the tokenizer written into the file, built by transformers' GGUF tokenizer converter
    # (what AutoTokenizer.from_pretrained(gguf_file=...) runs), tokenizes as the folder's
    ours = AutoTokenizer.from_pretrained(model_dir)
    theirs, _ = convert_gguf_tokenizer(ck["config"]["model_type"], ck["tokenizer"])
    for s in ("Why is the sky blue?", "  two  spaces\n\ttab",
              "<|im_start|>user\nÉté 日本<|im_end|>", "def f(x):\n    return x ** 2  # 3.14"):
        assert theirs.encode(s).ids == ours(s).input_ids, s
    assert ck["tokenizer"]["eos_token_id"] == ours.eos_token_id


#: rows of each matrix compared (every tensor, its first rows: the cost stays small)
ROWS = 64


def _dequantized(path: Path) -> dict[str, tuple[Any, np.ndarray]]:
    """Each tensor's type and its first ``ROWS`` rows, de-quantized by the gguf package."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        data = gguf.dequantize(t.data[:ROWS], t.tensor_type)
        out[t.name] = (t.tensor_type, data.reshape(-1, *shape[1:]) if len(shape) > 1 else data)
    return out


@pytest.mark.parametrize("qtype,step", [("Q8_0", 1 / 127), ("Q4_0", 1 / 8)])
def test_quantized_within_one_step_per_block(qtype: str, step: float,
                                             converted: dict[str, Path], model_dir: str,
                                             source: dict[str, np.ndarray]) -> None:
    """Each 32-value block of every tensor's first rows is within one quantization step of
    the source (Q8_0: the block's largest magnitude / 127; Q4_0: / 8, its clipped end
    included), compared in the GGUF's own row order (q/k permuted: the F16 test shows that
    order is transformers')."""
    import gguf

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    read = _dequantized(converted[qtype])
    assert len(read) == len(source)  # no output.weight (tied)
    for key, want in source.items():
        kind, got = read[names.get_name(key, try_suffixes=(".weight",))]
        if key.endswith("q_proj.weight"):
            want = gc.permute(want, cfg["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            want = gc.permute(want, cfg["num_key_value_heads"])
        want = want[:ROWS]
        if want.ndim == 1:
            assert kind.name == "F32" and np.array_equal(got, want), key
            continue
        assert kind.name == qtype, key
        blocks_w, blocks_g = want.reshape(-1, 32), got.reshape(-1, 32)
        amax = np.abs(blocks_w).max(axis=1, keepdims=True)
        # the scale itself is stored as fp16: 2^-10 of the block's range on top
        assert np.all(np.abs(blocks_g - blocks_w) <= amax * (step + 2.0**-10) + 1e-12), key


def _tiny_llama(folder: Path, model_dir: str, hidden: int) -> Path:
    """A 1-layer llama folder of random weights with the packaged tokenizer; rows of
    ``hidden`` values (48: not a whole number of 32-value blocks)."""
    from safetensors.numpy import save_file

    folder.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(model_dir) / f, folder / f)
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 1, "vocab_size": 49152, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": True, "max_position_embeddings": 256}
    (folder / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    kv = hidden // 4 * 2
    shapes = {"model.embed_tokens.weight": (49152, hidden), "model.norm.weight": (hidden,),
              "model.layers.0.input_layernorm.weight": (hidden,),
              "model.layers.0.post_attention_layernorm.weight": (hidden,),
              "model.layers.0.self_attn.q_proj.weight": (hidden, hidden),
              "model.layers.0.self_attn.k_proj.weight": (kv, hidden),
              "model.layers.0.self_attn.v_proj.weight": (kv, hidden),
              "model.layers.0.self_attn.o_proj.weight": (hidden, hidden),
              "model.layers.0.mlp.gate_proj.weight": (64, hidden),
              "model.layers.0.mlp.up_proj.weight": (64, hidden),
              "model.layers.0.mlp.down_proj.weight": (hidden, 64)}
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()},
              str(folder / "model.safetensors"))
    return folder


def test_rows_not_in_whole_blocks_fall_back_to_f16_and_are_counted(
        model_dir: str, tmp_path: Path) -> None:
    import gguf

    folder = _tiny_llama(tmp_path / "tiny", model_dir, hidden=48)
    target = tmp_path / "tiny-Q8_0.gguf"
    info = gc.write_gguf(folder, target, "Q8_0")
    r = gguf.GGUFReader(str(target))
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    # every matrix has 48-value rows but down_proj (64): only it is Q8_0
    assert kinds["blk.0.ffn_down.weight"] == "Q8_0"
    assert kinds["token_embd.weight"] == kinds["blk.0.attn_q.weight"] == "F16"
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    fallbacks = sum(1 for k in kinds.values() if k == "F16")
    assert info["f16_fallback_tensors"] == fallbacks == 7
    assert int(r.fields[gc.FALLBACK_KEY].parts[-1][0]) == fallbacks
    assert int(r.fields["general.file_type"].parts[-1][0]) == int(
        gguf.LlamaFileType.MOSTLY_Q8_0)


def test_what_is_not_converted_is_refused_with_the_fix(model_dir: str, tmp_path: Path) -> None:
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"model\.path=.*gpt2'.*architecture GPT2LMHeadModel"
                                          r".*convert_hf_to_gguf\.py and pass model\.gguf_file"):
        gc.read_config(other)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        gc.read_config(tmp_path)
    with pytest.raises(ConfigError, match=r"backend\.gguf_type='Q4_K_M' is invalid: allowed "
                                          r"values are F32, F16.*K-quants"):
        gc.check_type("Q4_K_M")
    # new weights (another mtime) are another file; the same content is the same file
    folder = _tiny_llama(tmp_path / "tiny", model_dir, hidden=64)
    a = gc.cache_path(folder, "F16", tmp_path)
    assert gc.cache_path(folder, "F16", tmp_path) == a != gc.cache_path(folder, "Q8_0", tmp_path)
    (folder / "model.safetensors").touch()
    assert gc.cache_path(folder, "F16", tmp_path) != a
