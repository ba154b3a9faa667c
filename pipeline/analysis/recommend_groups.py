"""What a recommendation compares and the bounds a candidate must meet.

Grouping: a candidate is the set of jobs that ran the same values of the grouping keys, so
jobs that differ only in bookkeeping (``seed``, repeats, paths, tracking) are pooled. A key
is a dotted config key (``backend.max_num_seqs``) or a config group that has a ``name``
(``backend``, ``decoding``, ``model``): the group's name plus the job's own overrides under
it, so ``decoding`` labels a job ``topp decoding.top_p=0.8`` as the decoding presets always
were. By default the keys are those whose value differs between jobs of the same task
(workload), a group standing for all its keys when its ``name`` differs; when nothing
differs the key is ``decoding``.

Speed: a sweep without task metrics is ranked by output tokens/s, pooled over seeds.

Bounds: SLOs on TTFT, TPOT and E2EL at the mean or a logged percentile, and a least
``max_rate_under_slo`` for load-profile jobs; each broken bound is named in the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

#: top-level config keys that never tell candidates apart: where results go, how they are
#: scored or tracked, and the seed (jobs differing only in these are pooled)
BOOKKEEPING_TOP = frozenset({"seed", "paths", "tracking", "print_table", "dry_run", "resume",
                             "scoring", "search", "measure", "cost"})
#: dotted keys that never tell candidates apart (``workload.name`` is the task itself)
BOOKKEEPING_KEYS = frozenset({"workload.name", "workload.repeats", "backend.seed",
                              "backend.log_dir", "backend.cache_root", "model.base_path"})
#: percentiles a job logs for ``ttft_ms``/``tpot_ms``/``e2el_ms`` (pipeline/metrics/performance.py)
PERCENTILES = (50, 90, 99)
_MISSING = "<unset>"
#: the ranking metric of a sweep without task metrics
SPEED = "output_tokens_per_s"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted key -> the value as JSON text (comparable and printable), nested dicts
    flattened; e.g. ``{"backend": {"name": "hf"}}`` -> ``{"backend.name": '"hf"'}``."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out


def _bookkeeping(key: str) -> bool:
    return key.split(".", 1)[0] in BOOKKEEPING_TOP or key in BOOKKEEPING_KEYS


def _named(config: dict[str, Any], choices: dict[str, Any] | None, group: str) -> str:
    """The name a group's candidates go by: the Hydra choice (``hf_kv``: several backend
    files share ``name: hf``), else the config's ``name``. Decoding presets keep their
    ``name``, as their labels always did."""
    choice = (choices or {}).get(group)
    if choice and group != "decoding":
        return str(choice)
    return str((config.get(group) or {}).get("name", "?"))


def _flat_named(config: dict[str, Any], choices: dict[str, Any] | None) -> dict[str, str]:
    flat = flatten(config)
    for g in choices or {}:
        if isinstance(config.get(g), dict) and "name" in config[g]:
            flat[f"{g}.name"] = json.dumps(_named(config, choices, g))
    return flat


def varying_keys(configs: Sequence[dict[str, Any]],
                 choices: Sequence[dict[str, Any] | None] | None = None) -> list[str]:
    """The default grouping keys of a sweep's job configs: every non-bookkeeping dotted key
    whose value differs between two jobs of the same task, a group (``backend``) replacing
    its keys when its ``name`` (or Hydra choice, ``choices[i]`` for job i) differs;
    ``["decoding"]`` when nothing differs."""
    flat = [_flat_named(c, ch) for c, ch in zip(configs, choices or [None] * len(configs),
                                                  strict=True)]
    by_task: dict[str, list[dict[str, str]]] = {}
    for f in flat:
        by_task.setdefault(f.get("workload.name", _MISSING), []).append(f)
    order: dict[str, None] = {}  # keys in config order, first job first
    for f in flat:
        order.update(dict.fromkeys(f))
    varying = {k for k in order if not _bookkeeping(k)
               and any(len({f.get(k, _MISSING) for f in fs}) > 1 for fs in by_task.values())}
    dims: dict[str, None] = {}
    for k in order:
        if k not in varying:
            continue
        group = k.split(".", 1)[0]
        if "." in k and f"{group}.name" in varying:
            dims[group] = None
            # a key that differs between jobs of one name (the GGUF type of llamacpp jobs)
            # tells them apart too
            name = f"{group}.name"
            if any(len({f.get(k, _MISSING) for f in fs if f.get(name) == n}) > 1
                   for fs in by_task.values() for n in {f.get(name) for f in fs}):
                dims[k] = None
        else:
            dims[k] = None
    if all(d.split(".", 1)[0] == "decoding" for d in dims):
        return ["decoding"]  # presets and their knobs: labelled as presets always were
    return list(dims)


def check_keys(keys: Sequence[str], configs: Sequence[dict[str, Any]]) -> None:
    """Refuse a ``--by`` key that no job's config has (ConfigError naming it and the
    keys that vary in this sweep)."""
    known = {k for c in configs for k in flatten(c)}
    groups = {k.split(".", 1)[0] for k in known if k.endswith(".name") and k.count(".") == 1}
    for k in keys:
        if k not in known and k not in groups:
            raise ConfigError(
                f"--by: {k!r} is not a config key of this sweep's jobs; allowed: a dotted "
                f"key (e.g. backend.max_num_seqs) or a group ({', '.join(sorted(groups))}); "
                f"what varies here: {', '.join(varying_keys(configs))}")


def group_label(config: dict[str, Any], overrides: Iterable[str], group: str,
                choices: dict[str, Any] | None = None) -> str:
    """A group's name (its Hydra choice where ``choices`` has one, decoding aside) plus the
    job's overrides under it (``topp decoding.top_p=0.8``)."""
    name = _named(config, choices, group)
    extra = sorted(o for o in overrides if o.lstrip("+").startswith(f"{group}."))
    return " ".join([name, *extra])


def candidate_label(config: dict[str, Any], overrides: Sequence[str],
                    keys: Sequence[str], choices: dict[str, Any] | None = None) -> str:
    """The candidate a job belongs to under grouping ``keys``. ``["decoding"]`` alone gives
    the bare preset label; otherwise ``key=value`` parts (``backend=vllm
    backend.max_num_seqs=4 decoding=greedy``)."""
    if list(keys) == ["decoding"]:
        return group_label(config, overrides, "decoding")
    flat = flatten(config)
    parts = []
    for k in keys:
        group = k.split(".", 1)[0]
        if "." in k and group in keys:
            continue  # written with its group below
        if k in flat or not isinstance(config.get(k), dict):
            v = flat.get(k, _MISSING)
            parts.append(f"{k}={json.loads(v) if v != _MISSING else v}")
            continue
        # the group's name, its keys that vary within one name (where the job has them),
        # and the job's other overrides under it
        sub = [f"{s}={json.loads(flat[s])}" for s in keys if s.startswith(f"{k}.") and s in flat]
        extra = sorted(o for o in overrides if o.lstrip("+").startswith(f"{k}.")
                       and o.lstrip("+").split("=", 1)[0] not in keys)
        parts.append(" ".join([f"{k}={_named(config, choices, k)}", *sub, *extra]))
    return " ".join(parts)


def parse_keys(text: str | None) -> list[str] | None:
    """``--by`` text (``backend.name,backend.max_num_seqs``) as a list; None when unset."""
    if not text:
        return None
    keys = [k.strip() for k in text.split(",") if k.strip()]
    return keys or None


@dataclass(frozen=True)
class SloBounds:
    """The bounds a candidate must meet (each on the candidate's mean over its jobs)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    percentile: int | None = None
    """Latency statistic: ``p50``/``p90``/``p99``; None = the mean."""
    min_rate: float | None = None
    """Least ``max_rate_under_slo`` (req/s; load-profile jobs)."""

    def __post_init__(self) -> None:
        if self.percentile is not None and self.percentile not in PERCENTILES:
            raise ConfigError(f"--slo-percentile: {self.percentile} is not logged; allowed: "
                              f"{', '.join(map(str, PERCENTILES))} (or none: the mean)")
        for name, option in (("ttft_ms", "--slo-ttft-ms"), ("tpot_ms", "--slo-tpot-ms"),
                             ("e2el_ms", "--slo-e2el-ms"), ("min_rate", "--min-rate")):
            v = getattr(self, name)
            if v is not None and not v > 0:  # NaN too
                raise ConfigError(f"{option}: {v} is not allowed; it must be > 0")

    def _checks(self) -> list[tuple[str, str, float, bool]]:
        """(metric key, text, bound, bound is a maximum) for each bound that is set."""
        stat = f"p{self.percentile}" if self.percentile else "mean"
        out = [(f"{m.lower()}_ms_{stat}", f"{stat} {m}", v, True)
               for m, v in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms),
                            ("E2EL", self.e2el_ms)) if v is not None]
        if self.min_rate is not None:
            out.append(("max_rate_under_slo", "max_rate_under_slo", self.min_rate, False))
        return out

    @property
    def any(self) -> bool:
        """Whether any bound is set."""
        return bool(self._checks())

    def describe(self) -> str:
        """One sentence for the report header (``SLO: mean TPOT <= 100 ms.``); '' if none."""
        parts = [f"{text} {'<=' if mx else '>='} {v:g} {'ms' if mx else 'req/s'}"
                 for _, text, v, mx in self._checks()]
        return f"SLO: {', '.join(parts)}." if parts else ""

    def broken(self, metrics: dict[str, float]) -> list[str]:
        """Each bound ``metrics`` breaks, as text (``tpot_ms_mean 200.0 > 100 ms``); a
        missing metric breaks its bound (``ttft_ms_p90 not logged``)."""
        out = []
        for key, _, v, mx in self._checks():
            got = metrics.get(key)
            if got is None or got != got:  # NaN: no value
                out.append(f"{key} not logged")
            elif mx and got > v:
                out.append(f"{key} {got:.1f} > {v:g} ms")
            elif not mx and got < v:
                out.append(f"{key} {got:.2f} < {v:g} req/s")
        return out


def pooled_speed(metrics: Sequence[dict[str, float]]) -> tuple[float,
                                                              tuple[float, float] | None]:
    """Output tok/s of pooled jobs (their ``metrics``; each job's repeat mean where it has
    one) and its 95% CI: from each job's ``output_tokens_per_s_ci95`` (half-widths combined
    as for a mean of independent estimates), else a Student-t interval over the jobs, else
    None (a single measurement)."""
    from pipeline.metrics.performance import mean_ci95

    vals = [m.get(f"{SPEED}_repeat_mean", m[SPEED]) for m in metrics]
    halves = [m.get(f"{SPEED}_ci95") for m in metrics]
    mean = sum(vals) / len(vals)
    if all(h is not None and h == h for h in halves):
        half = math.sqrt(sum(h * h for h in halves if h is not None)) / len(halves)
    elif len(vals) > 1:
        half = mean_ci95(vals)[1]
    else:
        return mean, None
    return mean, (mean - half, mean + half)
