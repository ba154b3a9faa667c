"""LoRA/PEFT adapter folders as model.path: merged once onto their base into the cache
(pipeline/adapters.py), so that every engine reads one plain model folder.

The base is the real packaged model (converted once, conftest's ``model_dir``); the adapter
is a real one made here with peft and saved as a fine-tuning run leaves it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from pipeline.adapters import (
    MERGED_MARKER,
    adapter_settings,
    check_adapter,
    merged_dir,
)
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.models import resolve_model

Q0 = "model.layers.0.self_attn.q_proj.weight"


def _hf(path: Path | str, base_path: str | None = None) -> ModelConfig:
    return ModelConfig(name="hf", source="hf", path=str(path), base_path=base_path)


@pytest.fixture(scope="module")
def lora(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny LoRA adapter (r=4 on q_proj and v_proj) on the converted packaged model, saved
    with peft's save_pretrained (adapter files only, no tokenizer), with peft's own
    ``merge_and_unload`` of it kept as the reference. ``init_lora_weights=False`` makes
    both LoRA matrices random, so the merge changes the weights."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_q = base.get_parameter(Q0).detach().clone()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)
    pm = peft.get_peft_model(base, cfg)
    pm.peft_config["default"].base_model_name_or_path = model_dir
    pm.save_pretrained(root / "adapter")
    ref_q = pm.merge_and_unload().get_parameter(Q0).detach().clone()
    return {"adapter": root / "adapter", "cache": root / "cache", "base": model_dir,
            "base_q": base_q, "ref_q": ref_q}


@pytest.fixture(scope="module")
def merged(lora: dict) -> Path:
    """The first resolve_model of the adapter (the one merge of this module)."""
    return Path(resolve_model(_hf(lora["adapter"]), lora["cache"]))


@pytest.mark.slow
def test_adapter_is_merged_onto_its_base(lora: dict, merged: Path) -> None:
    """resolve_model returns a plain folder in the cache whose weights are peft's merge."""
    from safetensors.torch import load_file

    assert merged.parent == lora["cache"] / "models" / "merged"
    assert (merged / "config.json").is_file() and (merged / MERGED_MARKER).is_file()
    # a plain model: no adapter config that transformers would try to apply again
    assert not (merged / "adapter_config.json").exists()
    q = load_file(merged / "model.safetensors")[Q0]
    assert not q.equal(lora["base_q"])  # the merge is not a no-op
    assert q.equal(lora["ref_q"])
    # the adapter has no tokenizer: the base's, byte for byte
    base = Path(lora["base"])
    assert (merged / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert adapter_settings(_hf(lora["adapter"])) == {
        "model_base": str(base.resolve()), "model_adapter": str(lora["adapter"].resolve())}


@pytest.mark.slow
def test_merge_is_cached_by_adapter_content(lora: dict, merged: Path,
                                            tmp_path: Path) -> None:
    """A second call reuses the merge (nothing rewritten); so does a copy of the adapter
    elsewhere (the key is its content). An adapter with its own tokenizer merges anew,
    and the merged folder carries that tokenizer."""
    stamp = {f.name: f.stat().st_mtime_ns for f in merged.iterdir()}
    assert Path(resolve_model(_hf(lora["adapter"]), lora["cache"])) == merged
    copy = shutil.copytree(lora["adapter"], tmp_path / "copy")
    assert Path(resolve_model(_hf(copy), lora["cache"])) == merged
    assert {f.name: f.stat().st_mtime_ns for f in merged.iterdir()} == stamp

    own = shutil.copytree(lora["adapter"], tmp_path / "with_tokenizer")
    tok_cfg = json.loads((Path(lora["base"]) / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = 1234  # tells the adapter's tokenizer from the base's
    (own / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    shutil.copy2(Path(lora["base"]) / "tokenizer.json", own / "tokenizer.json")
    second = Path(resolve_model(_hf(own), lora["cache"]))
    assert second != merged and second == merged_dir(_hf(own), lora["cache"])
    assert json.loads((second / "tokenizer_config.json").read_text())["model_max_length"] == 1234
    assert {f.name: f.stat().st_mtime_ns for f in merged.iterdir()} == stamp


def _fake_adapter(folder: Path, base: str) -> Path:
    """An adapter folder as peft writes it (config and a small safetensors file); enough
    for the checks, which read no weights."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": base, "r": 4,
         "target_modules": ["q_proj", "v_proj"]}))
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (folder / "adapter_model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 4)
    return folder


def test_adapter_without_local_base_is_refused(tmp_path: Path) -> None:
    """A base named by hub id (no hub access) is refused before anything loads, naming
    model.base_path; so is a base_path that is no model, or one given for a plain model.
    A base_path that is a model folder is taken, and named in the applied settings."""
    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    adapter = _fake_adapter(tmp_path / "dpo_final", hub)
    for call in (lambda: check_adapter(_hf(adapter)),
                 lambda: resolve_model(_hf(adapter), tmp_path / "cache")):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith("model.base_path=None is invalid") and hub in msg
        assert "\n" not in msg
    assert not (tmp_path / "cache").exists()  # nothing merged, nothing loaded

    with pytest.raises(ConfigError, match=r"model.base_path='.*nobase' is invalid: no such"):
        check_adapter(_hf(adapter, base_path=str(tmp_path / "nobase")))
    with pytest.raises(ConfigError, match=r"model.base_path=.* is invalid: it is only used"):
        check_adapter(_hf(tmp_path, base_path=str(tmp_path)))  # no adapter there

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    check_adapter(_hf(adapter, base_path=str(base)))
    assert adapter_settings(_hf(adapter, base_path=str(base))) == {
        "model_base": str(base), "model_adapter": str(adapter)}
    assert adapter_settings(_hf(base)) == {}


@pytest.mark.slow
def test_run_cli_with_adapter_finishes(lora: dict, merged: Path, tmp_path: Path) -> None:
    """run.py with the adapter folder as model.path runs to FINISHED on the merged model
    (the merge made above is reused, not redone)."""
    stamp = (merged / MERGED_MARKER).stat().st_mtime_ns
    p = run_cli("model=hf", f"model.path={lora['adapter']}", "workload.num_prompts=1",
                "workload.max_new_tokens=4", "tracking.enabled=false",
                f"paths.cache_dir={lora['cache']}", f"paths.output_dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    (res,) = tmp_path.glob("runs/*/results.json")
    r = json.loads(res.read_text())
    assert r["status"] == "FINISHED"
    assert len(r["requests"]) == 1 and r["requests"][0]["output_token_ids"]
    assert (merged / MERGED_MARKER).stat().st_mtime_ns == stamp
