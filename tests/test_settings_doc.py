"""The settings reference: every field of every schema a user sets is described, and
docs/settings.md is what the schemas generate (no model loads here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import settings_doc
from pipeline.config.field_docs import field_docs
from tests.conftest import ROOT


@pytest.mark.parametrize("schema", settings_doc.shipped_schemas(), ids=lambda c: c.__name__)
def test_every_field_of_every_schema_has_a_description(schema: type) -> None:
    assert settings_doc.undocumented(schema) == []


def test_every_backend_yaml_is_typed_by_a_documented_schema() -> None:
    """A backend yaml whose class is not among the documented schemas would escape the
    check above (the hf_* presets share HFBackendConfig)."""
    documented = set(settings_doc.shipped_schemas())
    for yaml in sorted((ROOT / "conf" / "backend").glob("*.yaml")):
        cfg, _ = settings_doc.compose(f"backend={yaml.stem}")
        assert settings_doc._backend_class(cfg["backend"]["impl"]) in documented, yaml.name


def test_settings_md_is_what_the_schemas_generate() -> None:
    assert settings_doc.render() == settings_doc.DOC_PATH.read_text(encoding="utf-8"), (
        "docs/settings.md is out of date: run python -m pipeline.config.settings_doc")
    assert settings_doc.main(["--check"]) == 0


def test_check_mode_exits_1_on_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    stale = tmp_path / "settings.md"
    stale.write_text(settings_doc.DOC_PATH.read_text(encoding="utf-8").replace(
        "workload.max_new_tokens", "workload.max_tokens", 1))
    monkeypatch.setattr(settings_doc, "ROOT", tmp_path)
    monkeypatch.setattr(settings_doc, "DOC_PATH", stale)
    assert settings_doc.main(["--check"]) == 1
    assert settings_doc.main([]) == 0  # writes it
    assert settings_doc.main(["--check"]) == 0


def test_the_page_names_each_key_as_typed_with_its_default() -> None:
    text = settings_doc.DOC_PATH.read_text(encoding="utf-8")
    assert "| `workload.max_new_tokens` | int | 32 |" in text
    assert "### backend=vllm_server" in text and "| `backend.log_dir` |" in text
    assert "| `speculative` | `python run.py -m +experiment=speculative` |" in text


@dataclass
class _Base:
    shared: int = 1
    """Described once, in the base."""


@dataclass
class _Throwaway(_Base):
    described: int = 0
    """What it does, in tokens; 0 = off."""
    bare: str = "x"
    empty: bool = False
    """ """


def test_a_field_without_a_description_is_found() -> None:
    """The check the schemas pass above fails on a field with no docstring or a blank
    one, and reads a base class's docstrings for inherited fields."""
    assert field_docs(_Throwaway) == {"shared": "Described once, in the base.",
                                      "described": "What it does, in tokens; 0 = off.",
                                      "bare": "", "empty": ""}
    assert settings_doc.undocumented(_Throwaway) == ["_Throwaway.bare", "_Throwaway.empty"]
