"""The command-line pre-check: ``group=name`` overrides naming no yaml are refused in one
line before Hydra composes."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.validation import fail

GROUPS = ("model", "backend", "decoding", "workload", "experiment", "target", "gguf_arm")


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Reject ``group=name`` overrides naming no yaml in ``conf/<group>/`` (or in a
    ``hydra.searchpath`` folder given on the command line) in one line, before Hydra
    composes (its own message spans a screen)."""
    dirs = [conf_dir]
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra.searchpath":
            dirs += [Path(v.strip().removeprefix("file://")) for v in
                     value.strip("[]").split(",") if v.strip().startswith(("file://", "/"))]
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS:
            continue
        allowed = sorted({p.stem for d in dirs for p in (d / key).glob("*.yaml")})
        for choice in value.split(","):
            choice = choice.strip()
            # sweep syntax (glob(...), range(...)) is Hydra's to expand
            if choice and "(" not in choice and choice not in allowed:
                fail(key, choice, f"allowed values are {', '.join(allowed)}")
