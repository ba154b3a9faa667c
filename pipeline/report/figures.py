"""What every report figure shares: one colour per job, and one way to save a figure.

A module of its own so that every plotting module (:mod:`.plots`, :mod:`.serving`,
:mod:`.decision`, :mod:`.conversation`, :mod:`.interactive`) can use it without importing
another (``plots`` imports ``serving``).
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: a fixed palette, so that a job keeps its colour across every figure of a report
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f")


def colour(i: int) -> str:
    """The colour of the ``i``-th job (cycling)."""
    return PALETTE[i % len(PALETTE)]


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes; no Software/date metadata, so the same data gives the same
    bytes."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()
