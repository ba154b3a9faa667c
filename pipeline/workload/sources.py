"""The one entry point to a workload's prompts, whatever their source: a trace's lines
(:mod:`.trace`), conversations' turns (:mod:`.conversations`), or inline prompts, prompt
files and synthetic placeholders (:mod:`.prompts`). ``pipeline.workload.load_prompts`` is
this function."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import WorkloadConfig
    from pipeline.workload.base import Prompt


def load_prompts(w: WorkloadConfig) -> list[Prompt]:
    """The workload's prompts before tokenization (see
    :func:`pipeline.workload.prompts.load_prompts`); with ``source=trace`` one placeholder
    per replayed line, its id ``line N``, built into token ids once the tokenizer loads;
    with ``source=conversations`` one placeholder per turn (``<conversation> turn <k>``)."""
    if w.source == "conversations":
        from pipeline.workload.conversations import conversation_prompts

        return conversation_prompts(w)
    if w.source == "trace":
        from pipeline.workload.trace import trace_prompts

        return trace_prompts(w)
    from pipeline.workload.prompts import load_prompts as from_prompts

    return from_prompts(w)
