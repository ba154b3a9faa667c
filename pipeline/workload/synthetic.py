"""Synthetic prompts with an exact rendered length, optionally sharing prefixes.

The text is English prose shipped with the project (``corpus.txt``, written for it), cut
at token boundaries: never random token ids, whose attention patterns and KV cache would
look nothing like real text. A request's length is what the model sees: the chat template
is applied when the model uses one, and the rendered ids are counted. Cutting text at a
token boundary and re-tokenizing does not always give back the same tokens, so each prompt
is built by tokenize -> cut -> decode -> render -> count, adjusting the cut until the
count is exact, and every request is verified at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from pipeline.errors import ConfigError

Render = Callable[[str], list[int]]

#: tries per request: cut adjustments at one start, and starts before giving up
_ADJUST_STEPS = 16
_STARTS = 64


@cache
def corpus_text() -> str:
    """The shipped corpus: paragraphs of plain ASCII English prose."""
    text = resources.files("pipeline.workload").joinpath("corpus.txt").read_text("utf-8")
    return "\n\n".join(p.strip() for p in text.split("\n\n") if p.strip())


class Corpus:
    """The corpus as one endless token stream (it repeats) under one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(
            tokenizer(corpus_text() + "\n\n", add_special_tokens=False)["input_ids"])
        singles = tokenizer.batch_decode([[t] for t in self.ids])
        pairs = tokenizer.batch_decode(
            [[self.ids[i - 1], self.ids[i]] for i in range(len(self.ids))])
        # Cuts start at a word (" word"): there the byte-level and sentencepiece
        # tokenizers both start a new token, so what comes before cannot merge with it.
        self.word_starts: list[int] = []
        for i in range(1, len(self.ids)):
            added = pairs[i][len(singles[i - 1]):] if pairs[i].startswith(singles[i - 1]) \
                else ""
            if added[:1] == " " and added[1:2].isalpha():
                self.word_starts.append(i)
        if not self.word_starts:
            raise RuntimeError("the synthetic corpus has no word boundaries under this "
                               "tokenizer")

    def text(self, start: int, n: int) -> str:
        """The text of ``n`` stream tokens from ``start`` (wrapping around)."""
        size = len(self.ids)
        return self.tokenizer.decode([self.ids[(start + k) % size] for k in range(n)])


def template_overhead(render: Render) -> tuple[int, int]:
    """Tokens the rendering adds before and after the content (chat template header and
    footer, BOS): the common prefix and suffix of unrelated renders, which start and end
    with different characters so that no content token is counted."""
    probes = [render(t) for t in ("Hello there", "Quiet rivers run deep tonight!", "7 + 5?")]
    head = min(common_prefix(probes[0], b) for b in probes[1:])
    tail = min(common_prefix(probes[0][::-1], b[::-1]) for b in probes[1:])
    return head, tail


@dataclass
class Built:
    """One synthetic prompt: its text (the content of the user turn) and rendered ids."""

    text: str
    ids: list[int]
    prefix_group: int | None = None
    group_position: int | None = None


def _fit(render: Render, corpus: Corpus, prefix: str, start: int, target: int, n: int
         ) -> Built | None:
    """``prefix`` + corpus text from ``start`` whose rendering is exactly ``target``
    tokens, adjusting the number of corpus tokens ``n``; None when no cut at this start
    is exact (re-tokenization jumps over the target)."""
    tried: set[int] = set()
    while n >= 1 and n not in tried:
        tried.add(n)
        body = corpus.text(start, n)
        text = prefix + body if prefix else body.lstrip()
        ids = render(text)
        if len(ids) == target:
            return Built(text, ids)
        n -= len(ids) - target
    return None


def _starts(corpus: Corpus, rng: Any) -> list[int]:
    """Candidate start positions: a random word start, then the ones after it."""
    ws = corpus.word_starts
    first = int(rng.integers(len(ws)))
    return [ws[(first + k) % len(ws)] for k in range(min(_STARTS, len(ws)))]


def build_synthetic(
    render: Render, tokenizer: Any, targets: list[int], shared_prefix_tokens: int,
    prefix_groups: int, seed: int,
) -> list[Built]:
    """One prompt per target length (rendered tokens), deterministic under ``seed``.

    With ``shared_prefix_tokens`` P > 0 the requests are split into ``prefix_groups``
    contiguous groups; the members of a group share exactly their first P rendered tokens
    (chat template header included) and the groups' prefixes differ.
    """
    import numpy as np

    corpus = Corpus(tokenizer)
    head, tail = template_overhead(render)
    p = shared_prefix_tokens
    key = "workload.input_min" if len(set(targets)) > 1 else "workload.input_tokens"
    need = max(head, p) + tail + 1
    if min(targets) < need:
        what = f"the rendering adds {head + tail} tokens (chat template, special tokens)"
        if p:
            what += f" and the shared prefix takes {p}"
        raise ConfigError(f"{key}={min(targets)} is invalid: {what}; use at least {need}")
    if p and p <= head:
        raise ConfigError(
            f"workload.shared_prefix_tokens={p} is invalid: the chat template's header "
            f"alone is {head} tokens, which every request shares; use more than {head}")
    rng = np.random.default_rng([seed, 3])
    n = len(targets)
    groups = prefix_groups if p else 1
    group_of = [i * groups // n for i in range(n)]
    prefixes: list[Built | None] = [None] * groups
    if p:
        firsts: set[int] = set()
        for g in range(groups):
            spare: Built | None = None
            for s in _starts(corpus, rng):
                built = _fit(render, corpus, "", s, p + tail, p - head)
                if built is None:
                    continue
                # prefer a first content token no other group starts with: then groups
                # diverge right after the header
                if built.ids[head] not in firsts:
                    prefixes[g] = built
                    break
                spare = spare or built
            chosen_prefix = prefixes[g] or spare
            if chosen_prefix is None:
                raise RuntimeError(f"no {p}-token shared prefix fits exactly under this "
                                   "tokenizer")
            prefixes[g] = chosen_prefix
            firsts.add(chosen_prefix.ids[head])
    out: list[Built] = []
    used: dict[int, set[int]] = {g: set() for g in range(groups)}
    position = [0] * groups
    for i, target in enumerate(targets):
        g = group_of[i]
        pre = prefixes[g]
        pre_text, pre_ids = (pre.text, pre.ids[:p]) if pre is not None else ("", [])
        fallback: Built | None = None
        chosen: Built | None = None
        for s in _starts(corpus, rng):
            built = _fit(render, corpus, pre_text, s, target, target - max(head, p) - tail)
            if built is None or built.ids[:p] != pre_ids:
                continue
            if not p or built.ids[p] not in used[g]:
                chosen = built
                break
            fallback = fallback or built  # shares more than P with a sibling: last resort
        chosen = chosen or fallback
        if chosen is None:
            raise RuntimeError(f"synthetic request {i}: no prompt of exactly {target} "
                               "rendered tokens found under this tokenizer")
        if p:
            used[g].add(chosen.ids[p])
            chosen.prefix_group, chosen.group_position = g, position[g]
            position[g] += 1
        out.append(chosen)
    verify(out, targets, p)
    return out


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    """Length of the longest common prefix of two id sequences."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def verify(built: list[Built], targets: list[int], p: int) -> None:
    """Raise unless every prompt renders to its target exactly and, with a shared prefix,
    every group shares exactly its first ``p`` tokens and no two groups share them."""
    for i, (b, t) in enumerate(zip(built, targets, strict=True)):
        if len(b.ids) != t:
            raise RuntimeError(f"synthetic request {i}: rendered to {len(b.ids)} tokens, "
                               f"expected exactly {t}")
    if not p:
        return
    groups: dict[int, list[Built]] = {}
    for b in built:
        groups.setdefault(b.prefix_group or 0, []).append(b)
    for g, members in groups.items():
        first = members[0].ids
        shared = min((common_prefix(first, m.ids) for m in members[1:]), default=p)
        if shared != p:
            raise RuntimeError(f"prefix group {g}: its requests share {shared} leading "
                               f"tokens, expected exactly {p}")
    heads = [tuple(m[0].ids[:p]) for m in groups.values()]
    if len(set(heads)) != len(heads):
        raise RuntimeError("two prefix groups got the same shared prefix")
