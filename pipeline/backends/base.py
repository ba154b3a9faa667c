"""The backend interface: the seam between measurement and inference engines.

A backend is a context manager: ``__enter__`` loads the model (timed by the caller),
``generate`` runs a list of requests under one decoding spec and returns one
:class:`RequestRecord` per request, ``__exit__`` releases what it holds. Backends never
compute metrics; metrics never know backends.

A backend class also owns every plug-in point the pipeline needs from it, so that nothing
outside ``pipeline/backends/`` names a backend: its settings schema (``config_class``),
what it can honour (:meth:`Backend.check`, before anything loads), the GPUs it occupies
(:meth:`Backend.gpus_needed`), its device synchronization (:meth:`Backend.sync`), whether
it can lend its model to the perplexity scorer (:meth:`Backend.scorer_model`), the engines
it keeps between jobs (:meth:`Backend.cached_engines`, :meth:`Backend.shutdown_cached`)
and what each of its settings means to the sweep-end gate (:attr:`Backend.settings`: every
field of its ``config_class`` is a *task*, *optimization* or *bookkeeping* field, see
:class:`Setting`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from omegaconf import MISSING

from pipeline.records import Request, RequestRecord

if TYPE_CHECKING:
    from pipeline.config import Config


@dataclass
class BackendConfig:
    """Fields every backend's settings share; each backend's schema extends it.

    ``impl`` is ``"module:Class"`` of the :class:`Backend` that runs it: the yaml in
    ``conf/backend/`` names it, so adding a backend is one module and one yaml.
    """

    name: str = MISSING
    """The backend's short name (``hf``, ``vllm``, ``openai``...), set by its yaml in
    ``conf/backend/``: the ``backend`` tag of each job's MLflow run and the name error
    messages use. Required."""
    impl: str = MISSING
    """``module:Class`` of the :class:`Backend` subclass that runs these settings, set by
    the yaml; the class is imported only when a config uses it. Required."""

    #: the engine takes a fixed share of the card (``gpu_memory_utilization``, vLLM) and
    #: fits its KV cache inside it, so its memory is planned as that share, not as a sum
    reserves_gpu_share: ClassVar[bool] = False


#: what a field is to the gate (pipeline/gate.py), see :class:`Setting`
ROLES = ("task", "optimization", "bookkeeping")

#: a job's resolved config as ``results.json`` holds it (``backend``, ``model``,
#: ``decoding``, ``workload``, ``seed`` ...); what a :class:`Setting`'s callables read
Job = Mapping[str, Any]


@dataclass(frozen=True)
class Setting:
    """What one ``backend.*`` field means when two jobs are compared (the gate).

    - ``task``: it changes what is computed; jobs that differ in it are not comparable.
      ``off`` lists the values at which it computes what a backend without the field
      computes (dropped from the comparison, so that hf and vLLM jobs can be compared).
    - ``optimization``: it changes speed, and by intent not the model's answers; ``off``
      lists the values at which it is switched off (the baseline's). Jobs differing only in
      optimizations are comparable; the gate checks each against the least-optimized one.
    - ``bookkeeping``: names, paths, caches and resources (threads, memory, timeouts):
      never compared, never counted.

    ``read_if(job)``: whether the backend reads the field for this job (``compile_mode``
    only under ``compile``); an unread field counts as off. ``effective(value, job)``: the
    value in effect (``dtype=null`` is ``model.dtype``). ``numerics=False`` marks a field
    that changes how tokens are proposed, never the model's next-token distributions
    (speculative decoding): teacher-forced KL between jobs differing only in such fields is
    0 by construction, so the gate does not read it.
    """

    role: str
    off: tuple[Any, ...] = ()
    read_if: Callable[[Job], bool] | None = None
    effective: Callable[[Any, Job], Any] | None = None
    numerics: bool = True

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Setting.role={self.role!r}: allowed values are "
                             f"{', '.join(ROLES)}")
        if self.role == "optimization" and not self.off:
            raise ValueError("an optimization Setting needs its 'off' value(s)")

    def value(self, job: Job, name: str) -> Any:
        """The field's value in effect for ``job`` (its ``backend.<name>``)."""
        v = backend_of(job).get(name)
        return self.effective(v, job) if self.effective is not None else v

    def is_on(self, job: Job, name: str) -> bool:
        """Optimization and task fields: read for ``job`` and not at an ``off`` value."""
        if self.role == "bookkeeping":
            return False
        if self.read_if is not None and not self.read_if(job):
            return False
        return self.value(job, name) not in self.off


def task(off: tuple[Any, ...] = (), effective: Callable[[Any, Job], Any] | None = None
         ) -> Setting:
    """A field that changes what is computed (``off``: where it computes what a backend
    without the field computes)."""
    return Setting("task", off, effective=effective)


def optimization(off: tuple[Any, ...], read_if: Callable[[Job], bool] | None = None,
                 effective: Callable[[Any, Job], Any] | None = None,
                 numerics: bool = True) -> Setting:
    """A speed setting, off at ``off`` (see :class:`Setting`)."""
    return Setting("optimization", off, read_if, effective, numerics)


#: names, paths, caches, resources
BOOKKEEPING = Setting("bookkeeping")


def backend_of(job: Job) -> Mapping[str, Any]:
    """``job["backend"]`` (empty when absent)."""
    return job.get("backend") or {}


def model_dtype(value: Any, job: Job) -> Any:
    """``backend.dtype=null`` stands for ``model.dtype``."""
    return value if value is not None else (job.get("model") or {}).get("dtype")


class Backend(ABC):
    """Base class of every inference backend."""

    #: short name used in configs, tags and error messages
    name: str = "base"
    #: the settings schema: ``backend.*`` is validated against it before anything loads
    config_class: type[BackendConfig] = BackendConfig
    #: honours ``Request.max_new_tokens`` per request (else a batch shares one length)
    per_request_output_lengths: bool = False
    #: what each field of ``config_class`` is to the gate (:class:`Setting`), declared next
    #: to the config class; ``name`` and ``impl`` are declared here. A field left out is
    #: treated as a task field (and a test fails on it)
    settings: ClassVar[Mapping[str, Setting]] = {}
    #: optimizations the engine always applies, with no switch (vLLM's paged KV cache...):
    #: counted with the fields that are on when the gate picks the least-optimized job
    inherent_optimizations: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def declared_settings(cls) -> dict[str, Setting]:
        """Every ``backend.*`` field's :class:`Setting`: ``name``/``impl`` (bookkeeping)
        and the class's own :attr:`settings`."""
        return {"name": BOOKKEEPING, "impl": BOOKKEEPING, **cls.settings}

    @classmethod
    def undeclared_settings(cls) -> list[str]:
        """Fields of ``config_class`` without a declaration, and declarations naming no
        field (``"+stale"``): both are mistakes a test catches."""
        fields = [f.name for f in dataclasses.fields(cls.config_class)]
        declared = cls.declared_settings()
        return ([f for f in fields if f not in declared]
                + [f"+{d}" for d in declared if d not in fields])

    # ------------------------------------------------------------ before anything loads

    @classmethod
    def validate_settings(cls, cfg: BackendConfig) -> None:
        """Range and choice checks of ``backend.*`` (typed as ``config_class``), raising
        :class:`~pipeline.errors.ConfigError`; no model, no heavy import."""
        return None

    @classmethod
    def check(cls, spec: Config) -> None:
        """Refuse what this backend cannot honour for ``spec`` (decoding, workload, device),
        raising :class:`~pipeline.errors.UnsupportedDecoding` or
        :class:`~pipeline.errors.ConfigError` with the key, the value and the alternative.
        Runs before any model loads and must not import heavy packages."""
        return None

    @classmethod
    def gpus_needed(cls, spec: Config) -> int:
        """GPUs this job occupies on this host when it runs on CUDA (the perplexity scorer
        included); 0 when it needs none."""
        return 1

    @classmethod
    def cached_engines(cls) -> int:
        """Engines, servers or models this class keeps alive in this process between jobs
        on a GPU (the per-GPU lock stays with this process while there are any)."""
        return 0

    @classmethod
    def shutdown_cached(cls) -> int:
        """Stop every engine or server this class keeps; returns how many were stopped."""
        return 0

    # ------------------------------------------------------------ while a job runs

    def sync(self) -> None:  # noqa: B027 - optional hook
        """Wait for the device to finish queued work before a clock is read (no-op on
        CPU and for engines that return only finished work)."""

    def scorer_model(self, dtype: Any) -> Any | None:
        """This backend's own transformers model, when it can score perplexity in ``dtype``
        as it is (same weights, not compiled); None -> the scorer loads its own."""
        return None

    def __enter__(self) -> Backend:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def load(self) -> None:
        """Load the model/engine; heavy work belongs here, not in ``__init__``."""

    @abstractmethod
    def generate(
        self, requests: list[Request], decoding: Any, max_new_tokens: int, fixed_length: bool
    ) -> list[RequestRecord]:
        """Run ``requests`` (one batch) under ``decoding``; one record per request, in
        request order. ``fixed_length`` forces exactly ``max_new_tokens`` output tokens."""

    #: online backends (servers) receive every request at once through :meth:`serve`
    #: and handle arrival times and concurrency themselves, instead of batches
    online: bool = False

    def serve(
        self, requests: list[Request], decoding: Any, max_new_tokens: int, fixed_length: bool,
        send_at: list[float], concurrency: int | None, timeout_s: float,
    ) -> list[RequestRecord]:
        """Online backends: send request i at ``send_at[i]`` seconds after the start, at most
        ``concurrency`` in flight, each bounded by ``timeout_s``; failures become records
        with ``error`` set rather than exceptions."""
        raise NotImplementedError(f"backend {self.name} is offline: it has no serve()")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default holds none."""

    def applied_settings(self) -> dict[str, Any]:
        """What was actually applied (dtype, device, attention, cache...), read back from
        the loaded model or engine rather than echoed from the config."""
        return {}

    def extra_metrics(self) -> dict[str, float]:
        """Backend-specific numeric facts worth logging (e.g. KV-cache capacity)."""
        return {}

    def child_pids(self) -> list[int]:
        """PIDs of helper processes whose memory belongs to this job (e.g. an engine)."""
        return []
