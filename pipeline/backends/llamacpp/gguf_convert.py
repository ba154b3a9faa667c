"""An HF model folder (llama architecture, safetensors) written as a GGUF that llama.cpp's
server runs: weights in ``backend.gguf_type`` (F32, F16, BF16 or one of the gguf package's
numpy quantizers: Q8_0, Q5_0, Q5_1, Q4_0, Q4_1), metadata and the tokenizer.

Written once per (folder content, type) into ``<backend.gguf_dir>/<folder>-<hash>-<type>.gguf``
under a file lock, through a ``.partial`` file that is renamed when complete. Only the part of
llama.cpp's own ``convert_hf_to_gguf.py`` this pipeline needs is done here: q/k projection
rows are permuted into llama.cpp's rope layout, tied embeddings get no ``output.weight``, 1-D
tensors (norms) stay F32, and a 2-D tensor whose rows do not split into the type's blocks is
written F16 (counted in the file's ``infersweep.f16_fallback_tensors`` and the log).

The tokenizer is written as llama.cpp's ``gpt2`` BPE model from ``tokenizer.json`` without a
pre-tokenizer name (llama.cpp picks that by hashing the tokenizer's output, a table this
module does not have): the server then splits text with its default pre-tokenizer. Prompts
therefore travel as token ids (``backend.api`` completion or completions), so the server's
tokenizer is never on the measured path, and ``api=chat`` on a converted GGUF is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.cache_lock import cache_lock
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

#: what ``backend.gguf_type`` may be: types the gguf package's numpy code writes
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")
#: the one architecture converted here (transformers' class name)
ARCHITECTURES = ("LlamaForCausalLM",)
FALLBACK_KEY = "infersweep.f16_fallback_tensors"


def _fix(path: str) -> str:
    return (f"convert it with llama.cpp's convert_hf_to_gguf.py and pass model.gguf_file, or "
            f"use another backend for model.path={path!r}")


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json``, checked for what conversion needs: a llama
    architecture, plain rope, safetensors weights and a BPE ``tokenizer.json``; a
    ConfigError naming ``model.path`` otherwise."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model.path={str(folder)!r} is invalid for backend=llamacpp: no "
                          f"config.json to convert to GGUF; set model.gguf_file to a GGUF")
    cfg = json.loads(cfg_file.read_text())
    arch = (cfg.get("architectures") or ["(none)"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.path={str(folder)!r} is invalid for backend=llamacpp: its "
                          f"architecture {arch} is not converted to GGUF here (only "
                          f"{', '.join(ARCHITECTURES)}); {_fix(str(folder))}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"model.path={str(folder)!r} is invalid for backend=llamacpp: rope "
                          f"scaling {rope.get('rope_type', rope.get('type'))!r} is not "
                          f"converted here; {_fix(str(folder))}")
    if not _weight_files(folder):
        raise ConfigError(f"model.path={str(folder)!r} is invalid for backend=llamacpp: no "
                          f"*.safetensors weights to convert; {_fix(str(folder))}")
    tok = folder / "tokenizer.json"
    if not tok.is_file() or json.loads(tok.read_text())["model"]["type"] != "BPE":
        raise ConfigError(f"model.path={str(folder)!r} is invalid for backend=llamacpp: "
                          f"conversion needs a BPE tokenizer.json; {_fix(str(folder))}")
    return cfg


def check_type(gguf_type: str) -> None:
    """A ConfigError unless ``gguf_type`` is one this module writes (K-quants are not)."""
    if gguf_type not in GGUF_TYPES:
        hint = (" (K-quants such as Q4_K_M need llama.cpp's llama-quantize; pass its output "
                "as model.gguf_file)" if "_K" in str(gguf_type).upper() else "")
        raise ConfigError(f"backend.gguf_type={gguf_type!r} is invalid: allowed values are "
                          f"{', '.join(GGUF_TYPES)}{hint}")


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def cache_path(folder: Path, gguf_type: str, gguf_dir: Path) -> Path:
    """Where the conversion of ``folder`` to ``gguf_type`` is kept: the name carries a short
    hash of config.json and of each weight file's name, size and mtime (new weights, new
    file)."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in _weight_files(folder):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return gguf_dir / f"{folder.name}-{h.hexdigest()[:12]}-{gguf_type}.gguf"


def permute(w: Any, n_head: int) -> Any:
    """q/k projection rows from HF's rotate-half layout to llama.cpp's interleaved rope."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensor_type(name: str, shape: tuple[int, ...], gguf_type: str) -> Any:
    """The GGML type a tensor is written in (1-D: F32; rows not in whole blocks: F16)."""
    import gguf

    qt = gguf.GGMLQuantizationType[gguf_type]
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qt][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qt


def _nbytes(shape: tuple[int, ...], qt: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qt]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (shape[-1] // block) * size


def _tensors(folder: Path, cfg: dict[str, Any]) -> list[tuple[str, str, Path, tuple[int, ...]]]:
    """(HF name, GGUF name, file, shape) of every tensor written, in file order."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(cfg["num_hidden_layers"]))
    tied = bool(cfg.get("tie_word_embeddings", False))
    out = []
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the embedding is the output
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ConfigError(f"model.path={str(folder)!r} is invalid for "
                                      f"backend=llamacpp: tensor {key!r} has no GGUF name; "
                                      f"{_fix(str(folder))}")
                # get_name keeps the suffix it matched (blk.0.attn_q.weight)
                out.append((key, name, f, tuple(st.get_slice(key).get_shape())))
    return out


def _add_metadata(w: Any, folder: Path, cfg: dict[str, Any], gguf_type: str) -> None:
    """Model hyperparameters and the tokenizer (module docstring: no pre-tokenizer)."""
    import gguf

    n_head, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    rope = cfg.get("rope_parameters") or {}
    w.add_name(folder.name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_file_type(int(gguf.LlamaFileType[
        {"F32": "ALL_F32", "F16": "MOSTLY_F16"}.get(gguf_type, f"MOSTLY_{gguf_type}")]))
    if gguf_type not in ("F32", "F16", "BF16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tok = json.loads((folder / "tokenizer.json").read_text())
    n_vocab = int(cfg["vocab_size"])
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    n_vocab = max(n_vocab, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # ids the config counts but the tokenizer never emits
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special")
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab).add_to_gguf(w, quiet=True)


def write_gguf(folder: Path, target: Path, gguf_type: str) -> dict[str, Any]:
    """Convert ``folder`` into the GGUF file ``target`` (written as ``target.partial``, then
    renamed); returns what was written (tensors, F16 fallbacks, seconds)."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open
    from tqdm.auto import tqdm

    check_type(gguf_type)
    cfg = read_config(folder)
    t0 = time.perf_counter()
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    tensors = _tensors(folder, cfg)
    plan = [(key, name, f, shape, _tensor_type(name, shape, gguf_type))
            for key, name, f, shape in tensors]
    fallbacks = [name for _, name, _, shape, qt in plan if len(shape) > 1 and qt.name != gguf_type]
    tmp = target.with_name(target.name + ".partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_metadata(w, folder, cfg, gguf_type)
    w.add_uint32(FALLBACK_KEY, len(fallbacks))
    for _, name, _, shape, qt in plan:
        # info first, data streamed after: one tensor in memory at a time
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    handles: dict[Path, Any] = {}
    try:
        for key, name, f, shape, qt in tqdm(plan, desc=f"GGUF {gguf_type} {folder.name}",
                                           unit="tensor"):
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt")
            data = handles[f].get_tensor(key).to(torch.float32).numpy()
            if key.endswith("q_proj.weight"):
                data = permute(data, n_head)
            elif key.endswith("k_proj.weight"):
                data = permute(data, n_kv)
            out = gguf.quants.quantize(data, qt)
            assert out.nbytes == _nbytes(shape, qt), name
            w.write_tensor_data(out)
    finally:
        w.close()
    if fallbacks:
        log.warning("GGUF %s: %d tensor(s) written F16 (rows not in whole %s blocks): %s",
                    gguf_type, len(fallbacks), gguf_type, ", ".join(fallbacks))
    tmp.rename(target)
    return {"tensors": len(plan), "f16_fallback_tensors": len(fallbacks),
            "seconds": round(time.perf_counter() - t0, 2)}


def converted_gguf(folder: Path, gguf_type: str, gguf_dir: Path) -> tuple[Path, float]:
    """The GGUF of ``folder`` in ``gguf_type``, written on first use (under a lock, so that
    parallel jobs write it once); returns its path and the seconds spent converting (0.0
    when it was already there)."""
    folder = folder.expanduser().resolve()
    target = cache_path(folder, gguf_type, gguf_dir.expanduser().resolve())
    if target.is_file():
        return target, 0.0
    with cache_lock(target.with_name(target.name + ".lock")):
        if target.is_file():
            return target, 0.0
        log.info("first use: converting %s to %s (once)", folder, target)
        return target, float(write_gguf(folder, target, gguf_type)["seconds"])
