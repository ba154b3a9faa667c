"""LoRA/PEFT adapter folders given as ``model.path``: merged once into a plain model folder.

What a fine-tuning run (DPO, SFT) often leaves is an adapter: ``adapter_config.json`` and
``adapter_model.safetensors``, perhaps tokenizer files, but no ``config.json`` and no base
weights. Every engine (hf, vllm, vllm_server) reads one plain folder instead: the base with
the adapter merged into its weights by ``peft`` (``merge_and_unload``), saved once under
``<cache_dir>/models/merged/<key>/``. The key hashes the adapter's files (so
a retrained adapter in the same folder gets a new merge, and a copy of it reuses the old
one) and names the base (its path and its files' sizes and times: hashing a base of many
GB on every run would cost more than the merge is worth re-checking).

The base is the adapter's own ``base_model_name_or_path`` when that is a folder on this
machine, else ``model.base_path``; models are never downloaded. The merged folder's
tokenizer is the adapter's own tokenizer files when it has them (a run that added tokens
saves them there), else the base's. Nothing here imports torch until a merge is needed, so
:func:`check_adapter` can run with the other checks before anything loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.cache_lock import cache_lock
from pipeline.config import ModelConfig, looks_local
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: a folder with one of these is a full model, even if an adapter config lies beside it
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "spiece.model", "sentencepiece.bpe.model")
#: prompt-learning adapters add virtual tokens instead of weight deltas: nothing to merge
NOT_MERGEABLE = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING",
                 "ADAPTION_PROMPT", "CPT")
#: written last into a merged folder: its presence means the merge completed
MERGED_MARKER = "infersweep_merged.json"


def adapter_dir(m: ModelConfig) -> Path | None:
    """The adapter folder ``model.path`` names, or None when it names no adapter (a full
    model folder, a hub id, the packaged model)."""
    if m.source != "hf" or not m.path or not looks_local(m.path):
        return None
    p = Path(m.path).expanduser().resolve()
    if not (p / ADAPTER_CONFIG).is_file() or any((p / f).is_file() for f in FULL_WEIGHTS):
        return None
    return p


def _adapter_config(adapter: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={str(adapter)!r} is invalid: its {ADAPTER_CONFIG} "
                          f"cannot be read ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"model.path={str(adapter)!r} is invalid: its {ADAPTER_CONFIG} "
                          "is not a JSON object")
    return cfg


def _full_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def adapter_base(m: ModelConfig) -> Path:
    """The base model folder of the adapter ``model.path``: ``model.base_path`` when set,
    else the adapter's ``base_model_name_or_path`` when that is a folder here; a
    ConfigError naming ``model.base_path`` otherwise (nothing is downloaded)."""
    adapter = adapter_dir(m)
    assert adapter is not None, "adapter_base needs model.path to be an adapter folder"
    if m.base_path:
        base = Path(m.base_path).expanduser().resolve()
        if not _full_model_folder(base):
            what = "no such folder" if not base.exists() else "no config.json in it"
            raise ConfigError(
                f"model.base_path={m.base_path!r} is invalid: {what}; it must be the full "
                f"model folder the adapter {adapter} was trained on")
        return base
    named = _adapter_config(adapter).get("base_model_name_or_path")
    if isinstance(named, str) and named and looks_local(named):
        # as transformers would read it (from the working directory), then beside the adapter
        for cand in (Path(named).expanduser(), adapter / Path(named).expanduser()):
            if _full_model_folder(cand):
                return cand.resolve()
    raise ConfigError(
        f"model.base_path=None is invalid: the adapter {adapter} names its base "
        f"base_model_name_or_path={named!r}, which is not a model folder on this machine "
        "(models are never downloaded); set model.base_path=<the base model's folder>")


def check_adapter(m: ModelConfig) -> None:
    """Refuse, before anything loads, an adapter ``model.path`` that cannot be merged here
    (unreadable config, no weights, a prompt-learning type, no local base, no ``peft``),
    and a ``model.base_path`` that would be ignored because ``model.path`` is no adapter.
    Imports nothing heavy."""
    adapter = adapter_dir(m)
    if adapter is None:
        if m.base_path:
            raise ConfigError(
                f"model.base_path={m.base_path!r} is invalid: it is only used when "
                f"model.path is a LoRA/PEFT adapter folder (one with {ADAPTER_CONFIG} and "
                f"no full weights), and model.path={m.path!r} is not; remove model.base_path")
        return
    cfg = _adapter_config(adapter)
    peft_type = str(cfg.get("peft_type") or "")
    if peft_type.upper() in NOT_MERGEABLE:
        raise ConfigError(
            f"model.path={str(adapter)!r} is invalid: its peft_type {peft_type} adds "
            "virtual tokens and cannot be merged into the weights; LoRA-style adapters "
            "(LORA, ADALORA, IA3, LOHA, LOKR, ...) can")
    if not any((adapter / f).is_file() for f in ADAPTER_WEIGHTS):
        raise ConfigError(
            f"model.path={str(adapter)!r} is invalid: it has {ADAPTER_CONFIG} but no "
            f"adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    adapter_base(m)
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(
            f"model.path={str(adapter)!r} is invalid: it is a LoRA/PEFT adapter, and "
            "merging it needs the peft package: run `pip install peft`")


def adapter_settings(m: ModelConfig) -> dict[str, str]:
    """What a job's applied settings record about an adapter: ``model_base`` and
    ``model_adapter`` (absolute folders); empty when ``model.path`` is no adapter."""
    adapter = adapter_dir(m)
    if adapter is None:
        return {}
    return {"model_base": str(adapter_base(m)), "model_adapter": str(adapter)}


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in
               ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)


def merge_key(adapter: Path, base: Path) -> str:
    """The cache key of a merge: a hash of the adapter's config, weights and tokenizer
    files (contents), the base folder's path and its files' names, sizes and times."""
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS, *TOKENIZER_FILES):
        f = adapter / name
        if f.is_file():
            h.update(f"adapter:{name}\0".encode())
            _hash_file(h, f)
    h.update(f"base:{base}\0".encode())
    for f in sorted(p for p in base.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def merged_dir(m: ModelConfig, cache_dir: Path) -> Path:
    """Where the merge of the adapter ``model.path`` onto its base lives (made or not)."""
    adapter = adapter_dir(m)
    assert adapter is not None
    key = merge_key(adapter, adapter_base(m))
    # named by content only: a copy of the adapter in another folder reuses the merge
    return cache_dir / "models" / "merged" / key[:16]


def merge_adapter(m: ModelConfig, cache_dir: Path) -> Path:
    """The merged model folder of the adapter ``model.path``, merged on first use and
    reused after (parallel jobs asking together merge once)."""
    check_adapter(m)
    adapter, base = adapter_dir(m), adapter_base(m)
    assert adapter is not None
    target = merged_dir(m, cache_dir)
    if (target / MERGED_MARKER).is_file():
        return target
    with cache_lock(target.with_name(target.name + ".lock")):
        if not (target / MERGED_MARKER).is_file():
            log.info("first use: merging adapter %s onto %s into %s (once)",
                     adapter, base, target)
            _merge(adapter, base, target, m.trust_remote_code)
    return target


def _adapter_vocab_rows(adapter: Path) -> int | None:
    """Rows of a full embedding or lm_head the adapter saves (``modules_to_save``, e.g.
    after adding tokens), read from the safetensors header; None when it saves none."""
    f = adapter / "adapter_model.safetensors"
    if not f.is_file():
        return None
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    for name, meta in header.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
            return int(meta["shape"][0])
    return None


def _merge(adapter: Path, base: Path, target: Path, trust_remote_code: bool) -> None:
    """Load the base in its own dtype, apply and merge the adapter, save the plain model
    and the tokenizer files into ``target`` (through a partial folder, marker last)."""
    import peft
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto",
                                                 trust_remote_code=trust_remote_code)
    rows = _adapter_vocab_rows(adapter)
    if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
        # tokens were added in training: the saved embedding must fit the base's shape
        model.resize_token_embeddings(rows)
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    tok_src = adapter if _has_tokenizer(adapter) else base
    for f in sorted(tok_src.iterdir()):
        if f.is_file() and (f.name in TOKENIZER_FILES or f.name.startswith("tokenization_")):
            shutil.copy2(f, tmp / f.name)
    (tmp / MERGED_MARKER).write_text(json.dumps({
        "adapter": str(adapter), "base": str(base), "tokenizer_from": str(tok_src),
        "peft": peft.__version__, "merge_s": round(time.perf_counter() - t0, 2)}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
