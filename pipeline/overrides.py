"""Command-line overrides, checked before Hydra runs anything.

Hydra refuses an override of a key the config does not have ("Key 'quantization' is not
in struct") or a value of the wrong type in a multi-line message, with exit code 1. Here
the same overrides are composed first, through Hydra's own compose API, and such a
refusal becomes the project's one line: the key, the value, what is allowed, exit 2.
Sweeps are composed once with the first value of each swept key, and once more for each
other choice of a swept config group (``backend=hf,vllm``), since keys differ by group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

#: Hydra's own command-line flags that change what is composed: the check stays out
_HYDRA_FLAGS = ("--cfg", "-c", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--package", "-p", "--info", "-i", "--help", "-h",
                "--hydra-help", "--run", "-r", "--shell-completion", "-sc",
                "--experimental-rerun")
_MULTIRUN = ("-m", "--multirun")
_CHOICE_SWEEPS = ("SIMPLE_CHOICE_SWEEP", "CHOICE_SWEEP")


def _variants(args: list[str]) -> list[list[str]]:
    """Override lists to compose: first values, then each other choice of a swept group."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(args)
    base: list[str] = []
    alternatives: list[tuple[int, list[str]]] = []
    for o in parsed:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            if key == "hydra.searchpath":  # where extra config groups live
                base.append(o.input_line)
            continue
        if not o.is_sweep_override():
            base.append(o.input_line)
            continue
        if o.value_type is None or o.value_type.name not in _CHOICE_SWEEPS:
            continue  # range(), interval(), glob(): Hydra's to expand and check
        values = list(o.sweep_string_iterator())
        if not values:
            continue
        head = o.get_key_element()
        base.append(f"{head}={values[0]}")
        if "." not in key and len(values) > 1:  # a config group: its keys differ by choice
            alternatives.append((len(base) - 1, [f"{head}={v}" for v in values[1:]]))
    out = [base]
    for i, alts in alternatives:
        out += [base[:i] + [a] + base[i + 1:] for a in alts]
    return out


def _allowed_keys(conf_dir: Path, overrides: list[str], full_key: str) -> list[str]:
    """The keys the node holding ``full_key`` has once the bad override is left out."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    parent = full_key.rpartition(".")[0]
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != full_key]
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose("config", overrides=rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(str(k) for k in node) if node is not None else []
    except Exception:  # the allowed keys are a courtesy; the refusal stands without them
        return []


def _one_line(e: Exception, overrides: list[str], conf_dir: Path) -> ConfigError | None:
    """The project's refusal for Hydra's composition error ``e``; None when ``e`` is not
    about a key or a value (Hydra's own message then stands)."""
    cause: Any = e.__cause__
    full_key = getattr(cause, "full_key", None)
    if not full_key:
        return None
    value = next((o.partition("=")[2] for o in overrides
                  if o.lstrip("+~").partition("=")[0] == full_key), None)
    msg = str(cause).splitlines()[0]
    shown = f"{full_key}={value}" if value is not None else full_key
    if "not in" in msg:  # "Key 'x' is not in struct", "Key 'x' not in 'ModelConfig'"
        allowed = _allowed_keys(conf_dir, overrides, full_key)
        where = f"; allowed keys are {', '.join(allowed)}" if allowed else ""
        return ConfigError(f"{shown} is invalid: unknown key{where}")
    return ConfigError(f"{shown} is invalid: {msg}")


def check_overrides(argv: list[str], conf_dir: Path) -> None:
    """Compose the command line's overrides as Hydra will and refuse a bad key or value
    in one line (:class:`ConfigError`); silent for everything Hydra reports better itself
    (syntax, missing config groups) and when Hydra flags change what is composed."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    if any(a.split("=")[0] in _HYDRA_FLAGS for a in argv):
        return
    args = [a for a in argv if a not in _MULTIRUN]
    try:
        variants = _variants(args)
    except Exception:  # a syntax error: Hydra's message names the position
        return
    for overrides in variants:
        try:
            with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
                compose("config", overrides=overrides)
        except ConfigCompositionException as e:
            err = _one_line(e, overrides, conf_dir)
            if err is not None and len(variants) > 1:  # say which sweep choice refused it
                groups = [o for o in overrides if "." not in o.partition("=")[0]
                          and "=" in o and not o.startswith("hydra")]
                err = ConfigError(f"{err} (with {' '.join(groups)})")
            if err is not None:
                raise err from e
            return
        except Exception:
            return
