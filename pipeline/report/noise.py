"""When a difference between two jobs is a reading and when it is noise: the one rule.

With repeats (``workload.repeats`` > 1) a metric that carries a ``<key>_ci95`` is compared by
its mean over repeats, and two jobs differ only where their 95% intervals do not overlap.
Without one, a speed or latency metric must differ by more than :data:`SPEED_REL_THRESHOLD`
of the larger figure, a quality or diversity metric by more than
:data:`QUALITY_ABS_THRESHOLD` in absolute terms. Every ranking the report prints (the
summary's leaders, the trade-off readings, "within noise" beside the course's expectations)
goes through :func:`extremes` or :func:`distinct`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.metrics.catalog import SPECS

SPEED_REL_THRESHOLD = 0.10  # speed, latency, memory: relative to the larger figure
QUALITY_ABS_THRESHOLD = 0.02  # perplexity, self-BLEU, distinct-n, rep-n, ref_*: absolute
# Units of metrics compared relatively (the rest: unitless quality / diversity figures).
RELATIVE_UNITS = ("tok/s", "ms", "MiB", "s", "x")


@dataclass(frozen=True)
class Figure:
    """A job's value of a metric and, with repeats, the half-width of its 95% CI."""

    value: float
    ci95: float | None = None


def relative(key: str) -> bool:
    """Whether ``key`` is compared relatively (speed / latency / memory) or absolutely."""
    spec = SPECS.get(key)
    return spec is not None and spec.unit in RELATIVE_UNITS


def figure(metrics: Mapping[str, float], key: str) -> Figure | None:
    """The figure a job is ranked by: the repeat mean ± CI where logged, else the metric."""
    ci = metrics.get(f"{key}_ci95")
    mean = metrics.get(f"{key}_repeat_mean")
    if ci is not None and mean is not None and ci == ci and mean == mean:
        return Figure(float(mean), float(ci))
    v = metrics.get(key)
    return None if v is None or v != v else Figure(float(v))


def distinct(key: str, a: Figure, b: Figure) -> bool:
    """True when ``a`` and ``b`` differ by more than the noise (see the module doc)."""
    if a.ci95 is not None and b.ci95 is not None:
        return abs(a.value - b.value) > a.ci95 + b.ci95
    if relative(key):
        scale = max(abs(a.value), abs(b.value))
        return scale > 0 and abs(a.value - b.value) > SPEED_REL_THRESHOLD * scale
    return abs(a.value - b.value) > QUALITY_ABS_THRESHOLD


def extremes(key: str, figures: Mapping[str, Figure | None], higher_is_better: bool
             ) -> tuple[set[str], set[str]]:
    """The best and worst ids on ``key``: those within noise of the top (bottom) figure and
    distinct from it at the other end. Both empty when the spread is within noise (nothing
    to rank); a job within noise of both ends is neither."""
    known = {k: f for k, f in figures.items() if f is not None}
    if len(known) < 2:
        return set(), set()
    top = max(known.values(), key=lambda f: f.value)
    bottom = min(known.values(), key=lambda f: f.value)
    if not distinct(key, top, bottom):
        return set(), set()
    near_top = {k for k, f in known.items() if not distinct(key, f, top)}
    near_bottom = {k for k, f in known.items() if not distinct(key, f, bottom)}
    both = near_top & near_bottom
    near_top, near_bottom = near_top - both, near_bottom - both
    return (near_top, near_bottom) if higher_is_better else (near_bottom, near_top)


def rule_text(with_repeats: bool) -> str:
    """The rule the report applied, in one sentence (it says which one in its text)."""
    fixed = (f"speed, latency and memory figures must differ by more than "
             f"{SPEED_REL_THRESHOLD:.0%} of the larger one, quality and diversity figures "
             f"(perplexity, self-BLEU, distinct-2, rep-2) by more than "
             f"{QUALITY_ABS_THRESHOLD:g}")
    if with_repeats:
        return ("Noise rule: a job is ranked best or worst only where the difference exceeds "
                "the noise — for metrics with repeats (`*_ci95`) the 95% intervals of the "
                f"repeat means must not overlap; for the others {fixed}.")
    return ("Noise rule: a job is ranked best or worst only where the difference exceeds "
            f"the noise — the jobs have no repeats, so a fixed threshold applies: {fixed}. "
            "Figures within it count as tied and get no ranking.")
