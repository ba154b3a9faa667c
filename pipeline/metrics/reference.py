"""Metrics against each request's reference, computed through ``evaluate`` modules.

Every shipped metric is an ``evaluate`` module in ``pipeline/metrics/evaluate_modules/``
(exact_match, f1, bleu, chrf, rougeL, pass_at_1), loaded offline with
``evaluate.load(<folder>)``; any other name in ``scoring.reference_metrics`` is handed to
``evaluate.load`` as it is (a module folder or file, or a hub id on an online machine).

A metric named ``NAME`` is logged as ``ref_NAME`` (its folder name for a path, with
characters outside ``[A-Za-z0-9_]`` made ``_``): the module's own corpus score (the value
under its name, else its only number). Where a module returns per-prediction ``scores``
(the shipped ones do), each record keeps them in ``extra["ref_scores"]`` so that
``pipeline.analysis.recommend`` can bootstrap confidence intervals over requests.

``evaluate`` is imported only when a metric is loaded (its import takes seconds).
"""

from __future__ import annotations

import inspect
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

MODULES_DIR = Path(__file__).resolve().parent / "evaluate_modules"
#: the metrics shipped with the project (folder names under ``evaluate_modules/``)
SHIPPED = ("exact_match", "f1", "bleu", "chrf", "rougeL", "pass_at_1")
#: metrics that judge the whole generation, never its first line only
WHOLE_TEXT = ("pass_at_1",)
#: the key per-request scores are kept under in ``RequestRecord.extra``
EXTRA_KEY = "ref_scores"


def metric_key(name: str) -> str:
    """The logged metric key of ``name``: ``ref_<module name>``."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    base = base.removesuffix(".py")
    return "ref_" + re.sub(r"[^A-Za-z0-9_]", "_", base)


def module_path(name: str) -> str:
    """What ``evaluate.load`` gets for ``name``: a shipped module's folder, else ``name``."""
    if name in SHIPPED:
        return str(MODULES_DIR / name)
    return name


def resolve_metrics(scoring: Any, workload_name: str) -> list[str]:
    """The reference metrics of a job: ``scoring.reference_metrics`` when set (``[]`` is
    off), else the task default ``scoring.task_reference_metrics[workload_name]``."""
    names = scoring.reference_metrics
    if names is None:
        names = (scoring.task_reference_metrics or {}).get(workload_name, [])
    names = [str(n) for n in names]
    for n in names:
        if not n.strip():
            raise ConfigError("scoring.reference_metrics is invalid: an empty metric name")
    keys = [metric_key(n) for n in names]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"scoring.reference_metrics={names} is invalid: two metrics log "
                          f"as {', '.join(dup)}")
    return names


def check_names(names: list[str]) -> None:
    """Refuse, before anything loads, a metric that is neither shipped, nor an existing
    module path, nor shaped like a hub id (``owner/name``)."""
    for n in names:
        if n in SHIPPED or Path(n).expanduser().exists():
            continue
        if re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", n) and not n.startswith("."):
            continue
        raise ConfigError(f"scoring.reference_metrics entry {n!r} is invalid: not a shipped "
                          f"metric ({', '.join(SHIPPED)}), an existing evaluate module path, "
                          f"or a hub id owner/name")


@lru_cache(maxsize=32)
def load_metric(name: str) -> Any:
    """The ``evaluate`` module for ``name`` (loaded once per process, kept in memory)."""
    import evaluate

    evaluate.logging.set_verbosity_error()
    path = module_path(name)
    try:
        return evaluate.load(path, keep_in_memory=True)
    except Exception as e:
        where = "shipped module" if name in SHIPPED else "evaluate module path or hub id"
        raise ConfigError(f"scoring.reference_metrics entry {name!r} is invalid: could not "
                          f"load it as an {where} ({type(e).__name__}: {e})") from e


def _corpus_value(name: str, result: dict[str, Any]) -> float:
    """The module's corpus score: the value under its own name, else its only number."""
    base = metric_key(name).removeprefix("ref_")
    for k in (name, base):
        if isinstance(result.get(k), int | float):
            return float(result[k])
    numbers = [v for k, v in result.items() if isinstance(v, int | float) and k != "scores"]
    if len(numbers) == 1:
        return float(numbers[0])
    raise ValueError(f"reference metric {name!r} returned no single score: {sorted(result)}")


def first_line(text: str) -> str:
    """The first non-empty line of ``text`` (stripped), or ``""``."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def compute(names: list[str], predictions: list[str], references: list[str],
            options: dict[str, Any] | None = None, first_line_only: bool = True
            ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Corpus scores ``{ref_NAME: value}`` and per-prediction scores (where the module
    gives them) of each metric. ``options`` go to every module whose ``_compute`` takes
    them (the sandbox limits of pass_at_1)."""
    corpus: dict[str, float] = {}
    per_item: dict[str, list[float]] = {}
    if not predictions:
        return corpus, per_item
    options = options or {}
    for name in names:
        module = load_metric(name)
        preds = predictions
        if first_line_only and name not in WHOLE_TEXT:
            preds = [first_line(p) for p in predictions]
        params = inspect.signature(module._compute).parameters
        kwargs = {k: v for k, v in options.items() if k in params}
        result = module.compute(predictions=preds, references=references, **kwargs)
        key = metric_key(name)
        corpus[key] = _corpus_value(name, result)
        scores = result.get("scores")
        if isinstance(scores, list) and len(scores) == len(predictions):
            per_item[key] = [float(s) for s in scores]
    return corpus, per_item


def score_records(names: list[str], records: list, requests: list, scoring: Any
                  ) -> dict[str, float]:
    """Score the successful records whose request has a reference; store per-request
    scores in ``record.extra["ref_scores"]``; return the job metrics (``ref_*`` plus
    ``ref_scored_requests``). Requests without a reference are left out."""
    by_index = {q.index: q for q in requests}
    pairs = [(r, by_index[r.index].reference) for r in records
             if r.ok and r.index in by_index and by_index[r.index].reference is not None]
    if not names or not pairs:
        return {}
    options = {"timeout_s": float(scoring.code_timeout_s),
               "memory_mb": int(scoring.code_memory_mb)}
    corpus, per_item = compute(names, [r.text for r, _ in pairs], [ref for _, ref in pairs],
                               options, first_line_only=scoring.reference_first_line)
    for i, (rec, _) in enumerate(pairs):
        rec.extra[EXTRA_KEY] = {k: v[i] for k, v in per_item.items()}
    return {**corpus, "ref_scored_requests": float(len(pairs))}
