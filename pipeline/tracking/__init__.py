"""MLflow tracking: where the store is and a client on it (:mod:`.store`), a job's run
(:mod:`.job_runs`), a sweep's parent run (:mod:`.parent_run`), links into the MLflow UI
(:mod:`.links`), the sweep's Hydra callback (:mod:`.sweep`), logging job folders after the
fact (:mod:`.sync`), terminal tables (:mod:`.table`).

This file imports nothing: every user imports the module that owns the name, so the
submodules can import one another (and :mod:`.sweep` can import :mod:`pipeline.analysis`,
which imports them) without an import cycle through the package.
"""
