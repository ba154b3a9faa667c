"""Prompts to requests: load the workload's prompts, render and tokenize them, and cut
them into batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.config import WorkloadConfig
from pipeline.errors import ConfigError
from pipeline.records import Request, RequestRecord
from pipeline.workload.base import Prompt
from pipeline.workload.conversations import render_messages
from pipeline.workload.files import read_prompts_file
from pipeline.workload.lengths import sample_lengths

#: salts of the run's seed, one stream per purpose, so that changing one axis (say the
#: output distribution) leaves the others' draws (the input lengths, the text) alone
INPUT_SEED, OUTPUT_SEED = 1, 2


def load_prompts(w: WorkloadConfig) -> list[Prompt]:
    """The workload's prompts: from its file or inline, cut or cycled to ``num_prompts``.

    Synthetic workloads are built once the tokenizer is known (:func:`make_requests`);
    here they are ``num_prompts`` placeholders, so that the count is known before any
    model loads.
    """
    if w.source == "synthetic":
        assert w.num_prompts is not None, "validate_workload requires num_prompts"
        return [Prompt(f"<synthetic {i}>", request_id=f"synthetic {i}")
                for i in range(w.num_prompts)]
    if w.prompts_file:
        prompts = read_prompts_file(w.prompts_file, w.max_file_bytes, w.max_prompt_chars,
                                    w.prompt_field, w.reference_field, w.id_field, w.split)
    else:
        prompts = []
        for i, pr in enumerate(w.prompts):
            if not pr.strip():
                raise ConfigError(f"workload.prompts[{i}] is invalid: empty prompt")
            prompts.append(Prompt(pr, request_id=f"prompt {i}"))
    if w.num_prompts is not None:
        # Cycling lets a batch-size sweep use more requests than the prompt list holds;
        # a repeat gets "#k" on its id so that ids stay unique.
        cycled = []
        for i in range(w.num_prompts):
            src, k = prompts[i % len(prompts)], i // len(prompts)
            rid = src.request_id if k == 0 else f"{src.request_id}#{k}"
            cycled.append(Prompt(src, request_id=rid, reference=src.reference))
        prompts = cycled
    return prompts


def render_prompt(tokenizer: Any, prompt: str, use_chat_template: bool) -> list[int]:
    """Token ids of ``prompt`` as the model sees it: wrapped in the tokenizer's chat
    template as one user turn when asked for and available, else tokenized plainly."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return render_messages(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt)["input_ids"])


def output_lengths(w: WorkloadConfig, n: int, seed: int) -> list[int | None]:
    """Per-request output lengths; None for every request when the length is fixed (the
    backend then uses ``workload.max_new_tokens`` for the whole batch)."""
    if w.output_dist == "fixed":
        return [None] * n
    return list(sample_lengths(w.output_dist, w.max_new_tokens, w.output_std, w.output_min,
                               w.output_max, n, [seed, OUTPUT_SEED]))


def _truncate(tokenizer: Any, render: Any, text: str, limit: int) -> str | None:
    """The longest cut of ``text`` (at a token boundary) that renders to at most ``limit``
    tokens; None when even one content token does not fit."""
    content = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    k = limit - (len(render(text)) - len(content))  # the template's tokens stay
    tried: set[int] = set()
    while k >= 1 and k not in tried:
        tried.add(k)
        cut = tokenizer.decode(content[:k])
        n = len(render(cut))
        if n <= limit:
            return cut
        k -= n - limit
    return None


def _file_requests(prompts: Sequence[str], render: Any, tokenizer: Any, w: WorkloadConfig,
                   outs: list[int | None]) -> list[Request]:
    requests: list[Request] = []
    too_long: list[tuple[str, int]] = []
    for i, p in enumerate(prompts):
        rid = getattr(p, "request_id", None) or f"prompt {i}"
        ids = render(p)
        text, truncated_from = str(p), None
        if w.max_input_tokens is not None and len(ids) > w.max_input_tokens:
            cut = None
            if w.on_too_long == "truncate":
                cut = _truncate(tokenizer, render, text, w.max_input_tokens)
            if cut is None:
                too_long.append((rid, len(ids)))
                continue
            text, truncated_from, ids = cut, len(ids), render(cut)
            if len(ids) > w.max_input_tokens:  # _truncate checked; guard the invariant
                raise RuntimeError(f"request {rid}: truncated to {len(ids)} tokens, "
                                   f"above workload.max_input_tokens={w.max_input_tokens}")
        requests.append(Request(
            index=i, prompt=text, prompt_token_ids=tuple(ids), max_new_tokens=outs[i],
            reference=getattr(p, "reference", None), request_id=rid,
            truncated_from=truncated_from))
    if too_long:
        listed = ", ".join(f"{rid} ({n} tokens)" for rid, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        how = ("the chat template alone does not fit; raise the limit"
               if w.on_too_long == "truncate"
               else "use workload.on_too_long=truncate or raise the limit")
        raise ConfigError(
            f"workload.max_input_tokens={w.max_input_tokens} is exceeded by "
            f"{len(too_long)} prompt(s): {listed}{more}; {how}")
    return requests


def make_requests(prompts: Sequence[str], tokenizer: Any, use_chat_template: bool,
                  workload: WorkloadConfig | None = None, seed: int = 0) -> list[Request]:
    """Number and tokenize the prompts as requests (rendered as the model sees them).

    With ``workload.source=synthetic`` the prompts are built here, since their lengths
    are counted in this tokenizer's tokens: ``len(prompts)`` of them, each exactly its
    target length (verified). ``workload.max_input_tokens`` truncates or refuses long
    prompts, and a non-fixed ``workload.output_dist`` sets each request's
    ``max_new_tokens``; both are seeded by ``seed``.
    """
    w = workload or WorkloadConfig()

    def render(text: str) -> list[int]:
        return render_prompt(tokenizer, text, use_chat_template)

    outs = output_lengths(w, len(prompts), seed)
    if w.source != "synthetic":
        return _file_requests(prompts, render, tokenizer, w, outs)

    from pipeline.workload.synthetic import build_synthetic

    targets = sample_lengths(w.input_dist, w.input_tokens, w.input_std, w.input_min,
                             w.input_max, len(prompts), [seed, INPUT_SEED])
    built = build_synthetic(render, tokenizer, targets, w.shared_prefix_tokens,
                            w.prefix_groups, seed)
    requests = [
        Request(index=i, prompt=b.text, prompt_token_ids=tuple(b.ids), max_new_tokens=outs[i],
                request_id=f"synthetic {i}", prefix_group=b.prefix_group,
                group_position=b.group_position)
        for i, b in enumerate(built)
    ]
    for r, t in zip(requests, targets, strict=True):
        # what backends are fed: the stored text must render back to the stored ids
        if len(r.prompt_token_ids) != t or tuple(render(r.prompt)) != r.prompt_token_ids:
            raise RuntimeError(f"synthetic request {r.index}: does not render to exactly "
                               f"{t} tokens")
    return requests


def batches(requests: list[Request], batch_size: int) -> list[list[Request]]:
    """Consecutive slices of ``batch_size`` (the last may be shorter)."""
    return [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]


_EXTRA_FIELDS = ("request_id", "prefix_group", "group_position", "max_new_tokens",
                 "truncated_from", "reference")


def request_extra(request: Request) -> dict[str, Any]:
    """The workload facts about ``request`` worth keeping in its record's ``extra`` (so a
    report can, e.g., compare the first request of a prefix group with the rest)."""
    return {k: getattr(request, k) for k in _EXTRA_FIELDS
            if getattr(request, k, None) is not None}


def annotate_records(records: list[RequestRecord], requests: list[Request]) -> None:
    """Copy :func:`request_extra` into each record's ``extra`` (a backend's own keys win)."""
    by_index = {q.index: q for q in requests}
    for r in records:
        q = by_index.get(r.index)
        if q is not None:
            for k, v in request_extra(q).items():
                r.extra.setdefault(k, v)
