"""Perplexity of the generated continuations under a scorer model.

Only continuation tokens are scored: the prompt is context, its labels are masked. The
corpus perplexity is ``exp(sum of NLL / number of scored tokens)``, so long continuations
weigh more than short ones, as in a language-modelling evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def corpus_perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(Σ nll / Σ tokens) over sequences; sequences with no tokens contribute nothing."""
    total = sum(token_counts)
    if total == 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(sum(nll_sums) / total)


def continuation_nll(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    continuation_ids: Sequence[Sequence[int]],
    device: str = "cpu",
    batch_size: int = 8,
) -> tuple[list[float], list[int]]:
    """Summed negative log-likelihood (nats) and token count of each continuation given
    its prompt, under ``model`` (a causal LM). Batches are right-padded; padding and
    prompt positions are masked out of the loss."""
    import torch

    nlls: list[float] = []
    counts: list[int] = []
    pairs = list(zip(prompt_ids, continuation_ids, strict=True))
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b : b + batch_size]
        seqs = [list(p) + list(c) for p, c in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, ((p, c), s) in enumerate(zip(chunk, seqs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            labels[i, len(p) : len(s)] = torch.tensor(list(c), dtype=torch.long)
        ids, attn, labels = ids.to(device), attn.to(device), labels.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
        # position t predicts token t+1
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = labels[:, 1:]
        mask = tgt != -100
        picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = -(picked * mask).sum(dim=1)
        nlls.extend(float(x) for x in nll)
        counts.extend(int(x) for x in mask.sum(dim=1))
    return nlls, counts


def perplexity_metrics(nll_sums: Sequence[float], token_counts: Sequence[int]) -> dict[str, float]:
    """Corpus perplexity plus the mean of per-sequence perplexities (for spread)."""
    per_seq = [math.exp(n / c) for n, c in zip(nll_sums, token_counts, strict=True) if c > 0]
    if not per_seq:
        return {}
    return {
        "perplexity": corpus_perplexity(nll_sums, token_counts),
        "perplexity_seq_mean": sum(per_seq) / len(per_seq),
        "perplexity_tokens": float(sum(token_counts)),
    }
