"""The records a job produces: requests in, one record per request out, one result per job.

These are the typed form of ``results.json``: a :class:`JobResult` is what tracking, sync,
parity and the report read; ``to_dict``/``from_dict`` are the file format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Request:
    """One prompt to generate from; ``index`` is its position in the workload.

    ``prompt_token_ids`` is the prompt as the model sees it (chat template applied,
    tokenized once by the pipeline) so that every backend is fed identical tokens.

    The optional fields come from the workload: ``max_new_tokens`` is this request's own
    output length (None: the job's ``workload.max_new_tokens``; only backends with
    ``per_request_output_lengths`` get requests that set it), ``reference`` a reference
    answer read from the dataset, ``request_id`` how errors and records name it (``line 3``,
    a dataset id), ``prefix_group``/``group_position`` its shared-prefix group and its
    place in it, ``truncated_from`` its rendered length before
    ``workload.on_too_long=truncate`` cut it, ``messages`` the chat messages it renders
    (a conversation's turn: system, earlier turns with their answers, this user turn, as
    ``{"role", "content"}`` dicts), which the chat API sends instead of one user message.
    """

    index: int
    prompt: str
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int | None = None
    reference: str | None = None
    request_id: str | None = None
    prefix_group: int | None = None
    group_position: int | None = None
    truncated_from: int | None = None
    messages: tuple[dict[str, str], ...] | None = None


@dataclass
class RequestRecord:
    """What one request produced, with timestamps on one monotonic clock (seconds).

    ``token_times`` holds the time each output token became available, where the backend
    can tell; ``t_first_token`` equals ``token_times[0]`` then. A failed request carries
    ``error`` and no output.
    """

    index: int
    prompt: str
    text: str
    prompt_tokens: int
    output_token_ids: list[int]
    t_start: float
    t_first_token: float | None
    t_end: float
    token_times: list[float] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: N_out when it is known without the ids (a server's ``usage`` count); None -> ids
    n_output_tokens: int | None = None

    @property
    def output_tokens(self) -> int:
        """Number of generated tokens (N_out): ``n_output_tokens`` if set, else the ids."""
        if self.n_output_tokens is not None:
            return self.n_output_tokens
        return len(self.output_token_ids)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_tokens"] = self.output_tokens
        return d



#: statuses a job can end in (RUNNING only while it runs)
STATUSES = ("RUNNING", "FINISHED", "FAILED", "SKIPPED", "VALIDATED")


@dataclass
class JobResult:
    """One job: its resolved config, what ran, what it measured; ``results.json``."""

    status: str = "RUNNING"
    job_num: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    overrides: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    applied: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    resumed_from: str | None = None
    mlflow_run_id: str | None = None
    #: seconds MLflow logging took; known only after results.json was written
    time_tracking_s: float | None = None
    #: the preset chosen in each config group (Hydra's ``runtime.choices``), e.g.
    #: ``{"backend": "hf_fast", "decoding": "topp"}``; names and tags the MLflow run
    choices: dict[str, str] = field(default_factory=dict)
    #: when the job started and ended (epoch milliseconds; the end is taken before
    #: tracking), the MLflow run's start and end time
    started_at: int | None = None
    ended_at: int | None = None
    #: a load profile's points in order (``workload.profile`` != fixed), one dict each:
    #: offered/achieved rate, latencies, SLO verdict, saturation, validity (see
    #: ``pipeline/serving/points.py``); empty for a fixed profile
    load_points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    def to_dict(self) -> dict[str, Any]:
        """The results.json form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobResult:
        """Read a results.json dict; unknown keys (older or newer files) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def finished_jobs(sweep_dir: Path) -> list[tuple[Path, JobResult]]:
    """(job folder, result) of every FINISHED job of a sweep folder, in job order; an
    unreadable results.json is skipped with a warning."""
    import json
    import logging

    jobs = []
    for f in sorted(Path(sweep_dir).glob("*/results.json")):
        try:
            r = JobResult.from_dict(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            logging.getLogger(__name__).warning("skipping unreadable %s (%s)", f, e)
            continue
        if r.finished and r.config:
            jobs.append((f.parent, r))
    return jobs
