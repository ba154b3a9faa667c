"""Arrival times of requests for online backends (servers)."""

from __future__ import annotations


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
