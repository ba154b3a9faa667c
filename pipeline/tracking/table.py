"""The terminal table of a job or a sweep: the headline metrics of the catalog."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.metrics.catalog import HEADLINE, SPECS, format_metric


def format_table(rows: list[Mapping[str, Any]], first_cols: list[str]) -> str:
    """A plain-text table: ``first_cols`` of each row, then its headline ``metrics``."""
    headers = [*first_cols, *(SPECS[k].header for k in HEADLINE)]
    body = []
    for r in rows:
        m = r.get("metrics", {})
        body.append([*(str(r.get(c, "")) for c in first_cols),
                     *(format_metric(k, m.get(k)) for k in HEADLINE)])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(out)
