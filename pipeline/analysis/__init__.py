"""Sweep analysis: what a finished sweep's jobs say when compared with each other.

:mod:`.parity` (token parity of jobs that differ only in backend), :mod:`.gate` (each
optimized job against its baseline, "fast but wrong?") with its thresholds, KL and verdicts
in :mod:`.gate_rules` (pure functions), :mod:`.recommend` + :mod:`.recommend_groups` (what
to run per task: the best of whatever the sweep varied under SLO bounds, ``python -m
pipeline.analysis.recommend``), and :mod:`.search` (a search's trials, objectives and best).
:func:`.sweep_end.analyse_sweep` is the one hook the sweep's Hydra callback calls at the end
of a sweep.

This file imports nothing, so importing the pure :mod:`.gate_rules` loads nothing else.
"""
