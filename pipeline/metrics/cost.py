"""Cost per token: the price of an hour of the machine spread over the tokens it produced.

Pure functions. The price is the user's ``cost.usd_per_hour`` (what they pay), else the
``+target`` card's published on-demand list price (``usd_per_hour_list``), else none: no
cost figure is made up. ``usd_per_million_output_tokens`` = usd_per_hour / (3600 x output
tokens/s) x 1e6, so $1.20/h at 100 tok/s is $3.333 per million output tokens. The figure
assumes the machine is busy with this workload for the whole hour it is paid for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: the cost metrics a job may log
COST_KEY = "usd_per_million_output_tokens"
COST_AT_SLO_KEY = "usd_per_million_output_tokens_at_slo"
#: the params that record the price used and where it came from
PRICE_PARAM = "cost.usd_per_hour_used"
SOURCE_PARAM = "cost.price_source_used"


@dataclass(frozen=True)
class Price:
    """The hourly price a job's cost figures use, and where it came from."""

    usd_per_hour: float
    source: str


def usd_per_million_tokens(usd_per_hour: float, tokens_per_s: float | None) -> float | None:
    """``usd_per_hour / (3600 x tokens_per_s) x 1e6``; None when the rate is missing,
    not finite or not positive (no tokens: no cost per token)."""
    if tokens_per_s is None or not math.isfinite(tokens_per_s) or tokens_per_s <= 0:
        return None
    return usd_per_hour / (3600.0 * tokens_per_s) * 1e6


def resolve_price(cost: Any, target: Any = None) -> Price | None:
    """The price to use: ``cost.usd_per_hour`` when set (the user's own price always wins),
    else the target's ``usd_per_hour_list`` (a published list price), else None.

    ``cost`` has ``usd_per_hour`` and ``price_source`` (a ``CostConfig``); ``target`` has
    ``name`` and ``usd_per_hour_list`` (a ``TargetConfig``) or is None."""
    if cost is not None and cost.usd_per_hour is not None:
        return Price(float(cost.usd_per_hour), cost.price_source or "cost.usd_per_hour")
    listed = getattr(target, "usd_per_hour_list", None) if target is not None else None
    if listed is not None:
        return Price(float(listed), f"list price of +target={target.name} "
                                    f"(conf/target/{target.name}.yaml)")
    return None


def cost_metrics(price: Price | None, metrics: Mapping[str, float],
                 slo_tokens_per_s: float | None = None) -> dict[str, float]:
    """The job's cost figures: ``usd_per_million_output_tokens`` from its
    ``output_tokens_per_s`` and, for a load profile, ``..._at_slo`` from the output rate of
    the point behind ``max_rate_under_slo`` (``slo_tokens_per_s``). Empty without a price."""
    if price is None:
        return {}
    out: dict[str, float] = {}
    v = usd_per_million_tokens(price.usd_per_hour, metrics.get("output_tokens_per_s"))
    if v is not None:
        out[COST_KEY] = v
    at_slo = usd_per_million_tokens(price.usd_per_hour, slo_tokens_per_s)
    if at_slo is not None:
        out[COST_AT_SLO_KEY] = at_slo
    return out


def price_params(price: Price | None) -> dict[str, str]:
    """The price used and its source, as the run's params (empty without a price)."""
    if price is None:
        return {}
    return {PRICE_PARAM: f"{price.usd_per_hour:g}", SOURCE_PARAM: price.source}
