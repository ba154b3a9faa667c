"""The terminal table of a job or a sweep: the headline metrics of the catalog."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.metrics.catalog import HEADLINE, SPECS, format_metric, format_number

#: columns shown only when some row has the metric: (key, header, format); a job is priced
#: only with ``cost.usd_per_hour`` and measures energy only where a counter is readable
OPTIONAL = (("usd_per_million_output_tokens", "$/Mtok out", ".3f"),
            ("usd_per_million_output_tokens_at_slo", "$/Mtok at SLO", ".3f"),
            ("joules_per_output_token", "J/out tok", ".3g"))


def format_table(rows: list[Mapping[str, Any]], first_cols: list[str]) -> str:
    """A plain-text table: ``first_cols`` of each row, then its headline ``metrics``, then
    the :data:`OPTIONAL` columns some row has."""
    extra = [(k, h, f) for k, h, f in OPTIONAL
             if any(r.get("metrics", {}).get(k) is not None for r in rows)]
    headers = [*first_cols, *(SPECS[k].header for k in HEADLINE), *(h for _, h, _ in extra)]
    body = []
    for r in rows:
        m = r.get("metrics", {})
        body.append([*(str(r.get(c, "")) for c in first_cols),
                     *(format_metric(k, m.get(k)) for k in HEADLINE),
                     *(format_number(m.get(k), f) for k, _, f in extra)])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(out)
