"""OpenAI-compatible servers (vLLM, TGI's Messages API, SGLang, a remote endpoint...),
benchmarked under concurrent streaming load by :mod:`pipeline.serving.client`.

The backend is *online*: it receives every request of the measured phase at once through
:meth:`OpenAIBackend.serve` and sends each on the workload's arrival schedule. The API key
is read from the environment variable named by ``backend.api_key_env`` at request time and
only ever placed in the ``Authorization`` header: it is not stored on the backend, in the
config, in results or in MLflow.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.backends.base import BOOKKEEPING, Backend, BackendConfig, Setting, task
from pipeline.backends.openai_body import OPENAI_APIS, openai_body
from pipeline.config import DecodingConfig, ModelConfig, check_choice, check_range, fail
from pipeline.errors import ConfigError
from pipeline.records import Request, RequestRecord
from pipeline.serving.client import StreamRequest, run_requests
from pipeline.serving.http_json import http_get_json

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)

#: per-request timeout of :meth:`OpenAIBackend.generate` (serve() gets the workload's)
DEFAULT_TIMEOUT_S = 600.0


PROMPT_FORMATS = ("auto", "token_ids", "text")


@dataclass
class OpenAIBackendConfig(BackendConfig):
    """Any running OpenAI-compatible server (vLLM, TGI's Messages API, SGLang...), driven
    by the streaming client. ``api_key_env`` names an environment variable: the key itself
    is never part of the config, so it never reaches params, tags or logs."""

    name: str = "openai"
    """The backend's name in configs, tags and messages."""
    impl: str = "pipeline.backends.openai:OpenAIBackend"
    """The Backend class that runs these settings (``module:Class``)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """The server's OpenAI API root (``http://`` or ``https://``, ending in ``/v1``);
    requests go to ``{base_url}/completions`` or ``{base_url}/chat/completions``."""
    model: str | None = None
    """The served model name sent in each request; null means the first model the server
    lists at ``GET {base_url}/models``. A name the server does not list is refused at
    load."""
    api: str = "completions"
    """completions | chat. chat sends the prompt as one user message (a conversation's turn:
    its messages) and the server renders its chat template (TGI's Messages API needs
    chat)."""
    api_key_env: str | None = None
    """The NAME of an environment variable holding the API key (never the key itself); it
    is read at request time and sent only in the ``Authorization`` header. null: no key."""
    stream: bool = True
    """Streaming responses; only true is accepted (TTFT and inter-token latency need
    it)."""
    vllm_extensions: bool = False
    """The server accepts vLLM's extra request fields (vLLM, SGLang): ``top_k``,
    ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``return_token_ids`` and
    token-id prompts. Without them those decoding options and ``workload.fixed_length``
    are refused rather than dropped."""
    prompt_format: str = "auto"
    """How a completions prompt is sent: token_ids (the same tokens every other backend
    gets) | text (the rendered prompt, special tokens kept) | auto (token_ids with
    ``vllm_extensions``, else text). The chat API always sends messages."""
    connect_timeout_s: float = 10.0
    """Seconds (> 0) the ``GET {base_url}/models`` check at load waits for the server."""


#: what each field is to the gate: the endpoint, its model and how prompts and sampling
#: fields are sent decide what is computed (task); the key's variable name, streaming (the
#: only mode) and the time-out are bookkeeping. With an unknown server behind the URL, an
#: openai job is comparable only with jobs against the same endpoint.
OPENAI_SETTINGS: dict[str, Setting] = {
    "base_url": task(),
    "model": task(),
    "api": task(),
    "api_key_env": BOOKKEEPING,
    "stream": BOOKKEEPING,
    "vllm_extensions": task(),
    "prompt_format": task(),
    "connect_timeout_s": BOOKKEEPING,
}


class ServingFailed(RuntimeError):
    """Every request of a measured phase failed (or the server died): the job is FAILED.

    ``records`` keeps the failed records so that a caller can still save them.
    """

    def __init__(self, message: str, records: list[RequestRecord] | None = None) -> None:
        super().__init__(message)
        self.records = records or []


class OpenAIBackend(Backend):
    """A running OpenAI-compatible endpoint at ``backend.base_url``."""

    name = "openai"
    config_class = OpenAIBackendConfig
    settings = OPENAI_SETTINGS
    online = True
    per_request_output_lengths = True

    @classmethod
    def validate_settings(cls, cfg: OpenAIBackendConfig) -> None:  # type: ignore[override]
        if not cfg.base_url.startswith(("http://", "https://")):
            fail("backend.base_url", cfg.base_url, "must start with http:// or https://")
        check_choice("backend.api", cfg.api, OPENAI_APIS)
        check_choice("backend.prompt_format", cfg.prompt_format, PROMPT_FORMATS)
        if cfg.api == "chat" and cfg.prompt_format == "token_ids":
            fail("backend.prompt_format", cfg.prompt_format,
                  "the chat API takes messages, not token ids; use auto or text")
        if not cfg.stream:
            fail("backend.stream", cfg.stream, "only streaming is supported (TTFT and ITL "
                  "need it)")
        if cfg.api_key_env is not None and not cfg.api_key_env.replace("_", "").isalnum():
            fail("backend.api_key_env", cfg.api_key_env,
                  "must be the NAME of an environment variable holding the key, not the key")
        check_range("backend.connect_timeout_s", cfg.connect_timeout_s, 0.0, lo_open=True)

    @classmethod
    def check(cls, spec: Config) -> None:
        b = spec.backend
        openai_body(spec.decoding, spec.workload.max_new_tokens, spec.workload.fixed_length,
                    spec.seed, b.api, extensions=b.vllm_extensions, backend=b.name)

    @classmethod
    def gpus_needed(cls, spec: Config) -> int:
        """The model runs remotely; a local GPU serves only the perplexity scorer."""
        return 1 if spec.scoring.perplexity else 0

    def __init__(
        self, model_dir: str, model: ModelConfig, cfg: OpenAIBackendConfig, seed: int,
        **_: Any,
    ) -> None:
        self.model_dir = model_dir
        self.model_cfg = model
        self.cfg = cfg
        self.seed = seed
        self.base_url = cfg.base_url.rstrip("/")
        self.api = cfg.api
        self.extensions = cfg.vllm_extensions
        self.served_model: str | None = cfg.model
        self.server_model_info: dict[str, Any] = {}
        self.tokenizer: Any = None

    # ------------------------------------------------------------------ life cycle

    def load(self) -> None:
        """Load the tokenizer that renders prompts and check that the endpoint answers
        and serves the model (``GET {base_url}/models``)."""
        self._headers()  # a missing key fails here, before any request
        self.tokenizer = self._load_tokenizer()
        self._probe()

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            self.model_dir, trust_remote_code=self.model_cfg.trust_remote_code,
            revision=self.model_cfg.revision,
        )

    def _headers(self) -> dict[str, str]:
        env = self.cfg.api_key_env
        if not env:
            return {}
        key = os.environ.get(env)
        if not key:
            raise ConfigError(
                f"backend {self.name}: backend.api_key_env={env!r} names an environment "
                f"variable that is not set; export it or set backend.api_key_env=null"
            )
        return {"Authorization": f"Bearer {key}"}

    def _probe(self) -> None:
        url = f"{self.base_url}/models"
        try:
            status, body = http_get_json(url, self.cfg.connect_timeout_s, self._headers())
        except OSError as e:
            raise RuntimeError(
                f"backend {self.name}: cannot reach the server at {url} ({e}); is it "
                f"running, and is backend.base_url right?"
            ) from e
        if status != 200:
            raise RuntimeError(f"backend {self.name}: GET {url} answered HTTP {status}: "
                               f"{str(body)[:300]}")
        models = body.get("data", []) if isinstance(body, dict) else []
        ids = [m.get("id") for m in models if isinstance(m, dict)]
        if self.served_model is None:
            if not ids:
                raise RuntimeError(f"backend {self.name}: {url} lists no model; set "
                                   f"backend.model to the served model name")
            self.served_model = ids[0]
        elif ids and self.served_model not in ids:
            raise ConfigError(
                f"backend.model={self.served_model!r} is invalid: the server at "
                f"{self.base_url} serves {', '.join(map(str, ids))}"
            )
        self.server_model_info = next(
            (m for m in models if isinstance(m, dict) and m.get("id") == self.served_model), {}
        )

    def close(self) -> None:
        self.tokenizer = None

    # ------------------------------------------------------------------ requests

    def endpoint(self) -> str:
        """The URL every request of a job is posted to."""
        return f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"

    def prompt_format(self) -> str:
        """``token_ids`` (identical tokens to every other backend) where the server takes
        them, else ``text``; the chat API always takes messages."""
        if self.api == "chat":
            return "messages"
        if self.cfg.prompt_format != "auto":
            return self.cfg.prompt_format
        return "token_ids" if self.extensions else "text"

    def _payload(self, r: Request, base: dict[str, Any]) -> dict[str, Any]:
        body = {"model": self.served_model, **base, "stream": True,
                "stream_options": {"include_usage": True}}
        fmt = self.prompt_format()
        if fmt == "messages":  # a conversation's turn: its whole history
            body["messages"] = ([dict(m) for m in r.messages] if r.messages
                                else [{"role": "user", "content": r.prompt}])
        elif fmt == "token_ids":
            body["prompt"] = list(r.prompt_token_ids)
        else:
            # The rendered prompt (chat template included) as text, special tokens kept,
            # so that the server sees the same conversation the token ids encode.
            body["prompt"] = self.tokenizer.decode(list(r.prompt_token_ids),
                                                   skip_special_tokens=False)
            # The template already holds any BOS; vLLM and SGLang would add another.
            if self.extensions:
                body["add_special_tokens"] = False
        if self.extensions:
            body["return_token_ids"] = True
        n = r.max_new_tokens
        if n is not None:  # a per-request output length (synthetic workloads)
            body["max_tokens"] = n
            if body.get("min_tokens"):
                body["min_tokens"] = n
        return body

    def _check_length(self, requests: list[Request], max_new_tokens: int) -> None:
        """Each prompt plus its own output length (``Request.max_new_tokens``, else the
        batch's) must fit the context the server reports (``max_model_len``, vLLM and
        SGLang list it at ``/models``)."""
        from pipeline.workload.limits import check_requests_fit

        limit = self.server_model_info.get("max_model_len")
        if limit and self.prompt_format() == "token_ids":  # else the count is the server's
            check_requests_fit(requests, max_new_tokens, int(limit),
                               f"backend {self.name}'s max_model_len of {limit}")

    def serve(
        self, requests: list[Request], decoding: DecodingConfig, max_new_tokens: int,
        fixed_length: bool, send_at: list[float], concurrency: int | None, timeout_s: float,
    ) -> list[RequestRecord]:
        """Stream every request on its schedule; failures are records with ``error`` set.

        Raises :class:`ServingFailed` when every request failed: such a phase measured
        nothing, and the job must end FAILED with the reason.
        """
        base = self.request_base(decoding, max_new_tokens, fixed_length)
        self._check_length(requests, max_new_tokens)
        stream_reqs = [self.stream_request(r, base) for r in requests]
        records = run_requests(stream_reqs, send_at, concurrency, timeout_s, self._headers())
        self._after_serve(records)
        return records

    def request_base(self, decoding: DecodingConfig, max_new_tokens: int,
                     fixed_length: bool) -> dict[str, Any]:
        """The sampling fields every request of a phase shares (:func:`openai_body`)."""
        return openai_body(decoding, max_new_tokens, fixed_length, self.seed, self.api,
                           extensions=self.extensions, backend=self.name)

    def stream_request(self, r: Request, base: dict[str, Any]) -> StreamRequest:
        """What is posted for ``r``: its prompt (or messages) on top of ``base``."""
        return StreamRequest(index=r.index, prompt=r.prompt, url=self.endpoint(),
                             body=self._payload(r, base),
                             prompt_tokens=len(r.prompt_token_ids), api=self.api)

    def serve_conversations(self, spec: Config, conversations: list, tokenizer: Any,
                            sent: list[Request] | None = None) -> list[RequestRecord]:
        """Run multi-turn conversations (:func:`pipeline.serving.conversations.
        run_conversations`); :class:`ServingFailed` when every turn failed."""
        from pipeline.serving.conversations import run_conversations

        records = run_conversations(self, spec, conversations, tokenizer, self._headers(),
                                    sent)
        self._after_serve(records)
        return records

    def generate(
        self, requests: list[Request], decoding: DecodingConfig, max_new_tokens: int = 32,
        fixed_length: bool = False,
    ) -> list[RequestRecord]:
        """Offline-style use (one batch): every request sent at once, none held back."""
        return self.serve(requests, decoding, max_new_tokens, fixed_length,
                          send_at=[0.0] * len(requests), concurrency=None,
                          timeout_s=DEFAULT_TIMEOUT_S)

    def metrics_url(self) -> str:
        """The server's Prometheus endpoint (vLLM, SGLang and TGI serve ``/metrics`` at
        the root); a load point reads the engine's own view there, if it answers."""
        return f"{self.base_url.removesuffix('/v1')}/metrics"

    def _after_serve(self, records: list[RequestRecord]) -> None:
        failed = [r for r in records if not r.ok]
        if failed:
            log.warning("backend %s: %d/%d requests failed; first: %s", self.name,
                        len(failed), len(records), failed[0].error)
        if records and len(failed) == len(records):
            raise ServingFailed(
                f"backend {self.name}: all {len(records)} requests failed; first error: "
                f"{failed[0].error}", records)

    # ------------------------------------------------------------------ read-back

    def applied_settings(self) -> dict[str, Any]:
        """Endpoint, API, served model and what the server reports about it."""
        out: dict[str, Any] = {
            "base_url": self.base_url,
            "api": self.api,
            "served_model": self.served_model,
            "prompt_format": self.prompt_format(),
            "vllm_extensions": self.extensions,
            "stream": True,
        }
        if self.server_model_info.get("max_model_len"):
            out["server_max_model_len"] = self.server_model_info["max_model_len"]
        return out
