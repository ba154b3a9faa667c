"""The gate: is an optimized job still the same model as its baseline? Pure functions.

An optimization (speculative decoding, weight quantization, the compiled fast path, another
attention kernel, a lower dtype) is compared with a baseline job that has the same model,
prompts and decoding without it. The evidence, strongest first:

- greedy token exact match and first divergence (``pipeline.analysis.parity``);
- mean KL(baseline || optimized) of the next-token distributions, teacher-forced on the
  baseline's own prompt + output tokens (both settings score the same token sequence, so a
  single early flip does not make every later position look different);
- the perplexity of the baseline's tokens under both (relative delta);
- task metrics against references (``ref_*``), when the jobs have them.

Verdicts (thresholds in :data:`THRESHOLDS`, the only place they are stated):

- ``equivalent``: every prompt token-identical, or KL below ``equivalent_max_kl`` (the
  optimization computes the same distributions up to float32 rounding);
- ``numerics``: KL below ``numerics_max_kl`` and |perplexity delta| below
  ``numerics_max_ppl_delta``: rounding-level differences that flip near-tied argmaxes;
- ``degraded``: anything else, or a task metric that fell by more than
  ``max_task_metric_drop`` on its 0..1 scale (BLEU and chrF, 0..100, are divided by 100);
- ``unverified``: tokens differ and neither KL nor a perplexity delta could be measured.

Where the KL is not informative (the optimization leaves the model's computation unchanged:
speculative decoding scores with the same model settings, so teacher-forced KL is 0 by
construction), the verdict rests on exact match, then on the jobs' own perplexity delta.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: verdict thresholds (nats per token for KL; relative for perplexity; absolute for task
#: metrics on their 0..1 scale, see :data:`TASK_METRIC_SCALE`)
THRESHOLDS: dict[str, float] = {
    "equivalent_max_kl": 1e-6,
    "numerics_max_kl": 1e-2,
    "numerics_max_ppl_delta": 0.02,
    "max_task_metric_drop": 0.02,
}

VERDICTS = ("equivalent", "numerics", "degraded", "unverified")

#: ``ref_*`` metrics that are not on a 0..1 scale: the full scale a drop is divided by
#: before it is held against ``max_task_metric_drop`` (sacrebleu BLEU and chrF are 0..100)
TASK_METRIC_SCALE: dict[str, float] = {"ref_bleu": 100.0, "ref_chrf": 100.0}
#: ``ref_*`` keys that are counts, not task metrics (how many requests were scored)
NOT_TASK_METRICS = ("ref_scored_requests",)


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean; None for no values."""
    return sum(values) / len(values) if values else None


def perplexity(nlls: Sequence[float]) -> float | None:
    """exp(mean negative log-likelihood per token); None for no tokens."""
    m = mean(nlls)
    return math.exp(m) if m is not None else None


def relative_delta(base: float | None, new: float | None) -> float | None:
    """(new - base) / base; None when either is missing or base is 0."""
    if base is None or new is None or base == 0:
        return None
    return (new - base) / base


def task_metric_deltas(base: Mapping[str, float], opt: Mapping[str, float],
                       prefix: str = "ref_") -> dict[str, float]:
    """Optimized minus baseline for every ``ref_*`` metric both jobs have (absolute, in the
    metric's own units; counts such as ``ref_scored_requests`` are not task metrics)."""
    return {k: float(opt[k]) - float(base[k]) for k in sorted(base)
            if k.startswith(prefix) and k in opt and k not in NOT_TASK_METRICS
            and isinstance(base[k], int | float) and isinstance(opt[k], int | float)}


def verdict(exact_match_rate: float | None, mean_kl: float | None,
            ppl_delta: float | None, task_deltas: Mapping[str, float] | None = None,
            kl_informative: bool = True,
            thresholds: Mapping[str, float] = THRESHOLDS) -> tuple[str, str]:
    """The verdict and a one-line reason (module docstring: the rules)."""
    t = thresholds
    # a drop is judged on the metric's 0..1 scale (BLEU/chrF: 0..100, divided by 100)
    drops = {k: v for k, v in (task_deltas or {}).items()
             if v / TASK_METRIC_SCALE.get(k, 1.0) < -t["max_task_metric_drop"]}
    if drops:
        worst = min(drops, key=lambda k: drops[k] / TASK_METRIC_SCALE.get(k, 1.0))
        return "degraded", f"{worst} fell by {-drops[worst]:.3f}"
    if exact_match_rate == 1.0:
        return "equivalent", "every prompt token-identical"
    kl = mean_kl if kl_informative else None
    if kl is not None and kl < t["equivalent_max_kl"]:
        return "equivalent", f"mean KL {kl:.2e} < {t['equivalent_max_kl']:g}"
    ppl_ok = ppl_delta is not None and abs(ppl_delta) < t["numerics_max_ppl_delta"]
    if kl is not None:
        if kl < t["numerics_max_kl"] and ppl_ok:
            return "numerics", (f"mean KL {kl:.2e} < {t['numerics_max_kl']:g}, perplexity "
                                f"delta {ppl_delta:+.2%}")
        return "degraded", (f"mean KL {kl:.2e}" + (f", perplexity delta {ppl_delta:+.2%}"
                                                    if ppl_delta is not None else ""))
    if ppl_delta is None:
        return "unverified", "tokens differ; no KL or perplexity to judge by"
    if ppl_ok:
        return "numerics", f"tokens differ; perplexity delta {ppl_delta:+.2%} (no KL)"
    return "degraded", f"tokens differ; perplexity delta {ppl_delta:+.2%} (no KL)"


def summarize(parity: Mapping[str, Any], per_position_kl: Sequence[float] | None,
              base_nlls: Sequence[float] | None, opt_nlls: Sequence[float] | None,
              base_metrics: Mapping[str, float], opt_metrics: Mapping[str, float],
              kl_informative: bool = True) -> dict[str, Any]:
    """Every gate figure for one (baseline, optimized) pair, and the verdict.

    ``parity``: :func:`pipeline.analysis.parity.token_parity` of the two jobs. ``per_position_kl``
    and the NLLs: teacher-forced on the baseline's tokens (None when not measured). When
    no teacher-forced NLLs exist, the perplexity delta comes from the jobs' own
    ``perplexity`` metrics (each job's outputs under the scorer).
    """
    divs = [p["first_divergence"] for p in parity.get("prompts", [])
            if not p.get("exact_match") and p.get("first_divergence") is not None]
    kl = mean(list(per_position_kl)) if per_position_kl else None
    ppl_base = perplexity(base_nlls) if base_nlls else None
    ppl_opt = perplexity(opt_nlls) if opt_nlls else None
    ppl_source = "teacher_forced"
    if ppl_base is None or ppl_opt is None or not kl_informative:
        ppl_base, ppl_opt = base_metrics.get("perplexity"), opt_metrics.get("perplexity")
        ppl_source = "job_perplexity"
    ppl_delta = relative_delta(ppl_base, ppl_opt)
    tasks = task_metric_deltas(base_metrics, opt_metrics)
    v, why = verdict(parity.get("exact_match_rate"), kl, ppl_delta, tasks, kl_informative)
    return {
        "exact_match_rate": parity.get("exact_match_rate"),
        "exact_matches": parity.get("exact_matches"),
        "num_prompts": parity.get("num_prompts"),
        "first_divergence_min": min(divs) if divs else None,
        "mean_kl": kl,
        "max_kl": max(per_position_kl) if per_position_kl else None,
        "kl_positions": len(per_position_kl) if per_position_kl else 0,
        "kl_informative": kl_informative,
        "ppl_baseline": ppl_base,
        "ppl_optimized": ppl_opt,
        "ppl_delta": ppl_delta,
        "ppl_source": ppl_source,
        "task_metric_deltas": tasks,
        "verdict": v,
        "reason": why,
        "thresholds": dict(THRESHOLDS),
    }
