"""Backend registry: a backend yaml names its class (``impl: module:Class``); the class
is imported only when a config uses it, and owns its schema and plug-in points.

Adding a backend is one module (a :class:`~pipeline.backends.base.Backend` subclass) and
one yaml in ``conf/backend/`` naming it; nothing else in the pipeline changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.backends.base import Backend
    from pipeline.config import Config


def backend_class(impl: Any) -> type[Backend]:
    """Import and return the :class:`Backend` subclass named ``"module:Class"``."""
    from pipeline.backends.base import Backend

    if not isinstance(impl, str) or impl.count(":") != 1:
        raise ConfigError(f"backend.impl={impl!r} is invalid: must be 'module:Class' naming "
                          f"a Backend subclass (each yaml in conf/backend/ sets it)")
    module, name = impl.split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"backend.impl={impl!r} is invalid: cannot import it "
                          f"({type(e).__name__}: {e})".splitlines()[0]) from e
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"backend.impl={impl!r} is invalid: not a Backend subclass")
    return cls


def make_backend(spec: Config, model_dir: str) -> Backend:
    """Construct (not load) the configured backend."""
    cls = backend_class(spec.backend.impl)
    return cls(model_dir, spec.model, spec.backend, spec.seed)


def loaded_classes() -> Iterator[type[Backend]]:
    """Every Backend subclass imported in this process (nothing is imported for it)."""
    from pipeline.backends.base import Backend

    todo, seen = list(Backend.__subclasses__()), set()
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
            yield cls


def _distinct(method: str) -> Iterator[Any]:
    """Each distinct implementation of a classmethod among the loaded classes (a subclass
    that inherits it must not run it twice)."""
    seen = set()
    for cls in loaded_classes():
        fn = getattr(cls, method)
        if fn.__func__ not in seen:
            seen.add(fn.__func__)
            yield fn


def cached_engines() -> int:
    """Engines and servers the loaded backends keep alive between jobs in this process."""
    return sum(fn() for fn in _distinct("cached_engines"))


def shutdown_all() -> int:
    """Stop every engine and server the loaded backends keep; returns how many stopped.
    Run at the end of a sweep; never imports an engine that was not used."""
    return sum(fn() for fn in _distinct("shutdown_cached"))
