"""A job's requests, built before any model loads.

The tokenizer comes from the model folder (a packaged model is converted first, once),
the chat template is applied or not by ``model.use_chat_template``, prompts are rendered
and counted exactly, and every request is checked against the context. What a real run
would refuse is therefore refused here, before the weights load, and ``dry_run=true``
refuses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config, ModelConfig
    from pipeline.records import Request
    from pipeline.workload.conversations import Conversation

#: how prompts were rendered, as the applied settings say it
CHAT_TEMPLATE, PLAIN = "chat_template", "plain"


@dataclass
class PreparedRequests:
    """The model folder every backend loads, the requests built in its tokenizer, and
    how their prompts were rendered (:data:`CHAT_TEMPLATE` or :data:`PLAIN`); with
    ``workload.source=conversations`` the conversations too (the requests are their first
    turns)."""

    model_dir: str
    requests: list[Request]
    prompt_rendering: str
    conversations: list[Conversation] | None = None


def load_tokenizer(model_dir: str, model: ModelConfig) -> Any:
    """The tokenizer of the model folder, the one that renders prompts for every backend."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=model.trust_remote_code,
                                         revision=model.revision)


def applies_chat_template(setting: str, tokenizer: Any, model_name: str) -> bool:
    """Whether prompts are wrapped in the chat template: ``auto`` when the tokenizer has
    one, ``true`` always (refused when it has none), ``false`` never."""
    has = bool(getattr(tokenizer, "chat_template", None))
    setting = str(setting).lower()
    if setting == "true" and not has:
        raise ConfigError(
            f"model.use_chat_template=true is invalid: the tokenizer of {model_name} has no "
            f"chat template; use model.use_chat_template=auto or false (plain prompts)")
    return has and setting in ("true", "auto")


def check_reference_metrics(spec: Config, requests: list[Request]) -> None:
    """Refuse reference metrics that no request can be scored with (no references)."""
    from pipeline.metrics.reference import resolve_metrics

    names = resolve_metrics(spec.scoring, spec.workload.name)
    if names and not any(q.reference is not None for q in requests):
        key = ("scoring.reference_metrics" if spec.scoring.reference_metrics is not None
               else f"scoring.task_reference_metrics.{spec.workload.name}")
        raise ConfigError(
            f"{key}={names} is invalid: no request of workload {spec.workload.name!r} carries "
            f"a reference to score against; use a workload with references (a file with "
            f"workload.reference_field, or a task workload) or set "
            f"scoring.reference_metrics=[]")


def prepare_requests(spec: Config, prompts: list[Any]) -> PreparedRequests:
    """Resolve the model folder, render ``prompts`` as requests in its tokenizer and run
    every check that needs the tokens (chat template, lengths, context, references)."""
    from pipeline.models import resolve_model
    from pipeline.workload.limits import check_request_lengths
    from pipeline.workload.prompts import make_requests

    model_dir = resolve_model(spec.model, Path(spec.paths.cache_dir).resolve())
    tokenizer = load_tokenizer(model_dir, spec.model)
    if spec.workload.source == "conversations":
        return _prepare_conversations(spec, model_dir, tokenizer)
    if spec.workload.source == "trace":
        from pipeline.workload.trace import trace_requests

        # raw token ids at the trace's exact lengths: no template
        template = False
        requests = trace_requests(spec.workload, tokenizer, spec.seed)
    else:
        template = applies_chat_template(spec.model.use_chat_template, tokenizer,
                                         spec.model.path or spec.model.name)
        requests = make_requests(prompts, tokenizer, template, spec.workload, spec.seed)
    check_request_lengths(spec, requests)
    check_reference_metrics(spec, requests)
    return PreparedRequests(model_dir, requests, CHAT_TEMPLATE if template else PLAIN)


def _prepare_conversations(spec: Config, model_dir: str, tokenizer: Any) -> PreparedRequests:
    """Conversations: built in the tokenizer, their first turns as the requests, and every
    turn's upper bound (earlier answers at their longest) checked against the context."""
    from pipeline.workload.conversations import (
        check_conversation_context,
        first_turn_requests,
        load_conversations,
    )
    from pipeline.workload.limits import context_limit

    if not getattr(tokenizer, "chat_template", None):  # it renders the history
        raise ConfigError(
            f"workload.source='conversations' is invalid for model "
            f"{spec.model.path or spec.model.name}: its tokenizer has no chat template to "
            f"render a conversation's history with; use a chat model")
    convs = load_conversations(spec, tokenizer)
    limit = context_limit(spec)
    if limit is not None:
        check_conversation_context(convs, tokenizer, spec.workload, limit[0], limit[1])
    requests = first_turn_requests(convs, tokenizer)
    check_reference_metrics(spec, requests)
    return PreparedRequests(model_dir, requests, CHAT_TEMPLATE, convs)
