"""Scoring a job's generations: perplexity of the continuations under the scorer model,
diversity of the generations, and the reference metrics where requests carry references."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.backends.base import Backend
from pipeline.config import Config
from pipeline.records import RequestRecord

log = logging.getLogger(__name__)


def score(spec: Config, model_dir: str, backend: Backend, records: list[RequestRecord],
          requests: list) -> dict[str, float]:
    """Perplexity (continuations under the scorer), diversity of the generations and the
    reference metrics (``scoring.reference_metrics``) where requests carry references."""
    from pipeline.metrics import diversity, quality, reference

    out: dict[str, float] = {}
    ok = [r for r in records if r.ok]
    texts = [r.text for r in ok]
    if spec.scoring.diversity and texts:
        out.update(diversity.diversity_metrics(
            texts, max_self_bleu_samples=spec.scoring.self_bleu_max_samples, seed=spec.seed))
    ref_names = reference.resolve_metrics(spec.scoring, spec.workload.name)
    if ref_names and any(q.reference is not None for q in requests):
        out.update(reference.score_records(ref_names, ok, requests, spec.scoring))
    # servers without token ids (plain OpenAI endpoints) cannot be scored token-exactly
    ok = [r for r in ok if r.output_token_ids] if not spec.scoring.scorer_path else ok
    if spec.scoring.perplexity and any(r.output_tokens for r in ok):
        scorer, device, reuse = _scorer(spec, model_dir, backend)
        by_index = {q.index: q for q in requests}
        if spec.scoring.scorer_path:
            tok = scorer_tokenizer(spec.scoring.scorer_path, spec)
            prompts = [tok(by_index[r.index].prompt)["input_ids"] for r in ok]
            conts = [tok(r.text, add_special_tokens=False)["input_ids"] for r in ok]
        else:
            prompts = [list(by_index[r.index].prompt_token_ids) for r in ok]
            conts = [r.output_token_ids for r in ok]
        nlls, counts = quality.continuation_nll(scorer, prompts, conts, device=device,
                                                   batch_size=spec.scoring.batch_size)
        out.update(quality.perplexity_metrics(nlls, counts))
        if not reuse:
            del scorer
    return out


def scorer_tokenizer(path: str, spec: Config) -> Any:
    """The tokenizer of a separate scorer model (``scoring.scorer_path``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=spec.model.trust_remote_code)


def _scorer(spec: Config, model_dir: str, backend: Backend) -> tuple[Any, str, bool]:
    """The scorer model: the backend's own HF model when it already is the scorer (same
    weights, same dtype), else a fresh load. ``scoring.scorer_dtype=auto`` is the
    generating model's dtype on CUDA (so the loaded model is reused: one copy on the card)
    and float32 on the CPU (:func:`pipeline.gpu_memory.scorer_dtype_name`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.devices import resolve_device, resolve_dtype_name
    from pipeline.gpu_memory import scorer_dtype_name

    device = resolve_device(spec.model.device)
    # the dtype the backend generated in: its own dtype setting, else the model's
    generating = resolve_dtype_name(getattr(spec.backend, "dtype", None) or spec.model.dtype,
                                    device)
    name = scorer_dtype_name(spec.scoring.scorer_dtype, device, generating,
                             cuda_auto_dtype=resolve_dtype_name("auto", device))
    dtype = getattr(torch, name)
    model = None if spec.scoring.scorer_path else backend.scorer_model(dtype)
    log.info("perplexity scorer: %s on %s (%s)", name, device,
             "the generating model" if model is not None else "a fresh load")
    if model is not None:
        return model, device, True
    path = spec.scoring.scorer_path or model_dir
    m = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=spec.model.trust_remote_code
    ).to(device).eval()
    torch.manual_seed(spec.seed)
    return m, device, False

