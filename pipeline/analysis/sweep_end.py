"""The one sweep-end hook: every analysis a finished sweep gets, in order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.analysis.gate import report_sweep_gate
from pipeline.analysis.parity import report_sweep_parity


def analyse_sweep(config: Any, sweep_dir: Path) -> dict[str, dict[str, Any] | None]:
    """Sweep-end analysis: token parity of the jobs that differ only in backend, then the
    gate (optimized jobs against their baselines). Each prints its lines, writes its
    ``<sweep>/parity.json`` / ``gate.json`` and logs to MLflow when tracking is on; neither
    raises. Returns both results (None where the sweep has no such pairs)."""
    parity = report_sweep_parity(config, sweep_dir)  # jobs differing only in backend, if any
    gate = report_sweep_gate(config, sweep_dir)  # optimized jobs vs their baselines
    return {"parity": parity, "gate": gate}
