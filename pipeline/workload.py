"""Prompts and batches: turn a workload config into the requests a backend receives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.backends.base import Request
from pipeline.config import ConfigError, WorkloadConfig


def read_prompts_file(path: str | Path, max_bytes: int, max_chars: int) -> list[str]:
    """Read prompts from ``.txt`` (one per line, blank lines skipped) or ``.jsonl``
    (one JSON object per line with a string ``prompt`` field).

    Errors name the file and, where one is at fault, the line number.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"workload.prompts_file={str(path)!r} is invalid: no such file")
    size = p.stat().st_size
    if size > max_bytes:
        raise ConfigError(
            f"workload.prompts_file={str(path)!r} is invalid: {size} bytes exceeds "
            f"workload.max_file_bytes={max_bytes}"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"workload.prompts_file={str(path)!r} is invalid: not UTF-8 (line {line})"
        ) from e
    prompts: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: line {lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ConfigError(f"{p}: line {lineno}: needs a string field 'prompt'")
            prompt = obj["prompt"]
        else:
            prompt = raw
        if not prompt.strip():
            raise ConfigError(f"{p}: line {lineno}: empty prompt")
        if len(prompt) > max_chars:
            raise ConfigError(
                f"{p}: line {lineno}: prompt of {len(prompt)} characters exceeds "
                f"workload.max_prompt_chars={max_chars}"
            )
        prompts.append(prompt)
    if not prompts:
        raise ConfigError(f"workload.prompts_file={str(path)!r} is invalid: no prompts in it")
    return prompts


def load_prompts(w: WorkloadConfig) -> list[str]:
    """The workload's prompts: from its file or inline, cut or cycled to ``num_prompts``."""
    if w.prompts_file:
        prompts = read_prompts_file(w.prompts_file, w.max_file_bytes, w.max_prompt_chars)
    else:
        prompts = list(w.prompts)
        for i, pr in enumerate(prompts):
            if not pr.strip():
                raise ConfigError(f"workload.prompts[{i}] is invalid: empty prompt")
    if w.num_prompts is not None:
        # Cycling lets a batch-size sweep use more requests than the prompt list holds.
        prompts = [prompts[i % len(prompts)] for i in range(w.num_prompts)]
    return prompts


def render_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> list[int]:
    """Token ids of ``prompt`` as the model sees it: wrapped in the tokenizer's chat
    template as one user turn when asked for and available, else tokenized plainly."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def make_requests(prompts: list[str], tokenizer: Any, use_chat_template: bool) -> list[Request]:
    """Number and tokenize the prompts as requests."""
    return [
        Request(index=i, prompt=p, prompt_token_ids=tuple(render_prompt(tokenizer, p,
                                                                        use_chat_template)))
        for i, p in enumerate(prompts)
    ]


def batches(requests: list[Request], batch_size: int) -> list[list[Request]]:
    """Consecutive slices of ``batch_size`` (the last may be shorter)."""
    return [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]


def arrival_offsets(
    n: int, rate: float | None, arrival: str = "poisson", burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Send times (seconds from the start) of ``n`` requests.

    ``rate=None`` sends all at once. Otherwise inter-arrival gaps are gamma-distributed
    with shape ``burstiness`` and mean ``1/rate`` (vLLM's convention): shape 1 is a
    Poisson process, below 1 burstier, above 1 more regular.
    """
    import numpy as np

    if rate is None:
        return [0.0] * n
    shape = 1.0 if arrival == "poisson" else burstiness
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), size=n)
    gaps[0] = 0.0  # the first request goes out at once
    return [float(x) for x in np.cumsum(gaps)]
