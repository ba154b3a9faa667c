"""Reading the attribute docstrings of config dataclass fields (the string literal right
after a field), the descriptions ``docs/settings.md`` shows."""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import fields


def _own_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings written in ``cls``'s own class body (not its bases')."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built in or defined where no source is kept
        return {}
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field of ``cls`` mapped to its attribute docstring ("" when it has
    none), in field order. Bases are read too (walking the MRO), so a backend config
    that inherits ``BackendConfig`` gets the base's descriptions; a subclass's own
    docstring for a field wins over its base's."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            docs.update({k: v for k, v in _own_docs(klass).items() if v.strip()})
    return {f.name: docs.get(f.name, "") for f in fields(cls)}
