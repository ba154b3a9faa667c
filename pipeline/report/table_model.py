"""The report's table model: a :class:`Table` (raw numbers and the columns shown) and the
:class:`Sweep` facts every table of one report shares. The tables themselves are built in
:mod:`pipeline.report.tables`, :mod:`.claims` and :mod:`.lengths`, all on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.metrics.catalog import METRICS, SPECS, format_metric, format_number, missing
from pipeline.report.collect import JobRun, SweepData

Row = Mapping[str, Any]


# Params that say where files go or how runs are logged, never what was measured.
BOOKKEEPING_PARAMS = ("paths.", "tracking.", "print_table", "dry_run", "resume")


def cell(v: Any) -> str:
    """A plain cell: ``-`` when missing, else ``str``."""
    return "-" if missing(v) else str(v)


def flag(v: Any) -> bool:
    """A table flag (bool, numpy bool, or None/NaN for "not applicable") as a bool."""
    return not missing(v) and bool(v)


@dataclass(frozen=True)
class Column:
    """A shown column: its header and how a raw row becomes its cell."""

    header: str
    text: Callable[[Row], str]


def plain(key: str, header: str | None = None) -> Column:
    """The raw value as it is (``-`` when missing)."""
    return Column(header or key, lambda r: cell(r.get(key)))


def metric(key: str, header: str | None = None) -> Column:
    """A catalog metric, formatted as everywhere else."""
    return Column(header or SPECS[key].header, lambda r: format_metric(key, r.get(key)))


def number(key: str, header: str, fmt: str) -> Column:
    """A derived number (a ratio, a percentile) with its own format spec."""
    return Column(header, lambda r: format_number(r.get(key), fmt))


@dataclass
class Table:
    """Raw rows (``frame``) and the columns the report shows of them."""

    frame: pd.DataFrame
    columns: list[Column]

    def display(self) -> pd.DataFrame:
        """The table as the report prints it: strings under human headers."""
        rows = self.frame.to_dict("records")
        return pd.DataFrame([{c.header: c.text(r) for c in self.columns} for r in rows],
                            columns=[c.header for c in self.columns] if rows else None)


def display_tables(tables: Mapping[str, Table]) -> dict[str, pd.DataFrame]:
    """Every table as shown."""
    return {name: t.display() for name, t in tables.items()}


def swept_params(jobs: list[JobRun]) -> list[str]:
    """The params whose values differ across jobs (bookkeeping params left out).

    A param only some jobs have (``backend.max_num_seqs`` when hf meets vllm) comes with a
    preset, so it is left out unless an override names it."""
    named = {t.split("=", 1)[0].lstrip("+~") for j in jobs
             for t in j.tags.get("hydra_overrides", "").split() if "=" in t}
    keys = sorted({k for j in jobs for k in j.params})
    out = []
    for k in keys:
        if k.startswith(BOOKKEEPING_PARAMS):
            continue
        if not all(k in j.params for j in jobs) and k not in named:
            continue
        if len({j.params.get(k) for j in jobs}) > 1:
            out.append(k)
    # the preset's name first: it is what the user swept, the rest follows from it
    return sorted(out, key=lambda k: (not k.endswith(".name"), k))


def axis_headers(params: list[str]) -> dict[str, str]:
    """Short headers for swept params: the last part (``temperature``; the group for a
    preset's name: ``decoding.name`` -> ``decoding``) where no other swept param shares it,
    else the full dotted name."""
    last = [p.removesuffix(".name").rsplit(".", 1)[-1] for p in params]
    return {p: (s if last.count(s) == 1 else p) for p, s in zip(params, last, strict=True)}


def varying_overrides(jobs: list[JobRun]) -> dict[str, str]:
    """Per run id, the job's Hydra overrides less those every job shares (what was swept)."""
    toks = {j.run_id: j.tags.get("hydra_overrides", "").split() for j in jobs}
    common = set.intersection(*(set(t) for t in toks.values())) if len(jobs) > 1 else set()
    out = {}
    for j in jobs:
        mine = [t for t in toks[j.run_id] if t not in common]
        out[j.run_id] = " ".join(mine) or j.tags.get("decoding") or j.name
    return out


def short_label(job: JobRun, overrides: str) -> str:
    """A plot label: the job number and the swept values (``0 greedy``); a value that
    does not say what it sets (a number, true/false, null) keeps the last part of its key
    (``1 enable_prefix_caching=true``, ``2 batch_size=8``)."""
    vals = []
    for t in overrides.split():
        key, sep, val = t.partition("=")
        bare = val.lower() in ("true", "false", "null", "none") or _is_number(val)
        vals.append(f"{key.rsplit('.', 1)[-1].lstrip('+')}={val}" if sep and bare
                    else val if sep else t)
    return f"{job.job} {' '.join(vals)}".strip()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def select_job(jobs: list[JobRun], selector: str | None) -> JobRun:
    """The job a selector names: ``key=value`` terms (all must match a tag, a param, a
    param's ``.name``, or the job's overrides; ``job=N`` is the job number) or a run
    name / run id. No selector: the first FINISHED job."""
    if not jobs:
        raise ValueError("the sweep has no job runs")
    if not selector:
        return next((j for j in jobs if j.status == "FINISHED"), jobs[0])
    terms = selector.split()

    def matches(j: JobRun, term: str) -> bool:
        if "=" not in term:
            return term in (j.run_id, j.name, str(j.job))
        k, v = term.split("=", 1)
        if k == "job":
            return str(j.job) == v
        return (j.tags.get(k) == v or j.params.get(k) == v or j.params.get(f"{k}.name") == v
                or term in j.tags.get("hydra_overrides", "").split())

    hits = [j for j in jobs if all(matches(j, t) for t in terms)]
    if len(hits) != 1:
        names = ", ".join(f"{j.job}:{j.name}" for j in (hits or jobs))
        what = "no job matches" if not hits else f"{len(hits)} jobs match"
        raise ValueError(f"baseline {selector!r}: {what} ({names}); refine it, e.g. "
                         f"'decoding=greedy backend=hf' or a run name")
    return hits[0]


@dataclass
class Sweep:
    """What every table of one report shares: the jobs, the baseline, the swept axes, each
    job's varying overrides and the catalog metrics some job has."""

    data: SweepData
    base: JobRun
    axes: list[str]
    over: dict[str, str]
    present: list[str]

    @classmethod
    def of(cls, data: SweepData, baseline: str | None) -> Sweep:
        """Derive the shared facts once (raises ValueError for a bad baseline)."""
        jobs = data.jobs
        return cls(data, select_job(jobs, baseline), swept_params(jobs),
                   varying_overrides(jobs),
                   [m.key for m in METRICS if any(m.key in j.metrics for j in jobs)])

    @property
    def jobs(self) -> list[JobRun]:
        """The sweep's job runs, in job order."""
        return self.data.jobs
