"""The backend interface: the seam between measurement and inference engines.

A backend is a context manager: ``__enter__`` loads the model (timed by the caller),
``generate`` runs a list of requests under one decoding spec and returns one
:class:`RequestRecord` per request, ``__exit__`` releases what it holds. Backends never
compute metrics; metrics never know backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Request:
    """One prompt to generate from; ``index`` is its position in the workload.

    ``prompt_token_ids`` is the prompt as the model sees it (chat template applied,
    tokenized once by the pipeline) so that every backend is fed identical tokens.
    """

    index: int
    prompt: str
    prompt_token_ids: tuple[int, ...]


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


class UnsupportedDecoding(ValueError):
    """A decoding parameter this backend cannot honour (never silently dropped)."""


class Backend(ABC):
    """Base class of every inference backend."""

    #: short name used in configs, tags and error messages
    name: str = "base"

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
