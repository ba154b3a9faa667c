"""Speculative decoding on the offline vLLM engine: the checks of its keys
(:func:`validate_speculative`), vLLM's ``speculative_config`` for them
(:func:`speculative_config`) and each job's acceptance figures from the engine's counters
(:func:`spec_counters`, :func:`spec_metrics`). Nothing here imports vLLM or torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import check_choice, check_range, fail

if TYPE_CHECKING:
    from pipeline.backends.vllm.config import VLLMBackendConfig

log = logging.getLogger(__name__)

#: the methods this pipeline hands to vLLM; the others (eagle, medusa, mlp_speculator, mtp,
#: suffix...) need trained proposer heads or extra packages and were not measured here
SPECULATIVE_METHODS = ("ngram", "draft_model")


def validate_speculative(s: VLLMBackendConfig) -> None:
    """Checks of the speculative keys, before anything loads."""
    m = s.speculative_method
    if m is not None:
        check_choice("backend.speculative_method", m, SPECULATIVE_METHODS)
    check_range("backend.num_speculative_tokens", s.num_speculative_tokens, 0)
    check_range("backend.prompt_lookup_max", s.prompt_lookup_max, 1, optional=True)
    check_range("backend.prompt_lookup_min", s.prompt_lookup_min, 1, optional=True)
    lookup = s.prompt_lookup_max is not None or s.prompt_lookup_min is not None
    if lookup and m != "ngram":
        fail("backend.prompt_lookup_max/min", (s.prompt_lookup_min, s.prompt_lookup_max),
             f"only apply to backend.speculative_method=ngram (got {m!r})")
    if (s.prompt_lookup_max is not None and s.prompt_lookup_min is not None
            and s.prompt_lookup_min > s.prompt_lookup_max):
        fail("backend.prompt_lookup_min", s.prompt_lookup_min,
             f"must be <= backend.prompt_lookup_max={s.prompt_lookup_max}")
    if m == "draft_model":
        if not s.speculative_model:
            fail("backend.speculative_model", s.speculative_model,
                 "speculative_method=draft_model needs a local draft model folder")
        if not Path(str(s.speculative_model)).expanduser().is_dir():
            fail("backend.speculative_model", s.speculative_model,
                 "a local model folder is required (hub ids are not downloaded here)")
    elif s.speculative_model:
        fail("backend.speculative_model", s.speculative_model,
             f"only applies to backend.speculative_method=draft_model (got {m!r})")


def speculative_config(s: VLLMBackendConfig) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` for the settings, or None when speculation is off
    (no method, or ``num_speculative_tokens=0``)."""
    if s.speculative_method is None or s.num_speculative_tokens == 0:
        return None
    out: dict[str, Any] = {"method": s.speculative_method,
                           "num_speculative_tokens": s.num_speculative_tokens}
    if s.speculative_method == "ngram":
        if s.prompt_lookup_max is not None:
            out["prompt_lookup_max"] = s.prompt_lookup_max
        if s.prompt_lookup_min is not None:
            out["prompt_lookup_min"] = s.prompt_lookup_min
    else:
        out["model"] = str(Path(str(s.speculative_model)).expanduser().resolve())
    return out


_SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                  "vllm:spec_decode_num_accepted_tokens")


def spec_counters(llm: Any) -> dict[str, float]:
    """vLLM's speculative-decoding counters (summed over engines), from ``LLM.get_metrics``
    (Prometheus, kept because the engine runs with stats on); empty when not exposed."""
    try:
        metrics = llm.get_metrics()
    except Exception as e:  # older vLLM, or stats off
        log.warning("vLLM speculative-decoding counters unavailable: %s", e)
        return {}
    out = {name: 0.0 for name in _SPEC_COUNTERS}
    found = False
    for m in metrics:
        if m.name in out and hasattr(m, "value"):
            out[m.name] += float(m.value)
            found = True
    return out if found else {}


def spec_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """This job's acceptance figures from two counter snapshots: drafts are verification
    steps with candidates, draft tokens the candidates proposed, accepted those kept."""
    if not after:
        return {}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _SPEC_COUNTERS}
    drafts, proposed, accepted = (d[k] for k in _SPEC_COUNTERS)
    out = {"spec_drafts": drafts, "spec_proposed_tokens": proposed,
           "spec_accepted_tokens": accepted}
    if proposed:
        out["spec_acceptance_rate"] = accepted / proposed
    if drafts:
        out["spec_mean_accepted_tokens"] = accepted / drafts
        out["spec_tokens_per_target_step"] = 1.0 + accepted / drafts
    return out
