"""Flattening a typed config into ``a.b.c -> value`` pairs, as tracking logs them."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dataclass/dict config into ``a.b.c -> value`` (lists as strings)."""
    out: dict[str, Any] = {}
    if hasattr(obj, "__dataclass_fields__"):
        items = ((f.name, getattr(obj, f.name)) for f in fields(obj))
    elif isinstance(obj, dict):
        items = obj.items()
    else:
        return {prefix: obj}
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if hasattr(v, "__dataclass_fields__") or isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
