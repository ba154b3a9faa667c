"""Reading a one-record-a-line file that a workload replays (a trace, a conversations
file): the checks before reading, and the text once read, each refusal naming the key and
the file. Parsing the lines is each format's own (:mod:`.trace`, :mod:`.conversations`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")


def refusal(key: str, path: str, why: str) -> ConfigError:
    """``workload.<key>=<path> is invalid: <why>``."""
    return ConfigError(f"workload.{key}={path!r} is invalid: {why}")


def read_lines_file(key: str, path: str, suffixes: Sequence[str], what: str,
                    max_bytes: int, parse: Callable[[str, str], T]) -> T:
    """``parse(path, text)`` of the file at ``path`` once its suffix (one of ``suffixes``;
    ``what`` says what they are), existence, permission and size (1 to ``max_bytes``
    bytes) were checked. The result is cached on the file's path, modification time and
    size, so that validation and the requests share one parse of an unchanged file."""
    p = Path(path).expanduser()
    if p.suffix not in suffixes:
        raise refusal(key, path, f"must end in {what}")
    if not p.is_file():
        raise refusal(key, path, "no such file" if not p.exists() else "is not a regular file")
    if not os.access(p, os.R_OK):
        raise refusal(key, path, "cannot be read (permission denied)")
    st = p.stat()
    if st.st_size == 0:
        raise refusal(key, path, "is empty")
    if st.st_size > max_bytes:
        raise refusal(key, path, f"is {st.st_size} bytes, above "
                                 f"workload.max_file_bytes={max_bytes}")
    return _parsed(key, str(p), st.st_mtime_ns, st.st_size, parse)


def json_lines(key: str, path: str, text: str) -> Iterator[tuple[int, Any]]:
    """(line number from 1, decoded value) of each non-blank line of a ``.jsonl`` text; a
    line that is not JSON is refused naming it."""
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            raise refusal(key, path, f"line {line}: not valid JSON ({e.msg})") from e


@lru_cache(maxsize=16)
def _parsed(key: str, path: str, mtime_ns: int, size: int,
            parse: Callable[[str, str], T]) -> T:
    try:
        text = Path(path).read_text("utf-8")
    except UnicodeDecodeError as e:
        raise refusal(key, path, f"is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise refusal(key, path, f"cannot be read ({e.strerror})") from e
    return parse(path, text)
