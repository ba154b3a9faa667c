"""Length distributions for synthetic inputs and per-request output lengths.

One rule for both: ``fixed`` is the mean itself; ``uniform`` draws integers in
``[lo, hi]``; ``normal`` and ``lognormal`` have the given mean and standard deviation (in
tokens) and are rounded and clipped to ``[lo, hi]``, so ``hi`` is always the largest length
a job can ask for (what the context-length check uses).
"""

from __future__ import annotations

import math

LENGTH_DISTS = ("fixed", "uniform", "normal", "lognormal")


def length_bounds(dist: str, mean: int, lo: int | None, hi: int | None) -> tuple[int, int]:
    """The smallest and largest length ``dist`` can produce."""
    if dist == "fixed":
        return mean, mean
    assert lo is not None and hi is not None, "validate_workload requires both bounds"
    return lo, hi


def sample_lengths(
    dist: str, mean: int, std: float | None, lo: int | None, hi: int | None, n: int, seed: list[int]
) -> list[int]:
    """``n`` lengths drawn from ``dist``; the same ``seed`` gives the same lengths."""
    import numpy as np

    if dist == "fixed":
        return [int(mean)] * n
    lo_, hi_ = length_bounds(dist, mean, lo, hi)
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        xs = rng.integers(lo_, hi_ + 1, size=n)
    elif dist == "normal":
        xs = np.rint(rng.normal(mean, std, size=n))
    elif dist == "lognormal":
        # mu/sigma of the underlying normal so that the lognormal's own mean and std match
        assert std is not None
        s2 = math.log1p((std / mean) ** 2)
        xs = np.rint(rng.lognormal(math.log(mean) - s2 / 2, math.sqrt(s2), size=n))
    else:
        raise ValueError(f"unknown length distribution {dist!r}")
    return [int(x) for x in np.clip(xs, lo_, hi_)]
