"""The schema of the workload group (``conf/workload/*.yaml``): what a job sends and when.

Split from :mod:`pipeline.config.schemas` only for length; each field's attribute
docstring is its user-facing description (``docs/settings.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ARRIVALS = ("poisson", "gamma")


@dataclass
class WorkloadConfig:
    """What to send: prompts (inline, from a file or dataset, or synthetic of exact token
    lengths), batching, lengths, repeats. Lengths count rendered tokens (chat template
    included), as the model sees them."""

    name: str = "quick"
    """The workload's name: names runs, and picks the default reference metrics
    (``scoring.task_reference_metrics.<name>``)."""
    source: str = "prompts"
    """Where prompts come from: ``prompts`` (inline ``prompts`` or ``prompts_file``),
    ``synthetic`` (built from the shipped English corpus at exact token lengths; needs
    ``num_prompts``), ``trace`` (a request trace replayed at its own times: ``trace_file``;
    online backends, ``profile=trace``) or ``conversations`` (multi-turn conversations,
    each turn sent with its history once the previous answer is in; online backends)."""
    prompts: list[str] = field(default_factory=list)
    """Inline prompts (a list of strings), used when ``prompts_file`` is not set."""
    prompts_file: str | None = None
    """A prompt file or dataset: ``.txt`` (one prompt per line, blank lines skipped),
    ``.jsonl``, ``.csv``, ``.parquet`` (a ``prompt_field`` column) or a folder written by
    ``Dataset.save_to_disk``; null = the inline ``prompts``."""
    num_prompts: int | None = None
    """Number of requests: the prompts are cut to it or cycled up to it; null = every
    prompt once. Required for ``source=synthetic``; with ``source=trace`` the first N
    requests of ``trace_window``."""
    trace_file: str | None = None
    """``source=trace``: the trace to replay, one request a line: ``.jsonl`` in Mooncake's
    format (``timestamp`` in ms, ``input_length``, ``output_length``, ``hash_ids``: one id
    per 512-token block, shared ids = shared tokens) or ``.csv``/``.jsonl`` with the first
    three only (every request's tokens its own); at most ``max_file_bytes``."""
    trace_speedup: float = 1.0
    """``source=trace``: send times are the trace's timestamps divided by this (> 0): 2
    replays twice as fast."""
    trace_window: list[float] | None = None
    """``source=trace``: ``[start_ms, end_ms]``: replay the requests whose timestamps fall in
    ``[start_ms, end_ms)``, the first one sent at once; null = the whole trace."""
    conversations_file: str | None = None
    """``source=conversations``: a ShareGPT-style ``.jsonl`` file, one conversation a line:
    ``{"id": ..., "conversations": [{"from": "human", "value": "..."}, {"from": "gpt",
    ...}]}`` (``human``/``user``, ``gpt``/``assistant``, one leading ``system`` turn
    allowed; human and gpt alternate, starting with human); at most ``max_file_bytes``.
    null = synthetic conversations."""
    conversation_turns: int = 4
    """``source=conversations``: user turns per synthetic conversation, or the most user
    turns taken from each file conversation (its first N); 1 to 64."""
    num_conversations: int | None = None
    """``source=conversations``: the number of conversations (required for synthetic
    ones); with a file its first N, null = all."""
    think_time_s: float = 0.0
    """``source=conversations``: seconds a conversation waits after an answer before
    sending its next turn; >= 0."""
    conversation_history: str = "generated"
    """``source=conversations``: the answers in each turn's history: ``generated`` (the
    model's own answers) or ``file`` (the file's gpt turns; needs
    ``conversations_file``)."""
    batch_size: int = 4
    """Requests per ``generate`` call on in-process backends (hf, vllm); >= 1. Online
    backends use ``concurrency`` instead."""
    max_new_tokens: int = 32
    """Output length in tokens per request: exact with ``output_dist=fixed`` (an upper
    bound unless ``fixed_length``), else the output distribution's mean."""
    fixed_length: bool = False
    """true: every request generates exactly its ``max_new_tokens`` (end-of-sequence
    ignored: ``min_new_tokens`` / ``ignore_eos``), for speed runs of known length."""
    warmup: int = 1
    """Unmeasured warm-up ``generate`` calls (one batch each; one request on online
    backends) before the measured repeats; 0 = none."""
    repeats: int = 1
    """Measured passes over all requests (1 to 1000); more than 1 adds a mean and 95%
    confidence interval of the output rate across repeats."""
    max_prompt_chars: int = 20000
    """Longest prompt accepted from ``prompts_file``, in characters; a longer one is
    refused with its line or row before any model loads."""
    max_file_bytes: int = 10_000_000
    """Largest ``prompts_file`` accepted, in bytes (a dataset folder: its total size);
    larger ones are refused before reading."""
    prompt_field: str = "prompt"
    """The column (``.jsonl`` key) holding the prompt in a ``prompts_file`` other than
    ``.txt``."""
    reference_field: str | None = None
    """The column holding each request's reference answer (for ``scoring.reference_metrics``);
    null = no references. Not for ``.txt`` files."""
    id_field: str | None = None
    """The column naming each request; null = ``line N`` (``.txt``, ``.jsonl``) or ``row N``
    (the others). Not for ``.txt`` files."""
    split: str | None = None
    """The split of a dataset folder holding several; null = ``train`` when present, else
    its only split."""
    max_input_tokens: int | None = None
    """Longest rendered prompt accepted, in tokens (chat template included); longer ones are
    cut or refused per ``on_too_long``; null = no limit but the model's context."""
    on_too_long: str = "refuse"
    """What a prompt over ``max_input_tokens`` gets: ``refuse`` (the job is refused, naming
    the requests) or ``truncate`` (cut to fit)."""
    input_tokens: int = 128
    """Synthetic inputs: the prompt length in rendered tokens (``input_dist=fixed``) or the
    distribution's mean."""
    input_dist: str = "fixed"
    """Synthetic input-length distribution: ``fixed``, ``uniform`` (``input_min`` to
    ``input_max``), ``normal`` or ``lognormal`` (mean ``input_tokens``, std ``input_std``,
    clipped to ``input_min``..``input_max``)."""
    input_std: float | None = None
    """Standard deviation of the input length in tokens (``normal``, ``lognormal``)."""
    input_min: int | None = None
    """Shortest input in tokens; required when ``input_dist`` is not ``fixed``."""
    input_max: int | None = None
    """Longest input in tokens; required when ``input_dist`` is not ``fixed``."""
    output_dist: str = "fixed"
    """Per-request output-length distribution around ``max_new_tokens``: ``fixed``,
    ``uniform``, ``normal`` or ``lognormal`` (as ``input_dist``)."""
    output_std: float | None = None
    """Standard deviation of the output length in tokens (``normal``, ``lognormal``)."""
    output_min: int | None = None
    """Shortest output in tokens; required when ``output_dist`` is not ``fixed``."""
    output_max: int | None = None
    """Longest output in tokens; required when ``output_dist`` is not ``fixed``."""
    shared_prefix_tokens: int = 0
    """Synthetic inputs: rendered tokens that the requests of one prefix group share at
    their start (for prefix caching); 0 = none. Must be below the shortest input."""
    prefix_groups: int = 1
    """Number of contiguous request groups, each sharing its own prefix of
    ``shared_prefix_tokens`` tokens; at most ``num_prompts``."""
    concurrency: int | None = None
    """Online backends: most requests in flight at once (``profile=fixed`` only); null = no
    cap. With ``source=conversations``: the conversations live at once."""
    request_rate: float | None = None
    """Online backends: offered arrival rate in requests/s; null = every request sent at
    once."""
    arrival: str = "poisson"
    """Arrival process at ``request_rate``: ``poisson`` (exponential gaps) or ``gamma``
    (gaps with shape ``burstiness``)."""
    burstiness: float = 1.0
    """Gamma shape of the inter-arrival gaps with ``arrival=gamma``: 1 = Poisson, below 1
    burstier, above 1 more regular; > 0."""
    request_timeout_s: float = 120.0
    """Online backends: seconds a request may take to complete before it is recorded as a
    timeout error; > 0."""
    slo_ttft_ms: float | None = None
    """Service-level objective on time to first token, in ms; null = none."""
    slo_tpot_ms: float | None = None
    """Service-level objective on time per output token (after the first), in ms; null =
    none."""
    slo_e2el_ms: float | None = None
    """Service-level objective on end-to-end request latency, in ms; null = none."""
    profile: str = "fixed"
    """Online backends' load profile: ``fixed`` (one phase at the settings above),
    ``sweep`` (sync, max, then ``sweep_points`` rates in between), ``slo_search`` (the
    highest rate meeting the SLOs), ``ramp`` (rising rates up to ``ramp_end_rate``) or
    ``trace`` (one open-loop point at a trace's own send times; with ``source=trace``)."""
    sweep_points: int = 4
    """Open-loop rate points of ``sweep`` and ``ramp`` (1 to 100)."""
    point_requests: int | None = None
    """Requests per load point; null = ``num_prompts`` (the prompts cycled)."""
    point_duration_s: float | None = None
    """Open-loop points: run each for this many seconds instead of a request count; null =
    by count."""
    slo_percentile: float = 90.0
    """Percentile at which a point's SLOs must hold (0 < p <= 100)."""
    search_tolerance: float = 0.1
    """``slo_search`` stops bisecting once ``(hi - lo) / lo`` is at most this (0 < t <= 1)."""
    max_points: int = 10
    """``slo_search``: most load points in all (3 to 100)."""
    ramp_start_rate: float | None = None
    """``ramp``: the first point's rate in requests/s; null = ``ramp_end_rate /
    sweep_points``."""
    ramp_end_rate: float | None = None
    """``ramp``: the last point's rate in requests/s; required for ``profile=ramp``."""
    slo_dialect: str = "schedule"
    """Which send time open-loop TTFT and end-to-end SLOs are judged from: ``schedule``
    (MLPerf's rule: client-side queueing counts against the server) or ``send`` (vLLM's
    convention)."""
    saturation_rate_ratio: float = 0.9
    """An open-loop point whose completion rate falls below this fraction of its offered
    rate is saturated, whatever its TTFT (0 < r <= 1)."""
    saturation_ttft_growth: float = 2.0
    """A running point ends early when its completions fall short and the newest requests'
    TTFT is at least this many times the first ones', at two checks in a row (> 1)."""
    point_grace_s: float = 10.0
    """Seconds the requests still in flight get to finish when a point ends early, before
    they are aborted; >= 0."""
    max_dispatch_lag_ms: float = 50.0
    """A point is invalid when the p99 of how late requests were sent against their schedule
    exceeds this many ms (the client, not the server, set the rate); > 0."""
    max_client_cpu_percent: float = 90.0
    """A point is invalid when this process used more than this percent of one CPU core
    during it (the client may be the bottleneck); > 0."""
