"""Generating ``docs/settings.md``, the reference of every setting, from the schemas.

``python -m pipeline.config.settings_doc`` writes the file; ``--check`` exits 1 when it is
stale. One table per config group, per run-wide section and per shipped backend (key as
typed on the command line, type, default, description), then the presets under ``conf/``.
Descriptions are the fields' attribute docstrings (:func:`field_docs`); defaults are what
``python run.py`` composes, so the page shows what a user actually gets.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pipeline.config.field_docs import field_docs
from pipeline.config.schemas import (
    Config,
    CostConfig,
    DecodingConfig,
    MeasureConfig,
    ModelConfig,
    PathsConfig,
    ScoringConfig,
    SearchConfig,
    TargetConfig,
    TrackingConfig,
    register_configs,
)
from pipeline.config.workload_schema import WorkloadConfig

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
DOC_PATH = ROOT / "docs" / "settings.md"

#: the backends a user picks with ``backend=NAME`` that get a section of their own; the
#: other yamls in ``conf/backend/`` are presets of these (listed with the presets)
SHIPPED_BACKENDS = ("hf", "hf_fast", "vllm", "vllm_server", "llamacpp", "openai")

#: (section, key prefix, schema, intro) of the core tables, in page order
CORE_SECTIONS: tuple[tuple[str, str, type, str], ...] = (
    ("model", "model", ModelConfig,
     "Which weights run. Pick a preset with `model=NAME` (`conf/model/`); defaults below "
     "are the default preset's."),
    ("decoding", "decoding", DecodingConfig,
     "One decoding strategy. Pick a preset with `decoding=NAME` (`conf/decoding/`)."),
    ("workload", "workload", WorkloadConfig,
     "What a job sends and when. Pick a preset with `workload=NAME` (`conf/workload/`); "
     "lengths count rendered tokens (chat template included)."),
    ("paths", "paths", PathsConfig,
     "Where things go; relative paths are taken from the directory `run.py` runs in."),
    ("tracking", "tracking", TrackingConfig, "MLflow tracking."),
    ("scoring", "scoring", ScoringConfig, "Quality and diversity scoring of the generations."),
    ("measure", "measure", MeasureConfig, "How the measured phase is observed."),
    ("cost", "cost", CostConfig,
     "What the machine costs, for cost per output token (`usd_per_million_output_tokens`)."),
    ("search", "search", SearchConfig,
     "What a search optimizes (`hydra/sweeper=optuna`, docs/search.md); a grid sweep "
     "ignores it."),
    ("target", "target", TargetConfig,
     "A hardware target to plan for (`+target=NAME`, `conf/target/`; dry runs). Not set by "
     "default: the defaults below are the schema's, each target yaml sets its card's values."),
)

#: preset folders listed at the end, with how a user selects one
PRESET_GROUPS = (
    ("experiment", "python run.py -m +experiment={name}"),
    ("decoding", "decoding={name}"),
    ("workload", "workload={name}"),
    ("model", "model={name}"),
    ("target", "+target={name}"),
    ("backend", "backend={name}"),
)

_MAX_DEFAULT = 40  # longer defaults are summarised, the yaml holds them


def compose(*overrides: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``conf/config.yaml`` composed with ``overrides`` as ``run.py`` composes it,
    interpolations left as written; returns the config and the chosen group presets."""
    return copy.deepcopy(_compose(overrides))


@functools.lru_cache(maxsize=16)  # a page composes each backend twice; Hydra is slow
def _compose(overrides: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides),
                            return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    assert isinstance(container, dict) and isinstance(choices, dict)
    return container, choices


def _type_name(f: dataclasses.Field) -> str:
    """The field's annotation for a reader: ``X | None`` reads ``X or null``."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in t.split("|")]
    optional = "None" in parts
    text = " or ".join(p for p in parts if p != "None")
    return f"{text} or null" if optional else text


def _value(value: Any, source: str) -> str:
    """A default as a user would type it; long lists and maps point at their yaml."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        text = str(OmegaConf.to_yaml(OmegaConf.create({"v": value}))).partition("v:")[2]
        flat = " ".join(text.split())
        if isinstance(value, list):
            flat = "[" + ", ".join(str(v) for v in value) + "]"
        if len(flat) > _MAX_DEFAULT:
            kind = "items" if isinstance(value, list) else "entries"
            return f"{len(value)} {kind} (`{source}`)"
        return flat or "[]"
    return str(value)


def _cell(text: str) -> str:
    """One table cell: a single line, pipes escaped."""
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def _table(prefix: str, schema: type, defaults: dict[str, Any] | None, source: str) -> list[str]:
    """The rows of one section: key, type, default, description."""
    docs = field_docs(schema)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(schema):
        if defaults is not None and f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        key = f"{prefix}.{f.name}" if prefix else f.name
        rows.append(f"| `{key}` | {_cell(_type_name(f))} | {_cell(_value(default, source))} | "
                    f"{_cell(docs[f.name])} |")
    return rows


def _top_level(cfg: dict[str, Any], choices: dict[str, Any]) -> list[str]:
    """The root keys: the groups (default preset), the sections, the run-wide scalars."""
    docs = field_docs(Config)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(Config):
        if f.name in ("model", "backend", "decoding", "workload"):
            key, kind, default = f.name, f"preset of `conf/{f.name}/`", choices.get(f.name)
        elif f.name == "target":
            key, kind, default = "+target", "preset of `conf/target/`", "null"
        elif f.name in cfg and isinstance(cfg[f.name], dict):
            key, kind, default = f.name, "section", f"[below](#{f.name})"
        else:
            key, kind, default = f.name, _type_name(f), _value(cfg.get(f.name), "conf/config.yaml")
        rows.append(f"| `{key}` | {_cell(kind)} | {_cell(str(default))} | "
                    f"{_cell(docs[f.name])} |")
    return rows


def _backend_class(impl: str) -> type:
    """The config class of the backend class ``impl`` names (its module is imported; no
    engine is)."""
    from pipeline.backends import backend_class

    return backend_class(impl).config_class


def shipped_schemas() -> list[type]:
    """Every schema a user sets: the core dataclasses and each shipped backend's config
    class (imported, no engine loaded)."""
    schemas = [Config, *(schema for _, _, schema, _ in CORE_SECTIONS)]
    for name in SHIPPED_BACKENDS:
        impl = OmegaConf.load(CONF_DIR / "backend" / f"{name}.yaml").get("impl")
        if impl is None:  # a preset of another backend yaml: composed, it has one
            impl = compose(f"backend={name}")[0]["backend"]["impl"]
        schema = _backend_class(impl)
        if schema not in schemas:
            schemas.append(schema)
    return schemas


def undocumented(schema: type) -> list[str]:
    """The fields of ``schema`` without a description (an empty or missing attribute
    docstring), as ``Class.field``."""
    return [f"{schema.__name__}.{name}" for name, doc in field_docs(schema).items()
            if not doc.strip()]


def _yaml_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def first_comment(path: Path) -> str:
    """The first sentence of a yaml's leading comment (``@package`` lines skipped, a
    command to run left out); "" when it has none."""
    block: list[str] = []
    for line in _yaml_lines(path):
        s = line.strip()
        if not s.startswith("#"):
            break
        s = s.lstrip("#").strip()
        if s.startswith("@package"):
            continue
        if not s or s.startswith(("python ", "-m ")):
            break
        block.append(s)
    text = " ".join(block)
    text = re.split(r"\s+python run\.py", text)[0]  # a command to run is not a description
    match = re.search(r"(?<=[.!?])\s", text)
    text = text[:match.start()] if match else text
    return text.strip().rstrip(":;,").strip()


def _settings_summary(path: Path) -> str:
    """The values a preset sets (its top-level keys but ``defaults``/``name``/``hydra``)."""
    node = OmegaConf.load(path)
    skip = {"defaults", "name", "hydra", "impl"}
    items = [f"{k}={_value(v, path.name)}" for k, v in node.items() if k not in skip
             and not isinstance(v, dict)]
    return "sets " + ", ".join(items) if items else ""


def _presets(group: str, usage: str) -> list[str]:
    """One group's presets: how to pick it and what it is."""
    files = sorted((CONF_DIR / group).glob("*.yaml"))
    firsts = {p: first_comment(p) for p in files}
    rows = ["| preset | use | description |", "|---|---|---|"]
    for p in files:
        text = firsts[p]
        # a sentence every preset of the group shares says nothing about this one
        if not text or sum(t == text for t in firsts.values()) > 1:
            text = _settings_summary(p) or text
        rows.append(f"| `{p.stem}` | `{usage.format(name=p.stem)}` | {_cell(text)} |")
    return rows


def render() -> str:
    """The whole of ``docs/settings.md``."""
    cfg, choices = compose()
    out = [
        "# Settings",
        "",
        "Every setting `python run.py` accepts, generated from the config schemas by "
        "`python -m pipeline.config.settings_doc` (do not edit by hand). Set a key on the "
        "command line as shown (`python run.py workload.max_new_tokens=64`); sweep it with "
        "`-m` and a comma list. A default is what `python run.py` runs with (the default "
        "preset of each group, `conf/config.yaml`); `null` means unset, and the description "
        "says what that does. Unknown keys and values out of range are refused before "
        "anything loads, naming the key and what is allowed.",
        "",
        "## Top-level keys",
        "",
        *_top_level(cfg, choices),
    ]
    for title, prefix, schema, intro in CORE_SECTIONS:
        group_yaml = (f"conf/{title}/{choices[title]}.yaml" if title in choices
                      else "conf/config.yaml")
        defaults = cfg.get(title) if isinstance(cfg.get(title), dict) else None
        out += ["", f"## {title}", "", intro, "", *_table(prefix, schema, defaults, group_yaml)]
    out += ["", "## Backends", "",
            "Each backend's settings, typed by its own config class (the yaml's `impl` names "
            "the backend class). Pick one with `backend=NAME`; the defaults below are that "
            "yaml's."]
    for name in SHIPPED_BACKENDS:
        bcfg, _ = compose(f"backend={name}")
        schema = _backend_class(bcfg["backend"]["impl"])
        out += ["", f"### backend={name}", "",
                f"{_cell(first_comment(CONF_DIR / 'backend' / f'{name}.yaml'))} "
                f"Config class: `{schema.__module__}.{schema.__qualname__}`.", "",
                *_table("backend", schema, bcfg["backend"], f"conf/backend/{name}.yaml")]
    out += ["", "## Presets", "",
            "The yaml files under `conf/`: each is a named set of values for its group."]
    for group, usage in PRESET_GROUPS:
        out += ["", f"### {group}", "", *_presets(group, usage)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/settings.md``; with ``--check``, exit 1 when it differs from the
    schemas instead."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when docs/settings.md is out of date; write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else ""
        if current != text:
            print(f"{DOC_PATH.relative_to(ROOT)} is out of date: run "
                  f"python -m pipeline.config.settings_doc", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {DOC_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
