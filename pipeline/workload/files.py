"""Prompts from files: .txt, .jsonl, .csv, .parquet and Hugging Face dataset folders.

Every format is read through the ``datasets`` library. For .txt and .jsonl a hand-written
pass over the lines runs first, because it can name the line at fault (not UTF-8, not
JSON, a missing field), which ``datasets`` cannot. Errors are one line naming the file
and, where one is at fault, the line or row.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.workload.base import Prompt

#: file types read as prompt files (a dataset folder saved with ``save_to_disk`` as well)
FILE_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
_BUILDERS = {".txt": "text", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_dataset_folder(p: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return p.is_dir() and any((p / m).is_file() for m in _DATASET_MARKERS)


def path_problem(path: str) -> str | None:
    """What is wrong with ``path`` as a prompts file, or None; checks only what ``stat``
    tells (existence, kind, emptiness, suffix), so it is cheap enough for validation."""
    p = Path(path).expanduser()
    if not p.exists():
        return "no such file"
    if p.is_dir():
        if is_dataset_folder(p):
            return None
        return ("is a folder but not a dataset saved with save_to_disk "
                "(no dataset_info.json, state.json or dataset_dict.json in it)")
    if not p.is_file():
        return "is not a regular file (a device, pipe or socket); give a file or dataset folder"
    if p.stat().st_size == 0:
        return "is empty"
    if p.suffix not in FILE_SUFFIXES:
        return ("must end in .txt, .jsonl, .csv or .parquet, or be a dataset folder saved "
                "with save_to_disk")
    return None


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _check_lines(p: Path, text: str, prompt_field: str) -> list[int]:
    """Line-numbered checks of a .txt/.jsonl file; returns the numbers of its non-blank
    lines (the rows ``datasets`` yields for .jsonl, which skips blank lines)."""
    lines: list[int] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        lines.append(lineno)
        if p.suffix != ".jsonl":
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: line {lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get(prompt_field), str):
            raise ConfigError(f"{p}: line {lineno}: needs a string field {prompt_field!r}")
    return lines


def _load_dataset(p: Path, split: str | None) -> Any:
    """The file or folder as a ``datasets.Dataset``, held in memory; nothing is left in any
    cache folder (the builders' arrow cache goes to a temporary folder)."""
    import datasets

    datasets.disable_progress_bars()  # check_inputs runs per job; no bars for tiny files
    if p.is_dir():
        ds = datasets.load_from_disk(str(p), keep_in_memory=True)
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds)
            chosen = split or ("train" if "train" in ds else names[0] if len(names) == 1
                               else None)
            if chosen not in ds:
                raise ConfigError(
                    f"workload.split={split!r} is invalid: {p} holds splits "
                    f"{', '.join(names)}; name one")
            ds = ds[chosen]
        return ds
    with tempfile.TemporaryDirectory(prefix="infersweep-datasets-") as cache:
        return datasets.load_dataset(_BUILDERS[p.suffix], data_files=str(p), split="train",
                                     cache_dir=cache, keep_in_memory=True)


def read_prompts_file(
    path: str | Path, max_bytes: int, max_chars: int, prompt_field: str = "prompt",
    reference_field: str | None = None, id_field: str | None = None,
    split: str | None = None,
) -> list[Prompt]:
    """Read prompts from a .txt file (one per line, blank lines skipped), a .jsonl, .csv or
    .parquet file, or a dataset folder (a ``prompt_field`` column each).

    ``reference_field`` (optional) is kept with each prompt, e.g. for quality scoring;
    ``id_field`` (optional) names each request, else it is ``line N`` (.txt, .jsonl) or
    ``row N`` (the others, 1-based).
    """
    p = Path(path).expanduser()
    problem = path_problem(str(path))
    if problem:
        raise ConfigError(f"workload.prompts_file={str(path)!r} is invalid: {problem}")
    size = _size(p)
    if size > max_bytes:
        raise ConfigError(
            f"workload.prompts_file={str(path)!r} is invalid: {size} bytes exceeds "
            f"workload.max_file_bytes={max_bytes}"
        )
    line_based = p.suffix in (".txt", ".jsonl") and p.is_file()
    lines: list[int] = []
    if line_based:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = p.read_bytes()[: e.start].count(b"\n") + 1
            raise ConfigError(
                f"workload.prompts_file={str(path)!r} is invalid: not UTF-8 (line {line})"
            ) from e
        lines = _check_lines(p, text, prompt_field)
        if p.suffix == ".txt" and (reference_field or id_field):
            key = "reference_field" if reference_field else "id_field"
            raise ConfigError(
                f"workload.{key}={reference_field or id_field!r} is invalid: a .txt line is "
                f"only a prompt; use .jsonl, .csv, .parquet or a dataset folder")
    try:
        ds = _load_dataset(p, split)
    except ConfigError:
        raise
    except Exception as e:  # datasets/pyarrow messages span lines; keep the first
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"workload.prompts_file={str(path)!r} is invalid: could not be "
                          f"read ({type(e).__name__}: {first})") from e
    column = "text" if p.suffix == ".txt" and p.is_file() else prompt_field
    for key, col in (("prompt_field", column), ("reference_field", reference_field),
                     ("id_field", id_field)):
        if col is not None and col not in ds.column_names:
            raise ConfigError(f"workload.{key}={col!r} is invalid: no such column in {p} "
                              f"(columns: {', '.join(ds.column_names)})")
    prompts_col = ds[column]
    refs = ds[reference_field] if reference_field else [None] * len(prompts_col)
    ids = ds[id_field] if id_field else [None] * len(prompts_col)
    prompts: list[Prompt] = []
    for row, (prompt, ref, rid) in enumerate(zip(prompts_col, refs, ids, strict=True)):
        if p.suffix == ".txt" and p.is_file():
            where = f"line {row + 1}"
            if not (prompt or "").strip():
                continue  # blank lines separate prompts in a .txt file
        elif p.suffix == ".jsonl" and p.is_file():
            where = f"line {lines[row]}"
        else:
            where = f"row {row + 1}"
        if prompt is not None and not isinstance(prompt, str):
            raise ConfigError(f"{p}: {where}: {column!r} is not a string "
                              f"({type(prompt).__name__})")
        if not (prompt or "").strip():
            raise ConfigError(f"{p}: {where}: empty prompt")
        if len(prompt) > max_chars:
            raise ConfigError(
                f"{p}: {where}: prompt of {len(prompt)} characters exceeds "
                f"workload.max_prompt_chars={max_chars}"
            )
        prompts.append(Prompt(prompt, request_id=str(rid) if rid is not None else where,
                              reference=None if ref is None else str(ref)))
    if not prompts:
        raise ConfigError(f"workload.prompts_file={str(path)!r} is invalid: no prompts in it")
    return prompts
