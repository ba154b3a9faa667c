"""Sweep report: from MLflow alone to ``report.md``, a self-contained ``report.html`` and PNGs.

    python -m pipeline.report           # the latest sweep (or plain run.py job) in outputs/mlflow
    python -m pipeline.report --sweep-dir outputs/multirun/2026-11-26_23-16-44
    python -m pipeline.report --run-id <parent run id> --baseline decoding=greedy

The flow is :func:`.collect.find_parent` -> :func:`.collect.collect` (runs, params, metrics,
tags, and each job's ``results.json`` downloaded from the artifact store) ->
:func:`.tables.build_tables` (a pure function of that data; each table built once, raw
numbers and how it is shown) -> :func:`.render.build_sections` -> markdown / HTML, with
:mod:`.plots` drawing the figures and :mod:`.build` writing and logging the result.
Metric names, units and formats come from :mod:`.catalog`, the one metric catalog;
:mod:`.lengths` adds the length-scaling and prefix-caching tables, beside the course's
expected figures from :mod:`.expectations`.

This file imports nothing: :mod:`pipeline.tracking` uses the catalog, and the report uses
tracking's store rules, so the package itself must stay a leaf.
"""
