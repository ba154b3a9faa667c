"""One decoding spec, translated for each engine.

Every translation is explicit: each field of :class:`DecodingConfig` is either mapped or
refused with :class:`UnsupportedDecoding` naming the backend, the parameter and what to use
instead. Nothing is silently dropped, and no model default leaks in (e.g. a model's
``generation_config.top_k=50``), because every field is always passed.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import UnsupportedDecoding


def refuse(backend: str, key: str, value: Any, instead: str) -> None:
    """Raise the one refusal every backend gives for a decoding option it cannot honour:
    the backend, the ``decoding.<key>`` and its value, and what to use instead."""
    raise UnsupportedDecoding(
        f"backend {backend}: decoding.{key}={value!r} is not supported; {instead}"
    )
