"""Workloads: what a job sends — inline prompts, prompt files and datasets, synthetic
prompts of exact token lengths with shared prefixes, or a replayed request trace — and when
(batches, arrivals, a trace's own times).

- :mod:`.prompts` loads prompts and renders them into :class:`~pipeline.records.Request`
- :mod:`.files` reads .txt/.jsonl/.csv/.parquet files and dataset folders (``datasets``)
- :mod:`.synthetic` builds prompts of exact rendered lengths, optionally sharing prefixes
- :mod:`.lengths` the input/output length distributions
- :mod:`.limits` refuses impossible lengths before any model loads
- :mod:`.arrivals` send times for online backends
- :mod:`.trace` trace replay: a trace file's requests, their token blocks and send times
- :mod:`.sources` :func:`load_prompts`, whatever the source

The names below are imported from their submodule on first use (PEP 562): the package
itself imports nothing at load time, so ``pipeline.config`` can use a submodule while the
submodules use ``pipeline.config``, without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.workload.arrivals import arrival_offsets
    from pipeline.workload.base import Prompt
    from pipeline.workload.files import read_prompts_file
    from pipeline.workload.limits import check_limits
    from pipeline.workload.prompts import (
        annotate_records,
        batches,
        make_requests,
        render_prompt,
        request_extra,
    )
    from pipeline.workload.sources import load_prompts

_EXPORTS = {
    "Prompt": "base",
    "annotate_records": "prompts",
    "arrival_offsets": "arrivals",
    "batches": "prompts",
    "check_limits": "limits",
    "load_prompts": "sources",
    "make_requests": "prompts",
    "read_prompts_file": "files",
    "render_prompt": "prompts",
    "request_extra": "prompts",
}

__all__ = [
    "Prompt",
    "annotate_records",
    "arrival_offsets",
    "batches",
    "check_limits",
    "load_prompts",
    "make_requests",
    "read_prompts_file",
    "render_prompt",
    "request_extra",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value
