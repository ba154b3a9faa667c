"""The backend interface: the seam between measurement and inference engines.

A backend is a context manager: ``__enter__`` loads the model (timed by the caller),
``generate`` runs a list of requests under one decoding spec and returns one
:class:`RequestRecord` per request, ``__exit__`` releases what it holds. Backends never
compute metrics; metrics never know backends.

A backend class also owns every plug-in point the pipeline needs from it, so that nothing
outside ``pipeline/backends/`` names a backend: its settings schema (``config_class``),
what it can honour (:meth:`Backend.check`, before anything loads), the GPUs it occupies
(:meth:`Backend.gpus_needed`), its device synchronization (:meth:`Backend.sync`), the
tokenizer that renders prompts (:meth:`Backend.prompt_tokenizer`), whether it can lend its
model to the perplexity scorer (:meth:`Backend.scorer_model`) and the engines it keeps
between jobs (:meth:`Backend.cached_engines`, :meth:`Backend.shutdown_cached`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    impl: str = MISSING


class Backend(ABC):
    """Base class of every inference backend."""

    #: short name used in configs, tags and error messages
    name: str = "base"
    #: the settings schema: ``backend.*`` is validated against it before anything loads
    config_class: type[BackendConfig] = BackendConfig
    #: honours ``Request.max_new_tokens`` per request (else a batch shares one length)
    per_request_output_lengths: bool = False

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

    def prompt_tokenizer(self) -> Any | None:
        """The tokenizer that renders prompts into token ids; None -> the pipeline loads
        one from the model folder."""
        return getattr(self, "tokenizer", None)

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
